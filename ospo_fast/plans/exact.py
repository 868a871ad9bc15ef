"""The exact plan: every coalition the Owen formula needs, each once, with the Owen weights.

Exact plans involve no randomness, so each structure's plan is built once and kept in
:data:`~ospo_fast.plans.plan_cache`. Their size grows as ``2^m`` in the unions and ``2^p`` in a union's
players, hence the caps below.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._checks import check_int
from ..structure import CoalitionStructure
from . import cache
from .plan import _U64, CoalitionPlan, _check_structure, _offsets, _popcount

#: The exact plan refuses structures that need more coalitions than this unless the caller raises the cap
#: with ``max_exact_coalitions=`` (each coalition is one evaluation of the game: 4096 already take seconds
#: with a neural reward, 16 players in one union need 65536).
MAX_EXACT_COALITIONS = 1 << 12

#: The most coalitions ``max_exact_coalitions`` may admit: beyond it the plan alone needs gigabytes.
EXACT_COALITIONS_HARD_LIMIT = 1 << 20


def _check_max_exact_coalitions(cap) -> int:
    return check_int(
        cap, "max_exact_coalitions", 1, EXACT_COALITIONS_HARD_LIMIT,
        expected=f"an int in [1, EXACT_COALITIONS_HARD_LIMIT = {EXACT_COALITIONS_HARD_LIMIT}]",
    )


def num_exact_coalitions(structure: CoalitionStructure) -> int:
    """Distinct coalitions the exact Owen value needs: ``2^m + sum_k 2^(m-1) (2^(p_k) - 2)``."""
    m = structure.num_unions
    return (1 << m) + sum((1 << (m - 1)) * ((1 << p) - 2) for p in structure.union_sizes)


def exact_plan(
    structure: CoalitionStructure, *, max_exact_coalitions: int = MAX_EXACT_COALITIONS
) -> CoalitionPlan:
    """Every coalition the exact Owen value needs, each once, with the Owen weights.

    For player ``i`` in union ``P_k`` the terms are, for every set ``R`` of other unions and every
    ``T ⊆ P_k \\ {i}``: weight ``r!(m-r-1)!/m! * t!(p-t-1)!/p!`` on ``v(Q_R ∪ T ∪ {i}) - v(Q_R ∪ T)``.
    Structures that need more than ``max_exact_coalitions`` coalitions (default
    :data:`MAX_EXACT_COALITIONS`, 4096) are refused; a caller who means it may raise the cap up to
    :data:`EXACT_COALITIONS_HARD_LIMIT`. Plans are kept per structure in :data:`~ospo_fast.plans.plan_cache`.
    """
    _check_structure(structure)
    cap = _check_max_exact_coalitions(max_exact_coalitions)
    count = num_exact_coalitions(structure)
    if count > cap:
        hint = f", or pass max_exact_coalitions={count} to force it" if count <= EXACT_COALITIONS_HARD_LIMIT else ""
        raise ValueError(
            f"structure: the exact Owen value of {structure} needs {count} coalitions, above "
            f"max_exact_coalitions={cap}; use method='sampled' (or 'auto' with a budget){hint}"
        )
    return cache.plan_cache.get_or_build(("exact", structure), lambda: _build_exact_plan(structure))


def _build_exact_plan(structure: CoalitionStructure) -> CoalitionPlan:
    m = structure.num_unions
    union_masks = _union_masks(structure)
    players, plus, minus, weight = [], [], [], []
    for k, union in enumerate(structure.unions):
        p = len(union)
        others = np.delete(union_masks, k)
        outer_masks, r = _subset_masks(others)  # Q_R for R ⊆ M \ {k}
        outer_weight = 1.0 / (m * np.array([math.comb(m - 1, int(x)) for x in r]))
        member_masks = np.array([_U64(1) << _U64(q) for q in union], dtype=_U64)
        for j, player in enumerate(union):
            inner_masks, t = _subset_masks(np.delete(member_masks, j))  # T ⊆ P_k \ {i}
            inner_weight = 1.0 / (p * np.array([math.comb(p - 1, int(x)) for x in t]))
            without = (outer_masks[:, None] | inner_masks[None, :]).reshape(-1)
            players.append(np.full(without.shape, player, dtype=np.int64))
            minus.append(without)
            plus.append(without | member_masks[j])
            weight.append(np.outer(outer_weight, inner_weight).reshape(-1))
    return _plan_from_terms(structure, *_concat(players, plus, minus, weight))


def _union_masks(structure: CoalitionStructure) -> np.ndarray:
    """uint64 ``[m]``: the mask of each union."""
    out = np.zeros(structure.num_unions, dtype=_U64)
    for k, union in enumerate(structure.unions):
        for p in union:
            out[k] |= _U64(1) << _U64(p)
    return out


def _subset_masks(element_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All unions of subsets of ``element_masks`` (uint64 ``[e]``): masks ``[2^e]`` and subset sizes."""
    e = len(element_masks)
    subsets = np.arange(1 << e, dtype=np.int64)
    chosen = ((subsets[:, None] >> np.arange(e)) & 1).astype(bool)
    masks = np.bitwise_or.reduce(np.where(chosen, element_masks[None, :], _U64(0)), axis=1)
    return masks.astype(_U64), chosen.sum(axis=1)


def _concat(*columns):
    out = []
    for parts, dtype in zip(columns, (np.int64, _U64, _U64, np.float64)):
        out.append(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    return out


def _plan_from_terms(
    structure: CoalitionStructure,
    player: np.ndarray,
    plus: np.ndarray,
    minus: np.ndarray,
    weight: np.ndarray,
) -> CoalitionPlan:
    """The plan of terms given as (player, plus mask, minus mask, weight) columns: coalitions and terms
    deduplicated, coalitions ordered by size, terms grouped by player."""
    n = structure.num_players
    full = _U64((1 << n) - 1) if n < 64 else ~_U64(0)
    # Empty and grand coalitions are always in a plan: callers use them as v(empty) and v(N).
    keys = np.concatenate([plus, minus, np.array([0, full], dtype=_U64)])
    keys = np.unique(keys)
    keys = keys[np.lexsort((keys, _popcount(keys)))]  # by size, then by mask
    lookup = np.argsort(keys)  # keys is a permutation of the sorted unique keys
    sorted_keys = keys[lookup]
    plus_idx = lookup[np.searchsorted(sorted_keys, plus)]
    minus_idx = lookup[np.searchsorted(sorted_keys, minus)]

    # Merge identical (player, plus, minus) terms; sort terms by player for the CSR layout.
    C = len(keys)
    term_key = (player.astype(np.int64) * C + plus_idx) * C + minus_idx
    term_key, inverse = np.unique(term_key, return_inverse=True)
    merged_weight = np.zeros(len(term_key), dtype=np.float64)
    np.add.at(merged_weight, inverse.reshape(-1), weight)
    term_player, rest = np.divmod(term_key, C * C)
    term_plus, term_minus = np.divmod(rest, C)
    player_ptr = _offsets(np.bincount(term_player, minlength=n))

    bits = (keys[:, None] >> np.arange(n, dtype=_U64)) & _U64(1)
    return CoalitionPlan(
        structure=structure,
        masks=torch.from_numpy(bits.astype(bool)),
        player_ptr=torch.from_numpy(player_ptr),
        term_plus=torch.from_numpy(term_plus.astype(np.int64)),
        term_minus=torch.from_numpy(term_minus.astype(np.int64)),
        term_weight=torch.from_numpy(merged_weight),
        method="exact",
        _trusted=True,
    )
