"""Choosing a plan: :func:`make_plan` / :func:`make_plans` turn the options (``method``, ``budget``,
``num_permutations``, ...) into exact or sampled plans, and :func:`check_plan_options` checks those options
without building anything."""

from __future__ import annotations

import numpy as np

from .. import defaults
from .._checks import check_int
from ..structure import CoalitionStructure
from .exact import MAX_EXACT_COALITIONS, _check_max_exact_coalitions, exact_plan, num_exact_coalitions
from .plan import CoalitionPlan, _check_structure
from .sampled import (
    MAX_PERMUTATIONS,
    _check_num_permutations,
    _check_rng,
    _check_seed,
    _sampled_plans,
    sampled_plan,
)

_METHODS = ("exact", "sampled", "auto")


def make_plan(
    structure: CoalitionStructure,
    method: str = "auto",
    *,
    budget: int = defaults.PLAN_BUDGET,
    num_permutations: int | None = None,
    seed: int = 0,
    antithetic: bool = True,
    rng: np.random.Generator | None = None,
    max_exact_coalitions: int = MAX_EXACT_COALITIONS,
) -> CoalitionPlan:
    """The plan for ``method`` in ``"exact" | "sampled" | "auto"``.

    ``auto`` is exact when the exact plan needs at most ``budget`` (and ``max_exact_coalitions``)
    coalitions, and otherwise sampled with as many orders as fit the budget (each order adds at most
    ``n - 1`` coalitions; at most :data:`~ospo_fast.plans.MAX_PERMUTATIONS`). ``num_permutations`` fixes K
    for ``sampled`` (default 64). A sampled plan is drawn from ``seed`` (deterministic, cached) or, with
    ``rng`` (a :class:`numpy.random.Generator`), fresh from ``rng`` and not cached (see
    :func:`~ospo_fast.plans.sampled_plan`). Exact plans are cached either way; ``exact`` refuses structures
    above ``max_exact_coalitions`` (see :func:`~ospo_fast.plans.exact_plan`). Integer arguments accept Python
    and numpy integers, not bools.
    """
    seed = _check_seed(seed)
    _check_max_exact_coalitions(max_exact_coalitions)
    _check_rng(rng)
    K = _sampled_orders(structure, method, budget, num_permutations, max_exact_coalitions)
    if K is None:
        return exact_plan(structure, max_exact_coalitions=max_exact_coalitions)
    return sampled_plan(structure, K, seed, antithetic, rng=rng)


def make_plans(
    structures,
    method: str = "auto",
    *,
    budget: int = defaults.PLAN_BUDGET,
    num_permutations: int | None = None,
    seed: int = 0,
    antithetic: bool = True,
    rng: np.random.Generator | None = None,
    max_exact_coalitions: int = MAX_EXACT_COALITIONS,
) -> list[CoalitionPlan]:
    """``[make_plan(s, method, ..., rng=rng) for s in structures]``, with every sampled plan drawn at once.

    With ``rng`` the structures that need a sampled plan take their orders from ``rng`` in list order, in
    one draw, exactly as successive ``make_plan`` calls would (same plans, same state of ``rng`` after);
    the orders and the plans are then built vectorised over all of them. A structure listed twice gets two
    independent draws. Without ``rng``, each plan comes from ``seed`` (cached).
    """
    seed = _check_seed(seed)
    _check_max_exact_coalitions(max_exact_coalitions)
    _check_rng(rng)
    structures = list(structures)
    options = dict(budget=budget, num_permutations=num_permutations, max_exact_coalitions=max_exact_coalitions)
    if rng is None:
        return [make_plan(s, method, seed=seed, antithetic=antithetic, **options) for s in structures]
    Ks = [_sampled_orders(s, method, budget, num_permutations, max_exact_coalitions) for s in structures]
    sampled = [r for r, K in enumerate(Ks) if K is not None]
    out = [
        exact_plan(s, max_exact_coalitions=max_exact_coalitions) if K is None else None for s, K in zip(structures, Ks)
    ]
    drawn = _sampled_plans([structures[r] for r in sampled], [Ks[r] for r in sampled], rng, bool(antithetic))
    for r, plan in zip(sampled, drawn):
        out[r] = plan
    return out


def check_plan_options(
    method: str = "auto",
    budget: int = defaults.PLAN_BUDGET,
    num_permutations: int | None = None,
    antithetic: bool = True,
    max_exact_coalitions: int = MAX_EXACT_COALITIONS,
) -> None:
    """Raise the ValueError that :func:`make_plan` would raise for these options, for any structure, without
    building a plan: ``method``; ``max_exact_coalitions``; ``budget`` for ``"auto"``; ``num_permutations``
    for ``"sampled"``, and for ``"auto"`` when given (a structure beyond the budget uses it). Options the
    method does not use are not checked, as :func:`make_plan` ignores them; ``antithetic`` is taken as a
    truth value, as there."""
    _check_max_exact_coalitions(max_exact_coalitions)
    _check_method(method)
    if method == "auto":
        _check_budget(budget)
    if method == "sampled" or (method == "auto" and num_permutations is not None):
        _check_num_permutations(defaults.NUM_PERMUTATIONS if num_permutations is None else num_permutations)


def _sampled_orders(
    structure, method: str, budget: int, num_permutations: int | None, max_exact_coalitions: int
) -> int | None:
    """The number of orders K of ``method``'s sampled plan for ``structure``, or None for the exact plan."""
    _check_method(method)
    if method == "auto":
        budget = _check_budget(budget)
    _check_structure(structure)
    if method == "exact":
        return None
    if method == "sampled":
        return _check_num_permutations(defaults.NUM_PERMUTATIONS if num_permutations is None else num_permutations)
    if num_exact_coalitions(structure) <= min(budget, _check_max_exact_coalitions(max_exact_coalitions)):
        return None
    if num_permutations is not None:
        return _check_num_permutations(num_permutations)
    per_order = max(structure.num_players - 1, 1)
    return min(max(1, (budget - 2) // per_order), MAX_PERMUTATIONS)  # a huge budget buys no more


def _check_method(method) -> None:
    if method not in _METHODS:
        raise ValueError(f"method: expected 'exact', 'sampled' or 'auto', got {method!r}")


def _check_budget(budget) -> int:
    return check_int(budget, "budget", 2, expected="an int >= 2 (coalitions per response)")
