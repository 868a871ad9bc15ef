"""The coalition plan: which coalitions of one structure to evaluate, and the terms that make Owen values.

A :class:`CoalitionPlan` is game-independent: ``masks`` (bool ``[C, n]``) are the distinct coalitions whose
values are needed, each once, and the terms ``(player, plus, minus, weight)``, grouped by player (CSR
``player_ptr``), give

    phi[i] = sum over the terms t of player i of  weight[t] * (v[plus[t]] - v[minus[t]])

where ``v[c]`` is the value of coalition ``masks[c]``. Exact and sampled plans (``exact.py``, ``sampled.py``)
are both this one layout, aggregated by one kernel (:mod:`ospo_fast.aggregation`). Coalitions are built as
64-bit masks (bit ``i`` = player ``i``), which is why structures stop at
:data:`~ospo_fast.structure.MAX_PLAYERS` players.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from ..structure import CoalitionStructure
from .cache import PER_PLAN_CACHE_SIZE, PlanCache

_U64 = np.uint64


def _per_plan_cache() -> PlanCache:
    return PlanCache(PER_PLAN_CACHE_SIZE)


@dataclass(frozen=True, eq=False)
class CoalitionPlan:
    """The coalitions to evaluate for one structure and the terms that turn their values into Owen values.

    Attributes:
        structure: the coalition structure the plan is for.
        masks: bool ``[C, n]``, distinct coalitions; row ``empty_index`` is the empty coalition and row
            ``full_index`` the grand coalition (both always present when ``n > 0``).
        player_ptr: int64 ``[n + 1]``, terms of player ``i`` are ``player_ptr[i]:player_ptr[i + 1]``.
        term_plus, term_minus: int64 ``[T]``, coalition rows with and without the player.
        term_weight: float64 ``[T]``.
        method: ``"exact"`` or ``"sampled"``.
        num_permutations: orders drawn (sampled plans), else 0.
        cache: a :class:`PlanCache` (at most :data:`PER_PLAN_CACHE_SIZE` entries) of what the plan derives
            once: its bit keys, boundary weights, and per values shape, device and dtype the batch and the
            prepared kernel call of :func:`~ospo_fast.owen.owen_from_values`. Not part of the plan's identity:
            ``dataclasses.replace`` gives the new plan an empty one.

    A plan built by hand is checked once, here (the kernels index the values with its terms unchecked);
    the plans of :func:`~ospo_fast.plans.exact_plan`, :func:`~ospo_fast.plans.sampled_plan` and
    :func:`~ospo_fast.plans.make_plans` are right by construction and skip the check.
    """

    structure: CoalitionStructure
    masks: torch.Tensor
    player_ptr: torch.Tensor
    term_plus: torch.Tensor
    term_minus: torch.Tensor
    term_weight: torch.Tensor
    method: str
    num_permutations: int = 0
    # Not an init argument: dataclasses.replace() gives the new plan its own cache.
    cache: PlanCache = field(default_factory=_per_plan_cache, init=False, repr=False, compare=False)
    # Set only by this package's factories; an InitVar, so dataclasses.replace() does not carry it over.
    _trusted: InitVar[bool] = False

    def __post_init__(self, _trusted: bool) -> None:
        if not _trusted:
            _validate_plan(self)

    @property
    def num_coalitions(self) -> int:
        return self.masks.shape[0]

    @property
    def num_players(self) -> int:
        return self.structure.num_players

    @property
    def num_terms(self) -> int:
        return self.term_plus.shape[0]

    @property
    def empty_index(self) -> int:
        return 0  # coalitions are sorted by size, so the empty one comes first

    @property
    def full_index(self) -> int:
        return self.num_coalitions - 1  # ... and the grand coalition last

    def coalition_keys(self) -> np.ndarray:
        """int64 ``[C]``: each coalition as a bit mask (bit i: player i is in it); kept in :attr:`cache`."""
        return self.cache.get_or_build("keys", self._coalition_keys)

    def _coalition_keys(self) -> np.ndarray:
        bits = np.left_shift(np.uint64(1), np.arange(self.num_players, dtype=np.uint64))
        return (self.masks.numpy() * bits).sum(axis=1, dtype=np.uint64).view(np.int64)

    @property
    def term_player(self) -> torch.Tensor:
        """int64 ``[T]``: the player of each term."""
        counts = self.player_ptr.diff()
        return torch.repeat_interleave(torch.arange(self.num_players), counts)

    def boundary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ``([n], [n])``: the weight of v(N) and of v(empty) in each player's value (rows
        ``full_index`` and ``empty_index`` of :meth:`weight_matrix`); kept in :attr:`cache`. Each sums to
        +1 and -1 over the players (efficiency). Exact plans: ``1 / (m |U_i|)`` and its negative; sampled
        plans: the share of orders in which the player comes last, and first (negated)."""
        return self.cache.get_or_build("boundary", self._boundary_weights)

    def _boundary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        player = self.term_player
        full = torch.zeros(self.num_players, dtype=torch.float64)
        empty = torch.zeros(self.num_players, dtype=torch.float64)
        on_full, on_empty = self.term_plus == self.full_index, self.term_minus == self.empty_index
        full.index_add_(0, player[on_full], self.term_weight[on_full])
        empty.index_add_(0, player[on_empty], -self.term_weight[on_empty])
        return full, empty

    def weight_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense Owen weight matrix ``W`` (``[C, n]``) with ``phi = values @ W``."""
        W = torch.zeros(self.num_coalitions, self.num_players, dtype=torch.float64)
        player = self.term_player
        W.index_put_((self.term_plus, player), self.term_weight, accumulate=True)
        W.index_put_((self.term_minus, player), -self.term_weight, accumulate=True)
        return W.to(dtype)

    def __repr__(self) -> str:
        return (
            f"CoalitionPlan(method={self.method!r}, players={self.num_players}, "
            f"coalitions={self.num_coalitions}, terms={self.num_terms})"
        )


def _validate_plan(plan: CoalitionPlan) -> None:
    """Raise ValueError naming the first field of a hand-built plan that the kernels could not trust."""

    def fail(name: str, expected: str, got) -> None:
        raise ValueError(f"CoalitionPlan.{name}: expected {expected}, got {got}")

    def tensor(name: str, dtype: torch.dtype, dim: int) -> torch.Tensor:
        t = getattr(plan, name)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != dim or t.device.type != "cpu":
            got = f"{t.dtype} {t.dim()}-D on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            fail(name, f"a {dim}-D {dtype} CPU tensor", got)
        return t

    if not isinstance(plan.structure, CoalitionStructure):
        fail("structure", "a CoalitionStructure", type(plan.structure).__name__)
    n = plan.structure.num_players
    masks = tensor("masks", torch.bool, 2)
    if masks.shape[0] < 1 or masks.shape[1] != n:
        fail("masks", f"shape (C >= 1, {n}) for {n} players", tuple(masks.shape))
    if bool(masks[0].any()) or not bool(masks[-1].all()):
        fail("masks", "the empty coalition in the first row and the grand coalition in the last", "other rows")
    C = masks.shape[0]
    plus, minus = tensor("term_plus", torch.int64, 1), tensor("term_minus", torch.int64, 1)
    weight = tensor("term_weight", torch.float64, 1)
    T = plus.shape[0]
    for name, t in (("term_minus", minus), ("term_weight", weight)):
        if t.shape[0] != T:
            fail(name, f"{T} entries, one per term like term_plus", t.shape[0])
    ptr = tensor("player_ptr", torch.int64, 1)
    if ptr.shape[0] != n + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != T or bool((ptr.diff() < 0).any()):
        fail("player_ptr", f"{n + 1} non-decreasing offsets from 0 to the number of terms {T}", ptr.tolist()[:12])
    for name, t in (("term_plus", plus), ("term_minus", minus)):
        if T and (int(t.min()) < 0 or int(t.max()) >= C):
            fail(name, f"coalition rows in [0, {C})", f"values in [{int(t.min())}, {int(t.max())}]")
    if not bool(torch.isfinite(weight).all()):
        fail("term_weight", "finite weights", "NaN or infinite entries")
    if plan.method not in ("exact", "sampled"):
        fail("method", "'exact' or 'sampled'", repr(plan.method))
    K = plan.num_permutations
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        fail("num_permutations", "a non-negative int", repr(K))


def _check_structure(structure) -> None:
    if not isinstance(structure, CoalitionStructure):
        raise ValueError(
            f"structure: expected a CoalitionStructure, got {type(structure).__name__}; "
            "build one with CoalitionStructure([[0, 1], [2, 3]])"
        )


def _popcount(x: np.ndarray) -> np.ndarray:
    """int64: the number of set bits (players) of each uint64 mask."""
    return np.bitwise_count(x).astype(np.int64)


def _offsets(sizes) -> np.ndarray:
    """int64 ``[len(sizes) + 1]``: 0 then the running sums."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=out[1:])
    return out
