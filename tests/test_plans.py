"""Coalition plans: what is evaluated, how often, and the sampled estimator's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_game, random_structure

import ospo_fast as of


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sizes", [[1], [3], [2, 3], [3, 3, 3], [4, 4, 4], [1, 5, 2, 1]])
def test_exact_plan_holds_each_coalition_once_and_the_formula_count(sizes):
    s = of.CoalitionStructure.from_sizes(sizes)
    plan = of.exact_plan(s)
    assert plan.num_coalitions == of.num_exact_coalitions(s)
    assert torch.unique(plan.masks, dim=0).shape[0] == plan.num_coalitions


def test_three_sentences_of_three_phrases_need_80_coalitions():
    assert of.exact_plan(of.CoalitionStructure.from_sizes([3, 3, 3])).num_coalitions == 80


def test_exact_plan_coalitions_are_unions_of_unions_plus_part_of_one_union():
    s = of.CoalitionStructure([[0, 1, 2], [3, 4], [5, 6, 7]])
    for mask in of.exact_plan(s).masks:
        partial = [k for k, u in enumerate(s.unions) if 0 < int(mask[list(u)].sum()) < len(u)]
        assert len(partial) <= 1


def test_empty_and_grand_coalitions_are_first_and_last():
    for plan in (of.exact_plan(of.CoalitionStructure([[0, 1], [2]])), of.sampled_plan(of.CoalitionStructure([[0, 1], [2]]), 5)):
        assert not plan.masks[plan.empty_index].any()
        assert plan.masks[plan.full_index].all()


@pytest.mark.parametrize("n", [1, 5, 9])
def test_coalition_keys_are_the_masks_as_bits(n):
    plan = of.exact_plan(random_structure(n, _gen(n)))
    keys = plan.coalition_keys()
    bits = (keys[:, None] >> np.arange(plan.num_players)) & 1
    assert keys.dtype == np.int64 and np.array_equal(bits.astype(bool), plan.masks.numpy())
    assert len(set(keys.tolist())) == plan.num_coalitions  # distinct coalitions, distinct keys
    assert plan.coalition_keys() is keys  # computed once


def test_weight_matrix_gives_the_same_values_as_the_terms():
    s = of.CoalitionStructure([[0, 2], [1, 3, 4]])
    plan = of.exact_plan(s)
    values = torch.randn(6, plan.num_coalitions, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(values @ plan.weight_matrix(), of.owen_from_values(plan, values, backend="torch"))


def test_plans_are_cached_per_structure():
    s1 = of.CoalitionStructure([[0, 1], [2, 3]])
    s2 = of.CoalitionStructure([[0, 1], [2, 3]])
    assert of.exact_plan(s1) is of.exact_plan(s2)
    assert of.sampled_plan(s1, 8, seed=4) is of.sampled_plan(s2, 8, seed=4)


def test_sampled_plan_same_seed_same_plan_different_seed_different_plan():
    s = of.CoalitionStructure.from_sizes([3, 4, 2, 5])
    a = of.owen_orders(s, 16, seed=7)
    b = of.owen_orders(s, 16, seed=7)
    c = of.owen_orders(s, 16, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampled_orders_are_stable_across_machines_and_versions():
    # PCG64 streams are platform-independent; this pins them so a change of generator is noticed.
    orders = of.owen_orders(of.CoalitionStructure([[0, 1], [2, 3, 4]]), 4, seed=0)
    assert orders.tolist() == PINNED_ORDERS


PINNED_ORDERS = [[4, 2, 3, 0, 1], [1, 0, 3, 2, 4], [2, 4, 3, 1, 0], [0, 1, 3, 4, 2]]


@pytest.mark.parametrize("antithetic", [False, True])
def test_sampled_orders_are_owen_consistent(antithetic):
    s = of.CoalitionStructure([[5, 0], [2, 4, 1], [3]])
    for order in of.owen_orders(s, 50, seed=1, antithetic=antithetic):
        unions = [s.union_of[p] for p in order]
        # each union's players arrive together: the union sequence changes value exactly m-1 times
        assert sum(a != b for a, b in zip(unions, unions[1:])) == s.num_unions - 1
        assert sorted(order.tolist()) == list(range(s.num_players))


def test_antithetic_orders_come_in_reversed_pairs():
    orders = of.owen_orders(of.CoalitionStructure.from_sizes([2, 3, 1]), 6, seed=2, antithetic=True)
    for a, b in zip(orders[0::2], orders[1::2]):
        assert a.tolist() == b[::-1].tolist()


def test_sampled_plan_evaluates_each_coalition_once():
    s = of.CoalitionStructure.from_sizes([2, 2])  # few coalitions, so orders repeat them
    plan = of.sampled_plan(s, 64, seed=0)
    assert torch.unique(plan.masks, dim=0).shape[0] == plan.num_coalitions
    assert plan.num_coalitions <= of.num_exact_coalitions(s)


def test_sampled_estimate_is_unbiased():
    g = _gen(3)
    s = random_structure(6, g)
    game = random_game(6, g)
    exact = of.owen_values(game, s, method="exact")
    estimates = torch.stack(
        [of.owen_values(game, s, method="sampled", num_permutations=3, seed=seed, antithetic=False) for seed in range(600)]
    )
    stderr = estimates.std(0) / 600**0.5
    assert ((estimates.mean(0) - exact).abs() <= 4.5 * stderr + 1e-12).all()


def _rmse(game, s, K, antithetic, seeds=120):
    exact = of.owen_values(game, s, method="exact")
    errors = [
        (of.owen_values(game, s, method="sampled", num_permutations=K, seed=seed, antithetic=antithetic) - exact)
        .pow(2)
        .mean()
        for seed in range(seeds)
    ]
    return torch.stack(errors).mean().sqrt().item()


def test_sampled_error_shrinks_like_one_over_sqrt_k():
    g = _gen(4)
    s = of.CoalitionStructure.from_sizes([2, 3, 2])
    game = random_game(7, g)
    ratio = _rmse(game, s, 4, antithetic=False) / _rmse(game, s, 64, antithetic=False)
    assert 2.5 < ratio < 6.5  # sqrt(64 / 4) = 4


def test_antithetic_sampling_no_worse_than_plain():
    s = of.CoalitionStructure.from_sizes([2, 3, 2])
    w = torch.rand(7, dtype=torch.float64, generator=_gen(5)) + 0.1

    def saturating(masks):  # a retrieval-like reward: diminishing returns in the kept segments
        return (masks.double() @ w).sqrt()

    plain = _rmse(saturating, s, 8, antithetic=False)
    anti = _rmse(saturating, s, 8, antithetic=True)
    assert anti <= plain * 1.05


def test_plan_batch_offsets_and_split():
    plans = [of.exact_plan(of.CoalitionStructure.from_sizes(sz)) for sz in ([2], [1, 2], [3])]
    batch = of.PlanBatch(plans)
    assert batch.num_values == sum(p.num_coalitions for p in plans)
    assert batch.num_rows == 8
    assert [t.numel() for t in batch.split(torch.zeros(batch.num_rows))] == [2, 3, 3]
