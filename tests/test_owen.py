"""Owen values: the axioms, agreement with the formula, every backend against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKEND_IDS,
    BACKENDS,
    TableGame,
    assert_close,
    brute_force_owen,
    brute_force_shapley,
    random_game,
    random_structure,
)

import ospo_fast as of

# Odd and round structures: one union, singletons, uneven unions, non-contiguous unions.
STRUCTURES = [
    [[0]],
    [[0, 1, 2, 3]],
    [[0], [1], [2], [3], [4]],
    [[0, 1], [2, 3, 4]],
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
    [[4, 0], [2], [6, 1, 5, 3]],
    [[0, 1, 2, 3, 4, 5, 6], [7], [8, 9]],
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("unions", STRUCTURES, ids=str)
def test_exact_plan_matches_brute_force_owen_formula(unions):
    s = of.CoalitionStructure(unions)
    game = random_game(s.num_players, _gen(len(unions)))
    phi = of.owen_values(game, s, method="exact", backend="torch")
    assert_close(phi, torch.tensor(brute_force_owen(game, s), dtype=torch.float64), rtol=1e-12, atol=1e-12, what="Owen")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("seed", range(4))
def test_every_backend_matches_brute_force_on_random_structures(backend, device, seed):
    g = _gen(100 + seed)
    s = random_structure(int(torch.randint(1, 9, (1,), generator=g)), g)
    game = random_game(s.num_players, g)
    plan = of.exact_plan(s)
    values = game(plan.masks).to(device)
    phi = of.owen_from_values(plan, values, backend=backend)
    assert phi.dtype == torch.float64 and phi.device.type == device
    assert_close(phi, torch.tensor(brute_force_owen(game, s), dtype=torch.float64), rtol=1e-10, atol=1e-10,
                 what=f"{backend} Owen")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_backends_match_torch_reference_on_batched_values(backend, device, dtype, method):
    g = _gen(7)
    s = of.CoalitionStructure([[0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 10]])
    plan = of.make_plan(s, method, num_permutations=13, seed=3)
    values = torch.randn(37, plan.num_coalitions, generator=g, dtype=dtype)  # odd batch
    expected = of.owen_from_values(plan, values.double(), backend="torch")
    phi = of.owen_from_values(plan, values.to(device), backend=backend)
    assert phi.shape == (37, s.num_players) and phi.dtype == dtype
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert_close(phi, expected, rtol=tol, atol=tol, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_plan_batch_of_mixed_structures_matches_per_game_aggregation(backend, device):
    g = _gen(11)
    structures = [random_structure(int(torch.randint(1, 8, (1,), generator=g)), g) for _ in range(9)]
    plans = [of.make_plan(s, "auto", budget=40, seed=1) for s in structures]
    plans.append(plans[0])  # a repeated plan is stored once
    plans.append(of.exact_plan(of.CoalitionStructure([])))  # a response with nothing to attribute
    batch = of.PlanBatch(plans)
    values = [torch.randn(p.num_coalitions, generator=g, dtype=torch.float64) for p in plans]
    flat = torch.cat(values).to(device)
    phi = of.owen_from_values(batch, flat, backend=backend)
    assert phi.shape == (batch.num_rows,)
    for got, plan, v in zip(batch.split(phi), plans, values):
        assert_close(got, of.owen_from_values(plan, v, backend="torch"), rtol=1e-12, atol=1e-12, what="game")


# ----------------------------------------------------------------------------------------------------
# The axioms, on the exact plan (default backend).


@pytest.mark.parametrize("unions", STRUCTURES, ids=str)
def test_efficiency_exact_plan(unions):
    s = of.CoalitionStructure(unions)
    game = random_game(s.num_players, _gen(1))
    phi = of.owen_values(game, s)
    assert phi.sum().item() == pytest.approx(game.v(range(s.num_players)) - game.v([]), abs=1e-12)


def test_symmetry_inside_a_union():
    s = of.CoalitionStructure([[0, 1, 2], [3, 4]])
    w = torch.tensor([0.3, 0.3, 0.9, -1.0, 2.0], dtype=torch.float64)

    def v(masks):  # players 0 and 1 are interchangeable: same weight, same interactions
        m = masks.double()
        return m @ w + 0.7 * (m[:, 0] + m[:, 1]) * m[:, 3] + 0.2 * m[:, 0] * m[:, 1] - 0.5 * m[:, 2] * m[:, 4]

    phi = of.owen_values(v, s)
    assert phi[0].item() == pytest.approx(phi[1].item(), abs=1e-12)
    assert phi[0].item() != pytest.approx(phi[2].item(), abs=1e-3)


@pytest.mark.parametrize("null_player", [0, 3, 6])
def test_null_player_gets_zero(null_player):
    s = of.CoalitionStructure([[0, 1, 2], [3, 4], [5, 6]])
    base = random_game(7, _gen(null_player)).table
    # v(S) ignores the null player: copy the value of S without it.
    ids = torch.arange(1 << 7)
    game = TableGame(base[ids & ~(1 << null_player)])
    phi = of.owen_values(game, s)
    assert phi[null_player].item() == pytest.approx(0.0, abs=1e-12)
    assert phi.abs().sum().item() > 1e-3


def test_linearity_in_the_game():
    s = of.CoalitionStructure([[0, 1], [2, 3, 4], [5]])
    g = _gen(5)
    a, b = random_game(6, g), random_game(6, g)
    combined = TableGame(2.5 * a.table - 0.75 * b.table)
    expected = 2.5 * of.owen_values(a, s) - 0.75 * of.owen_values(b, s)
    assert_close(of.owen_values(combined, s), expected, rtol=1e-12, atol=1e-12, what="linearity")


@pytest.mark.parametrize("unions", STRUCTURES[3:], ids=str)
def test_union_sums_equal_shapley_of_quotient_game(unions):
    s = of.CoalitionStructure(unions)
    game = random_game(s.num_players, _gen(9))
    phi = of.owen_values(game, s)

    def quotient(R):
        return game.v([p for k in R for p in s.unions[k]])

    expected = brute_force_shapley(quotient, s.num_unions)
    for k, union in enumerate(s.unions):
        assert phi[list(union)].sum().item() == pytest.approx(expected[k], abs=1e-12)


@pytest.mark.parametrize("n", [1, 4, 6])
def test_one_union_gives_shapley(n):
    game = random_game(n, _gen(n))
    phi = of.owen_values(game, of.CoalitionStructure([list(range(n))]))
    expected = brute_force_shapley(lambda S: game.v(S), n)
    assert_close(phi, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12, what="one union")


@pytest.mark.parametrize("n", [2, 5])
def test_singleton_unions_give_shapley(n):
    game = random_game(n, _gen(n + 50))
    phi = of.owen_values(game, of.CoalitionStructure([[i] for i in range(n)]))
    expected = brute_force_shapley(lambda S: game.v(S), n)
    assert_close(phi, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12, what="singletons")


# ----------------------------------------------------------------------------------------------------
# owen_values: one call of value_fn, float64 in -> float64 out, auto method.


def test_owen_values_calls_value_fn_once_with_all_coalitions():
    s = of.CoalitionStructure([[0, 1, 2], [3, 4]])
    game = random_game(5, _gen(2))
    for method in ("exact", "sampled", "auto"):
        game.calls = 0
        of.owen_values(game, s, method=method, num_permutations=6 if method == "sampled" else None)
        assert game.calls == 1


def test_owen_values_keeps_float64_and_float32():
    s = of.CoalitionStructure([[0, 1], [2]])
    assert of.owen_values(lambda m: m.sum(1).double(), s).dtype == torch.float64
    assert of.owen_values(lambda m: m.sum(1).float(), s).dtype == torch.float32


def test_auto_is_exact_within_budget_and_sampled_beyond():
    small = of.CoalitionStructure([[0, 1, 2], [3, 4]])
    assert of.make_plan(small, "auto", budget=of.num_exact_coalitions(small)).method == "exact"
    big = of.CoalitionStructure.from_sizes([4, 4, 4, 4])
    plan = of.make_plan(big, "auto", budget=64)
    assert plan.method == "sampled" and plan.num_coalitions <= 64


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_backends_match_reference_on_plans_too_large_for_a_cpu_tile(backend, device):
    # More than 2048 coalitions per game: the C++ op aggregates such games one at a time.
    plan = of.sampled_plan(of.CoalitionStructure.from_sizes([7, 9, 8, 9, 7]), 70, seed=0)
    assert plan.num_coalitions > 2048
    values = torch.randn(19, plan.num_coalitions, generator=_gen(8), dtype=torch.float64)
    expected = of.owen_from_values(plan, values, backend="torch")
    assert_close(of.owen_from_values(plan, values.to(device), backend=backend), expected, 1e-11, 1e-11, what=backend)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_runs_of_games_sharing_a_plan_inside_a_mixed_batch(backend, device):
    # Runs of 1..40 consecutive games with one plan, so CPU tiles start, fill and stop mid-run.
    g = _gen(12)
    shapes = [[2, 3], [1], [4, 1, 2], [3, 3]]
    plans = []
    for run in torch.randint(1, 41, (9,), generator=g).tolist():
        plans += [of.exact_plan(of.CoalitionStructure.from_sizes(shapes[len(plans) % 4]))] * run
    batch = of.PlanBatch(plans)
    values = torch.randn(batch.num_values, generator=g, dtype=torch.float32)
    expected = of.owen_from_values(batch, values.double(), backend="torch")
    assert_close(of.owen_from_values(batch, values.to(device), backend=backend), expected, 1e-5, 1e-5, what=backend)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_runs_of_one_plan_match_the_reference(backend, device, dtype):
    # Long runs of one plan (many full CPU tiles), a run of games with nothing to attribute, and a short tail.
    exact = of.exact_plan(of.CoalitionStructure.from_sizes([3, 4, 2]))
    sampled = of.sampled_plan(of.CoalitionStructure.from_sizes([5, 6]), 9, seed=2)
    empty = of.exact_plan(of.CoalitionStructure([]))
    batch = of.PlanBatch([exact] * 101 + [sampled] * 67 + [empty] * 70 + [exact] * 3)
    values = torch.randn(batch.num_values, generator=_gen(13), dtype=dtype)
    expected = of.owen_from_values(batch, values.double(), backend="torch")
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close(of.owen_from_values(batch, values.to(device), backend=backend), expected, tol, tol, what=backend)


# ----------------------------------------------------------------------------------------------------
# Excess credit: the Owen value less its share of v(N) - v(empty)


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize("structure", [[[0]], [[0], [1, 2, 3]], [[0, 1], [2, 3, 4], [5]], [[0, 1, 2, 3, 4, 5, 6]]])
def test_excess_credit_is_the_owen_value_of_the_game_without_its_grand_and_empty_values(method, structure):
    from ospo_fast.credit import excess_credit

    s = of.CoalitionStructure(structure)
    plan = of.make_plan(s, method, num_permutations=5, rng=np.random.default_rng(len(structure)))
    full, empty = plan.boundary_weights()
    assert float(full.sum()) == pytest.approx(1.0) and float(empty.sum()) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(3)
    values = torch.rand(4, plan.num_coalitions, generator=g, dtype=torch.float64)
    e = excess_credit(plan, values, of.owen_from_values(plan, values))
    zeroed = values.clone()
    zeroed[:, [plan.full_index, plan.empty_index]] = 0.0
    torch.testing.assert_close(e, of.owen_from_values(plan, zeroed), rtol=0, atol=1e-12)
    torch.testing.assert_close(e.sum(-1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    moved = values.clone()  # the reward of the whole response and of the empty one do not enter it
    moved[:, plan.full_index] += 10.0
    moved[:, plan.empty_index] -= 3.0
    torch.testing.assert_close(excess_credit(plan, moved, of.owen_from_values(plan, moved)), e, rtol=0, atol=1e-12)
