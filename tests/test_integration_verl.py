"""verl integration: the "ospo" estimator's torch core, the dense token-reward encoding, response scoring, and
(where verl is installed) the registered estimator and reward managers on real verl objects."""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import re

import numpy as np
import pytest
import torch

from ospo_fast.app.tiny import build_tokenizer
from ospo_fast.credit import attribute_completions
from ospo_fast.integrations.common import (
    BatchContext,
    BatchContextHolder,
    CompletionReward,
    segment_frame,
)
from ospo_fast.integrations.verl import (
    build_attributor,
    compute_ospo_advantage,
    dense_token_rewards,
    grpo_sequence_advantages,
    last_token_mask,
    ospo_advantages,
    score_responses,
    split_token_rewards,
)
from ospo_fast.segment import Segmenter

RESPONSES = [
    "<think>the user wants power</think><answer>wireless charger for iphone, fast charging cable</answer>",
    "<answer>red running shoes for women with arch support</answer>",
    "<answer>navy blue tee. slim fit cotton</answer>",
    "no tags at all, just a cable for iphone",
]
GROUND_TRUTH = ["iphone charger cable", "running shoes women", "cotton tee", "iphone cable"]


def random_batch(seed: int, B: int = 6, L: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    credit = torch.randn(B, L, generator=g) * mask * ~last_token_mask(mask)
    rewards = torch.rand(B, generator=g)
    index = np.array(["a", "a", "b", "b", "b", "c"][:B], dtype=object)
    return rewards, credit, mask, index


def grpo_loop(scores, index, epsilon=1e-6, norm=True):
    """verl's compute_grpo_outcome_advantage, written as its loop (groups of one: mean 0, std 1)."""
    out = scores.clone().float()
    for uid in set(index.tolist()):
        rows = [i for i, u in enumerate(index) if u == uid]
        group = scores[rows].float()
        mean, std = (group.mean(), group.std()) if len(rows) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[rows] = (group - mean) / (std + epsilon) if norm else group - mean
    return out


# ----------------------------------------------------------------------------------------------------
# The torch core


def test_dense_token_rewards_sum_to_the_sequence_reward():
    rewards, credit, mask, _ = random_batch(0)
    dense = dense_token_rewards(rewards, credit, mask)
    torch.testing.assert_close(dense.sum(1), rewards)
    assert (dense[~mask] == 0).all()


def test_split_token_rewards_inverts_dense_token_rewards():
    rewards, credit, mask, _ = random_batch(1)
    back_rewards, back_credit = split_token_rewards(dense_token_rewards(rewards, credit, mask), mask)
    torch.testing.assert_close(back_rewards, rewards)
    torch.testing.assert_close(back_credit, credit)


def test_grpo_sequence_advantages_match_verls_loop():
    rewards, _, _, index = random_batch(2)
    for norm in (True, False):
        torch.testing.assert_close(grpo_sequence_advantages(rewards, index, norm_adv_by_std_in_grpo=norm),
                                   grpo_loop(rewards, index, norm=norm))


def test_grpo_sequence_advantages_match_verls_loop_for_groups_in_any_order_and_size():
    g = torch.Generator().manual_seed(7)
    index = np.array([f"uid{int(i)}" for i in torch.randint(0, 5, (23,), generator=g)], dtype=object)
    rewards = torch.rand(23, generator=g)
    for norm in (True, False):
        torch.testing.assert_close(grpo_sequence_advantages(rewards, index, norm_adv_by_std_in_grpo=norm),
                                   grpo_loop(rewards, index, norm=norm))


def test_grpo_sequence_advantages_give_a_constant_group_exactly_zero():
    rewards = torch.tensor([0.1, 0.7, 0.1, 0.1, 0.3])
    index = np.array(["a", "b", "a", "a", "b"], dtype=object)
    advantages = grpo_sequence_advantages(rewards, index)
    assert (advantages[[0, 2, 3]] == 0).all() and (advantages[[1, 4]] != 0).all()


def test_token_mean_of_ospo_advantages_is_the_grpo_advantage():
    rewards, credit, mask, index = random_batch(3)
    for mode in ("proportional", "rank", "hybrid"):
        adv = ospo_advantages(dense_token_rewards(rewards, credit, mask), mask, index, mode=mode)
        torch.testing.assert_close((adv * mask).sum(1) / mask.sum(1), grpo_loop(rewards, index), rtol=1e-5, atol=1e-5)
        assert (adv[~mask] == 0).all()


def test_tokens_without_credit_and_the_last_token_keep_the_grpo_advantage():
    # The think block, tags and EOS carry no credit: OSPO moves advantage only among the segment tokens.
    rewards, credit, mask, index = random_batch(5)
    credit = credit * (torch.rand(credit.shape, generator=torch.Generator().manual_seed(5)) < 0.5)
    dense = dense_token_rewards(rewards, credit * ~last_token_mask(mask), mask)
    grpo = grpo_loop(rewards, index)[:, None].expand_as(credit)
    for mode in ("proportional", "rank", "hybrid"):
        adv = ospo_advantages(dense, mask, index, mode=mode)
        outside = mask & ((credit == 0) | last_token_mask(mask))
        torch.testing.assert_close(adv[outside], grpo[outside].float())
        inside = mask & ~outside
        assert not torch.allclose(adv[inside], grpo[inside].float())


def test_a_last_token_scalar_reward_gives_grpo_advantages():
    rewards, _, mask, index = random_batch(4)
    scalar = last_token_mask(mask) * rewards[:, None]  # what verl's naive reward manager writes
    adv = ospo_advantages(scalar, mask, index)
    torch.testing.assert_close(adv, grpo_loop(rewards, index)[:, None] * mask)


def test_credit_moves_advantage_towards_credited_tokens():
    mask = torch.ones(2, 4, dtype=torch.bool)
    credit = torch.tensor([[0.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    adv = ospo_advantages(dense_token_rewards(rewards, credit, mask), mask, np.array(["g", "g"], dtype=object))
    assert adv[0, 1] == adv[0].max() and adv[0, 1] > adv[0, 0] > adv[0, 2]
    assert adv[0, 0] == adv[0, 3]  # no credit: the GRPO advantage


def test_estimator_reads_options_from_the_config_section():
    rewards, credit, mask, index = random_batch(5)
    dense = dense_token_rewards(rewards, credit, mask)
    adv, returns = compute_ospo_advantage(dense, mask, index, config={"ospo": {"mode": "rank", "floor": 0.3}})
    torch.testing.assert_close(adv, ospo_advantages(dense, mask, index, mode="rank", floor=0.3))
    assert returns is adv
    no_std, _ = compute_ospo_advantage(dense, mask, index, config={"norm_adv_by_std_in_grpo": False})
    torch.testing.assert_close((no_std * mask).sum(1) / mask.sum(1), grpo_loop(rewards, index, norm=False))


def test_estimator_rejects_an_unknown_option():
    rewards, credit, mask, index = random_batch(6)
    with pytest.raises(ValueError, match="algorithm.ospo.*flor"):
        compute_ospo_advantage(dense_token_rewards(rewards, credit, mask), mask, index, config={"ospo": {"flor": 0.1}})


# ----------------------------------------------------------------------------------------------------
# Scoring responses with a verl-style compute_score


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    words = " ".join(RESPONSES).replace("<", " <").replace(">", "> ").split()
    texts = RESPONSES + [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    return build_tokenizer(texts, vocab_size=400)


def answer_overlap(data_source, solution_str, ground_truth, extra_info=None):
    """A verl compute_score that needs the answer tags: the share of the ground truth's words in the answer."""
    m = re.search(r"<answer>(.*?)</answer>", solution_str, re.S)
    answer = set(re.findall(r"\w+", m.group(1).lower())) if m else set()
    return len(answer & set(ground_truth.split())) / len(ground_truth.split())


def response_batch(tokenizer):
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in RESPONSES]
    L = max(map(len, rows)) + 2
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != tokenizer.pad_token_id


class Rows:
    def __init__(self):
        self.seen = []

    def __call__(self, texts, rows):
        self.seen.extend(texts)
        return [answer_overlap("esci", t, GROUND_TRUTH[r]) for t, r in zip(texts, rows)]


def test_score_responses_rewards_are_compute_score_of_each_response(tokenizer):
    ids, mask = response_batch(tokenizer)
    rewards, dense, _ = score_responses(tokenizer, ids, mask, build_attributor(Rows()))
    expected = torch.tensor([answer_overlap("esci", r, g) for r, g in zip(RESPONSES, GROUND_TRUTH)])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(dense.sum(1), rewards)


def test_score_responses_credit_is_the_excess_credit_of_the_segments(tokenizer):
    from ospo_fast.credit import excess_credit

    ids, mask = response_batch(tokenizer)
    _, dense, credit = score_responses(tokenizer, ids, mask, build_attributor(Rows()))
    _, recovered = split_token_rewards(dense, mask)
    for j, a in enumerate(credit.attributions):  # the excess credit sums to 0 over the segments
        assert abs(float(recovered[j].sum())) < 1e-5
        excess = excess_credit(a.plan, a.values, a.phi).float()
        for i in range(a.segmentation.num_players):
            tokens = credit.token_player[j] == i
            if tokens.any():
                torch.testing.assert_close(recovered[j][tokens].sum(), excess[i], rtol=1e-5, atol=1e-6)


def test_coalitions_keep_the_response_frame(tokenizer):
    ids, mask = response_batch(tokenizer)
    rows = Rows()
    score_responses(tokenizer, ids, mask, build_attributor(rows))
    framed = [t for t in rows.seen if t.startswith("<think>the user wants power</think><answer>")]
    assert framed and all(t.endswith("</answer>") for t in framed)


def test_completion_reward_needs_a_bound_batch():
    with pytest.raises(RuntimeError, match="bind"):
        CompletionReward(lambda texts, rows: [0.0] * len(texts))(["a"], [0])


def test_completion_reward_keeps_the_frames_for_the_bound_batch_only():
    reward = CompletionReward(lambda texts, rows: [0.0] * len(texts))
    segmentations = [Segmenter()(text) for text in RESPONSES[:2]]
    assert reward.num_owners is None
    with reward.bind(RESPONSES[:2], segmentations):
        assert reward.num_owners == 2
        assert reward.ospo_batch.frames == [segment_frame(sg) for sg in segmentations]
    assert reward.num_owners is None and not reward.in_batch


def test_batch_context_is_cleared_when_the_batch_fails():
    holder = BatchContextHolder()
    with pytest.raises(ValueError, match="scoring failed"):
        with holder.ospo_batch_scope(BatchContext(rows=[{"ground_truth": "x"}])):
            assert holder.ospo_batch.rows[0]["ground_truth"] == "x"
            raise ValueError("scoring failed")
    with pytest.raises(RuntimeError, match="no batch"):
        holder.ospo_batch


def test_reserved_last_token_carries_no_credit(tokenizer):
    ids, mask = response_batch(tokenizer)
    reward = CompletionReward(Rows())
    from ospo_fast.attribution import OwenAttributor

    credit = attribute_completions(tokenizer, ids, OwenAttributor(reward, segmenter=Segmenter()), range(len(ids)),
                                   keep=mask, reserve_last=last_token_mask(mask), reward_scope=reward.bind)
    assert (credit.credit[last_token_mask(mask)] == 0).all()


@pytest.fixture
def first_step(monkeypatch):
    """The estimator checks for credit on its first call in a process: make the next call the first."""
    from ospo_fast.integrations.verl import estimator

    monkeypatch.setattr(estimator, "_credit_checked", False)


def test_estimator_raises_at_the_first_step_when_no_credit_arrives(first_step):
    rewards, _, mask, index = random_batch(4)
    scalar = last_token_mask(mask) * rewards[:, None]  # one float per response, as verl's agent loop writes
    with pytest.raises(RuntimeError, match="no token credit reached the estimator.*no_credit=warn"):
        compute_ospo_advantage(scalar, mask, index)


def test_estimator_warns_once_and_trains_as_grpo_by_opt_in(first_step):
    import warnings

    rewards, _, mask, index = random_batch(4)
    scalar = last_token_mask(mask) * rewards[:, None]
    with pytest.warns(RuntimeWarning, match="no token credit"):
        adv, _ = compute_ospo_advantage(scalar, mask, index, config={"ospo": {"no_credit": "warn"}})
    torch.testing.assert_close(adv, grpo_loop(rewards, index)[:, None] * mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_ospo_advantage(scalar, mask, index, config={"ospo": {"no_credit": "warn"}})


def test_estimator_with_credit_on_its_first_step_does_not_raise(first_step):
    rewards, credit, mask, index = random_batch(3)
    adv, _ = compute_ospo_advantage(dense_token_rewards(rewards, credit, mask), mask, index)
    torch.testing.assert_close((adv * mask).sum(1) / mask.sum(1), grpo_loop(rewards, index), rtol=1e-5, atol=1e-5)


def test_estimator_rejects_a_bad_no_credit_option(first_step):
    rewards, credit, mask, index = random_batch(3)
    with pytest.raises(ValueError, match="algorithm.ospo.no_credit.*'raise' or 'warn'"):
        compute_ospo_advantage(dense_token_rewards(rewards, credit, mask), mask, index,
                               config={"ospo": {"no_credit": "ignore"}})


# ----------------------------------------------------------------------------------------------------
# On real verl objects (only where verl is installed)


def import_verl(name: str):
    """Import a verl module, or skip where verl is not installed. CI installs verl in a venv of its own (it pins an
    older transformers) and sets OSPO_FAST_REQUIRE_VERL=1 there, so a broken install fails instead of skipping."""
    if os.environ.get("OSPO_FAST_REQUIRE_VERL") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="module")
def verl():
    return import_verl("verl")


def verl_batch(verl, tokenizer):
    from tensordict import TensorDict

    ids, mask = response_batch(tokenizer)
    prompts = torch.full((len(ids), 3), tokenizer.bos_token_id)
    batch = TensorDict(
        {"prompts": prompts, "responses": ids, "attention_mask": torch.cat([torch.ones_like(prompts), mask.long()], 1)},
        batch_size=len(ids),
    )
    non_tensor = {
        "data_source": np.array(["esci"] * len(ids), dtype=object),
        "reward_model": np.array([{"ground_truth": g} for g in GROUND_TRUTH], dtype=object),
        "extra_info": np.array([{} for _ in GROUND_TRUTH], dtype=object),
    }
    return verl.DataProto(batch=batch, non_tensor_batch=non_tensor), mask


def test_verl_registry_holds_the_ospo_estimator(verl):
    from verl.trainer.ppo import core_algos

    assert core_algos.get_adv_estimator_fn("ospo") is compute_ospo_advantage


def test_verl_compute_advantage_with_ospo_keeps_grpo_means(verl):
    ray_trainer = import_verl("verl.trainer.ppo.ray_trainer")
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    rewards, credit, mask, index = random_batch(7)
    data = verl.DataProto(
        batch=TensorDict({"token_level_rewards": dense_token_rewards(rewards, credit, mask),
                          "response_mask": mask.long()}, batch_size=len(rewards)),
        non_tensor_batch={"uid": index},
    )
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "ospo": {"mode": "proportional"}})
    data = ray_trainer.compute_advantage(data, adv_estimator="ospo", config=config)
    grpo = ray_trainer.compute_advantage(
        verl.DataProto(batch=TensorDict({"token_level_rewards": last_token_mask(mask) * rewards[:, None],
                                         "response_mask": mask.long()}, batch_size=len(rewards)),
                       non_tensor_batch={"uid": index}),
        adv_estimator="grpo", config=config,
    ).batch["advantages"]
    adv = data.batch["advantages"]
    torch.testing.assert_close((adv * mask).sum(1) / mask.sum(1), grpo[:, 0], rtol=1e-5, atol=1e-5)


def test_verl_reward_manager_writes_dense_rewards_for_a_dataproto(verl, tokenizer):
    from verl.workers.reward_manager import get_reward_manager_cls

    data, mask = verl_batch(verl, tokenizer)
    manager = get_reward_manager_cls("ospo")(tokenizer=tokenizer, num_examine=0, compute_score=answer_overlap)
    out = manager(data, return_dict=True)
    expected = torch.tensor([answer_overlap("esci", r, g) for r, g in zip(RESPONSES, GROUND_TRUTH)])
    assert out["reward_tensor"].shape == data.batch["responses"].shape
    torch.testing.assert_close(out["reward_tensor"].sum(1), expected)


def test_verl_reward_loop_manager_assembles_dense_rm_scores(verl, tokenizer):
    registry = import_verl("verl.experimental.reward_loop.reward_manager")
    from omegaconf import OmegaConf

    data, mask = verl_batch(verl, tokenizer)
    cls = registry.get_reward_manager_cls("ospo")
    manager = cls(OmegaConf.create({"reward": {"ospo": {"budget": 64}}}), tokenizer, answer_overlap)

    async def score_all():
        return await asyncio.gather(*[manager.run_single(data[i : i + 1]) for i in range(len(data))])

    outputs = manager.loop.run_until_complete(score_all())  # the loop verl's base class bound the manager to
    rm_scores = cls.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    scalars = [float(o["reward_score"]) for o in outputs]
    legacy = registry.get_reward_manager_cls("naive").assemble_rm_scores(data, scalars)
    torch.testing.assert_close(rm_scores.sum(1), legacy.sum(1))
    assert (rm_scores[~mask] == 0).all()
    assert (rm_scores != 0).sum() > (legacy != 0).sum()  # the credit is spread over the tokens


def loop_scores(verl, tokenizer):
    """The reward-loop manager's run_single over the batch: what verl's agent loop receives per response."""
    registry = import_verl("verl.experimental.reward_loop.reward_manager")
    from omegaconf import OmegaConf

    data, mask = verl_batch(verl, tokenizer)
    manager = registry.get_reward_manager_cls("ospo")(OmegaConf.create({}), tokenizer, answer_overlap)

    async def score_all():
        return await asyncio.gather(*[manager.run_single(data[i : i + 1]) for i in range(len(data))])

    return data, mask, [o["reward_score"] for o in manager.loop.run_until_complete(score_all())]


def assert_ospo_advantages_from(verl, rm_scores, mask):
    """verl's compute_advantage with the ospo estimator over rm_scores: credit arrived and moved advantage."""
    ray_trainer = import_verl("verl.trainer.ppo.ray_trainer")
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    index = np.array(["a"] * len(mask), dtype=object)
    data = verl.DataProto(batch=TensorDict({"token_level_rewards": rm_scores, "response_mask": mask.long()},
                                           batch_size=len(mask)), non_tensor_batch={"uid": index})
    adv = ray_trainer.compute_advantage(data, adv_estimator="ospo", config=OmegaConf.create({})).batch["advantages"]
    torch.testing.assert_close((adv * mask).sum(1) / mask.sum(1), grpo_loop(rm_scores.sum(1), index),
                               rtol=1e-5, atol=1e-5)
    assert any(adv[j][mask[j]].unique().numel() > 1 for j in range(len(mask)))  # not GRPO's uniform rows


def test_v1_agent_loop_delivers_the_dense_token_rewards(verl, tokenizer, first_step):
    # verl 0.9's default trainer (trainer.use_v1) stores AgentLoopOutput.as_dict()'s rm_scores per response.
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    data, mask, scores = loop_scores(verl, tokenizer)
    rows = []
    for j, score in enumerate(scores):
        valid = int(mask[j].sum())
        output = AgentLoopOutput(prompt_ids=data.batch["prompts"][j].tolist(),
                                 response_ids=data.batch["responses"][j, :valid].tolist(),
                                 response_mask=[1] * valid, metrics=AgentLoopMetrics())
        output.reward_score = score  # as verl's _compute_score assigns the reward loop's result
        rm_scores = output.as_dict()["rm_scores"]
        torch.testing.assert_close(rm_scores, torch.tensor(score.token_rewards))
        rows.append(torch.nn.functional.pad(rm_scores, (0, mask.shape[1] - valid)))
    assert_ospo_advantages_from(verl, torch.stack(rows), mask)


def test_legacy_agent_loop_delivers_the_dense_token_rewards(verl, tokenizer, first_step):
    # The legacy trainer pads each output (_InternalAgentLoopOutput) and assembles rm_scores in _postprocess.
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopWorker, _InternalAgentLoopOutput

    data, mask, scores = loop_scores(verl, tokenizer)
    inputs = []
    for j, score in enumerate(scores):
        prompt, response = data.batch["prompts"][j : j + 1], data.batch["responses"][j : j + 1]
        attention = data.batch["attention_mask"][j : j + 1]
        output = _InternalAgentLoopOutput(
            prompt_ids=prompt, response_ids=response, input_ids=torch.cat([prompt, response], 1),
            position_ids=attention.cumsum(1) - 1, response_mask=mask[j : j + 1].long(), attention_mask=attention,
            metrics=AgentLoopMetrics(), reward_score=float(score),
        )
        output.reward_score = score  # what the wrapped _agent_loop_postprocess restores after validation
        inputs.append(output)
    worker = object.__new__(AgentLoopWorker)
    worker.reward_loop_worker_handles = object()
    rm_scores = worker._postprocess(inputs).batch["rm_scores"]
    for j, score in enumerate(scores):
        torch.testing.assert_close(rm_scores[j, : int(mask[j].sum())], torch.tensor(score.token_rewards))
    assert_ospo_advantages_from(verl, rm_scores, mask)


def test_verl_loads_the_plugin_in_a_fresh_process():
    # The verl.plugins entry point makes VERL_USE_EXTERNAL_MODULES unnecessary: importing verl registers ospo.
    import subprocess
    import sys

    import_verl("verl")
    code = ("import sys, verl; from verl.trainer.ppo import core_algos; "
            "print('ospo' in core_algos.ADV_ESTIMATOR_REGISTRY, 'ospo_fast.integrations.verl' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "True"]
