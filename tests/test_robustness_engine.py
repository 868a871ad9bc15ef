"""The Owen engine under hostile and demanding use: caps, empty responses, hand-built plans, gradients, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import BACKEND_IDS, BACKENDS

import ospo_fast as of
from ospo_fast import _extension
from ospo_fast import plans as plans_module
from ospo_fast.plans import cache as cache_module
from ospo_fast.plans import plan as plan_module

needs_cpp = pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
SIXTEEN = of.CoalitionStructure.from_sizes([16])  # one union of 16 players: 2^16 exact coalitions


def _zeros(masks: torch.Tensor) -> torch.Tensor:
    return torch.zeros(masks.shape[0], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# 1. exact has a practical cap; num_permutations is bounded


def test_exact_is_refused_above_the_default_cap_with_a_way_to_force_it():
    count = of.num_exact_coalitions(SIXTEEN)
    assert plans_module.MAX_EXACT_COALITIONS < count <= plans_module.EXACT_COALITIONS_HARD_LIMIT
    for call in (
        lambda: of.exact_plan(SIXTEEN),
        lambda: of.make_plan(SIXTEEN, "exact"),
        lambda: of.make_plans([SIXTEEN], "exact", rng=np.random.default_rng(0)),
        lambda: of.owen_values(_zeros, SIXTEEN, "exact"),
    ):
        with pytest.raises(ValueError, match=rf"needs {count} coalitions.*max_exact_coalitions={count} to force"):
            call()
    # Just above the cap is refused, at the cap it is built.
    small = of.CoalitionStructure.from_sizes([3, 3])
    need = of.num_exact_coalitions(small)
    with pytest.raises(ValueError, match="max_exact_coalitions"):
        of.exact_plan(small, max_exact_coalitions=need - 1)
    assert of.exact_plan(small, max_exact_coalitions=need).num_coalitions == need


def test_exact_above_the_cap_runs_when_forced():
    structure = of.CoalitionStructure.from_sizes([13])  # 8192 coalitions: over the default cap, cheap to build
    count = of.num_exact_coalitions(structure)
    assert count > plans_module.MAX_EXACT_COALITIONS
    plan = of.make_plan(structure, "exact", max_exact_coalitions=count)
    assert plan.method == "exact" and plan.num_coalitions == count


@pytest.mark.parametrize("cap", [0, -1, 2.0, True, plans_module.EXACT_COALITIONS_HARD_LIMIT + 1])
def test_max_exact_coalitions_is_checked(cap):
    s = of.CoalitionStructure([[0, 1]])
    for call in (
        lambda: of.make_plan(s, "exact", max_exact_coalitions=cap),
        lambda: of.make_plan(s, "sampled", max_exact_coalitions=cap),  # checked whatever the method
        lambda: of.make_plans([s], "auto", max_exact_coalitions=cap, rng=np.random.default_rng(0)),
        lambda: of.exact_plan(s, max_exact_coalitions=cap),
        lambda: of.owen_values(_zeros, s, "exact", max_exact_coalitions=cap),
    ):
        with pytest.raises(ValueError, match=r"^max_exact_coalitions: expected an int in \[1, "):
            call()
    assert of.make_plan(s, "exact", max_exact_coalitions=np.int64(4)).num_coalitions == 4


def test_auto_never_picks_exact_above_the_budget_or_the_cap():
    structure = of.CoalitionStructure.from_sizes([3, 3])
    need = of.num_exact_coalitions(structure)
    assert of.make_plan(structure, "auto", budget=need).method == "exact"
    assert of.make_plan(structure, "auto", budget=need - 1).method == "sampled"
    # A budget larger than the exact plan does not override the cap.
    capped = of.make_plan(structure, "auto", budget=10 * need, max_exact_coalitions=need - 1)
    assert capped.method == "sampled"
    big = of.make_plan(SIXTEEN, "auto", budget=10**7)
    assert big.method == "sampled" and big.num_permutations <= plans_module.MAX_PERMUTATIONS


@pytest.mark.parametrize("K", [10**8, plans_module.MAX_PERMUTATIONS + 1])
def test_num_permutations_is_bounded_before_anything_is_allocated(K):
    s = of.CoalitionStructure([[0, 1], [2]])
    for call in (
        lambda: of.sampled_plan(s, K),
        lambda: of.sampled_plan(s, K, rng=np.random.default_rng(0)),
        lambda: of.owen_orders(s, K),
        lambda: of.make_plans([s, s], "sampled", num_permutations=K, rng=np.random.default_rng(0)),
        lambda: of.owen_values(_zeros, s, "auto", budget=2, num_permutations=K),
    ):
        with pytest.raises(ValueError, match=r"^num_permutations: expected a positive int up to MAX_PERMUTATIONS"):
            call()


# ---------------------------------------------------------------------------------------------------------
# 2. a response with no segments gives empty values in every method


@pytest.mark.parametrize("method", ["exact", "sampled", "auto"])
def test_empty_structure_gives_empty_values_everywhere(method):
    empty, two = of.CoalitionStructure([]), of.CoalitionStructure([[0, 1]])
    plan = of.make_plan(empty, method)
    assert plan.num_players == 0 and plan.num_coalitions == 1
    phi = of.owen_values(lambda m: torch.ones(m.shape[0]), empty, method)
    assert phi.shape == (0,)
    for backend in ("torch", "cpp") if _extension.has_cpp() else ("torch",):
        assert of.owen_from_values(plan, torch.ones(1), backend=backend).shape == (0,)
        assert of.owen_from_values(plan, torch.ones(3, 1), backend=backend).shape == (3, 0)
    for rng in (None, np.random.default_rng(0)):
        plans = of.make_plans([empty, two, empty, empty], method, rng=rng)
        assert [p.num_players for p in plans] == [0, 2, 0, 0]
        batch = of.PlanBatch(plans)
        values = torch.arange(batch.num_values, dtype=torch.float64)
        pieces = batch.split(of.owen_from_values(batch, values))
        assert [tuple(p.shape) for p in pieces] == [(0,), (2,), (0,), (0,)]
        # The real game's values are unaffected by the empty ones around it: they sum to v(N) - v(empty).
        v = batch.split_values(values)[1]
        torch.testing.assert_close(pieces[1].sum(), v[plans[1].full_index] - v[plans[1].empty_index])
    only_empty = of.make_plans([empty, empty], method, rng=np.random.default_rng(1))
    assert of.owen_from_values(of.PlanBatch(only_empty), torch.ones(2)).shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# 3. hand-built plans are validated once, factory-built ones never


def _fields(plan: of.CoalitionPlan) -> dict:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.init}


def _good_plan() -> of.CoalitionPlan:
    return of.exact_plan(of.CoalitionStructure([[0, 1], [2]]))


@pytest.mark.parametrize(
    "field, bad",
    [
        ("term_plus", lambda p: p.term_plus + p.num_coalitions),  # out of range: read past the values
        ("term_minus", lambda p: p.term_minus - 10**6),
        ("term_plus", lambda p: p.term_plus.int()),
        ("term_minus", lambda p: p.term_minus[:-1]),
        ("term_weight", lambda p: p.term_weight.float()),
        ("term_weight", lambda p: torch.full_like(p.term_weight, float("nan"))),
        ("player_ptr", lambda p: p.player_ptr + 1),
        ("player_ptr", lambda p: p.player_ptr.flip(0)),
        ("player_ptr", lambda p: p.player_ptr[:-1]),
        ("masks", lambda p: p.masks[:, :-1]),
        ("masks", lambda p: p.masks.flip(0)),
        ("masks", lambda p: p.masks.long()),
        ("structure", lambda p: [[0, 1], [2]]),
        ("method", lambda p: "magic"),
        ("num_permutations", lambda p: -1),
    ],
)
def test_hand_built_bad_plan_raises_naming_the_field(field, bad):
    good = _good_plan()
    kwargs = _fields(good)
    kwargs[field] = bad(good)
    with pytest.raises(ValueError, match=rf"^CoalitionPlan\.{field}: expected "):
        of.CoalitionPlan(**kwargs)
    with pytest.raises(ValueError, match=rf"^CoalitionPlan\.{field}: expected "):
        dataclasses.replace(good, **{field: kwargs[field]})  # replace does not inherit the factory's trust


def test_hand_built_good_plan_is_accepted_and_checked_once(monkeypatch):
    calls = []
    real = plan_module._validate_plan
    monkeypatch.setattr(plan_module, "_validate_plan", lambda plan: calls.append(plan) or real(plan))
    good = _good_plan()
    plan = of.CoalitionPlan(**_fields(good))
    assert len(calls) == 1
    values = torch.randn(plan.num_coalitions, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(of.owen_from_values(plan, values), of.owen_from_values(good, values))
        of.owen_from_values(of.PlanBatch([plan, good]), torch.cat([values, values]))
    assert len(calls) == 1  # never again per call
    assert plan.cache is not good.cache


def test_factory_plans_pay_no_validation(monkeypatch):
    calls = []
    monkeypatch.setattr(plan_module, "_validate_plan", calls.append)
    structures = [of.CoalitionStructure.from_sizes(sizes) for sizes in ([2, 1, 2], [4], [1, 1, 1, 3])]
    rng = np.random.default_rng(0)
    built = [of.sampled_plan(s, 6, rng=rng) for s in structures]
    built += of.make_plans(structures, "sampled", num_permutations=5, rng=rng)  # vectorised construction
    built += [of.sampled_plan(structures[0], 7, seed=11), of.exact_plan(of.CoalitionStructure.from_sizes([2, 5]))]
    for plan in built:
        of.owen_from_values(plan, torch.randn(4, plan.num_coalitions))
    of.owen_from_values(of.PlanBatch(built), torch.randn(sum(p.num_coalitions for p in built)))
    assert calls == []


# ---------------------------------------------------------------------------------------------------------
# 4. gradients flow through every backend


def _grad_games(device: str):
    s = of.CoalitionStructure([[0, 1, 2], [3, 4]])
    sampled, exact = of.sampled_plan(s, 5, seed=0), of.exact_plan(s)
    batch = of.PlanBatch([sampled, exact, sampled, of.exact_plan(of.CoalitionStructure([]))])
    values = torch.randn(batch.num_values, dtype=torch.float64, device=device, requires_grad=True)
    shared = torch.randn(3, exact.num_coalitions, dtype=torch.float64, device=device, requires_grad=True)
    return batch, values, exact, shared


@pytest.mark.parametrize("backend, device", BACKENDS, ids=BACKEND_IDS)
def test_gradcheck_owen_from_values(backend, device):
    batch, values, plan, shared = _grad_games(device)
    assert torch.autograd.gradcheck(lambda v: of.owen_from_values(batch, v, backend=backend), (values,))
    assert torch.autograd.gradcheck(lambda v: of.owen_from_values(plan, v, backend=backend), (shared,))
    # The gradient is the transposed aggregation: d(sum phi)/dv = sum over players of the weight matrix rows.
    of.owen_from_values(plan, shared, backend=backend).sum().backward()
    expected = plan.weight_matrix().sum(1).to(device).expand(3, -1)
    torch.testing.assert_close(shared.grad, expected)
    with torch.no_grad():
        assert not of.owen_from_values(plan, shared, backend=backend).requires_grad


@needs_cpp
def test_registered_operator_differentiates_values_and_weights():
    batch, values, _, _ = _grad_games("cpu")
    *index, weight = batch.kernel_args(torch.device("cpu"), torch.float64)
    weight = weight.clone().requires_grad_()
    op = torch.ops.ospo_fast.owen_aggregate

    def f(v, w):
        return op(v, *index, w, batch.num_rows)

    assert torch.autograd.gradcheck(f, (values, weight))
    assert torch.autograd.gradgradcheck(f, (values, weight))


# ---------------------------------------------------------------------------------------------------------
# 5. integer arguments: numpy integers accepted, bools / negatives / non-integers refused by name


def test_numpy_integers_are_accepted_wherever_ints_are():
    s = of.CoalitionStructure([[0, 1], [2, 3]])
    a = of.sampled_plan(s, np.int64(6), seed=np.int64(3))
    b = of.sampled_plan(s, 6, seed=3)
    torch.testing.assert_close(a.masks, b.masks)
    torch.testing.assert_close(a.term_weight, b.term_weight)
    np.testing.assert_array_equal(of.owen_orders(s, np.int32(4), seed=np.uint8(3)), of.owen_orders(s, 4, seed=3))
    auto = of.make_plan(s, "auto", budget=np.int64(4), num_permutations=np.int16(3), seed=np.int64(1))
    assert auto.num_permutations == 3 and isinstance(auto.num_permutations, int)
    of.make_plans([s, s], "sampled", num_permutations=np.int64(2), seed=np.int64(2))
    phi = of.owen_values(lambda m: m.sum(1).double(), s, "sampled", num_permutations=np.int64(4), seed=np.int64(5))
    torch.testing.assert_close(phi, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("seed", [-1, 1.5, True, np.True_, "0", None, np.float64(2.0)])
@pytest.mark.parametrize("method", ["exact", "sampled", "auto"])
def test_bad_seeds_are_refused_by_name_in_every_method(seed, method):
    s = of.CoalitionStructure([[0, 1], [2]])
    for call in (
        lambda: of.make_plan(s, method, seed=seed),
        lambda: of.make_plans([s], method, seed=seed),
        lambda: of.make_plans([s], method, seed=seed, rng=np.random.default_rng(0)),
        lambda: of.owen_values(_zeros, s, method, seed=seed),
    ):
        with pytest.raises(ValueError, match=r"^seed: expected a non-negative int, got "):
            call()
    for call in (lambda: of.sampled_plan(s, 4, seed=seed), lambda: of.owen_orders(s, 4, seed=seed)):
        with pytest.raises(ValueError, match=r"^seed: expected a non-negative int, got "):
            call()


@pytest.mark.parametrize("bad", [True, np.True_, 2.0, -3, 0])
def test_bool_and_non_positive_counts_are_refused_by_name(bad):
    s = of.CoalitionStructure([[0, 1], [2]])
    with pytest.raises(ValueError, match=r"^num_permutations: expected a positive int"):
        of.make_plan(s, "sampled", num_permutations=bad)
    with pytest.raises(ValueError, match=r"^budget: expected an int >= 2"):
        of.make_plan(s, "auto", budget=bad)


@pytest.mark.parametrize("options", [
    dict(method="kernelshap"),
    dict(method="auto", budget=1),
    dict(method="auto", budget=2.0),
    dict(method="auto", num_permutations=0),
    dict(method="sampled", num_permutations=True),
    dict(method="sampled", num_permutations=plans_module.MAX_PERMUTATIONS + 1),
    dict(method="exact", max_exact_coalitions=0),
    dict(method="auto", max_exact_coalitions=plans_module.EXACT_COALITIONS_HARD_LIMIT + 1),
])
def test_check_plan_options_raises_what_make_plan_raises(options):
    """The options' check without a plan: the same error as make_plan on a game too big for the budget."""
    big = of.CoalitionStructure.from_sizes([8, 8])  # 1020 coalitions: sampled under "auto"
    with pytest.raises(ValueError) as from_plan:
        of.make_plan(big, **options)
    with pytest.raises(ValueError) as from_check:
        plans_module.check_plan_options(**options)
    assert str(from_check.value) == str(from_plan.value)


def test_check_plan_options_builds_nothing(monkeypatch):
    cache = plans_module.PlanCache(maxsize=8)
    monkeypatch.setattr(cache_module, "plan_cache", cache)
    for method in ("exact", "sampled", "auto"):
        plans_module.check_plan_options(method)
    assert len(cache) == 0 and cache.misses == 0


def test_check_plan_options_ignores_what_the_method_does_not_use():
    for method, unused in (("exact", dict(budget=1, num_permutations=0)), ("sampled", dict(budget=1))):
        plans_module.check_plan_options(method, **unused)
        of.make_plan(of.CoalitionStructure.from_sizes([2]), method, **unused)
