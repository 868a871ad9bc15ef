"""Text rewards: the distinct coalition texts of a whole batch scored in one call."""

from __future__ import annotations

import random

from evaluation_inputs import CountingReward, random_response

import ospo_fast as of


def test_text_reward_is_called_once_for_the_whole_batch():
    reward = CountingReward()
    rng = random.Random(3)
    out = of.OwenAttributor(reward, method="auto", budget=30)([random_response(rng) for _ in range(11)], [0] * 11)
    assert reward.calls == 1
    assert out.num_evaluations == reward.scored <= out.num_coalitions
