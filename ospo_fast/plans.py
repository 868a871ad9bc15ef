"""Which coalitions to evaluate, and how their values combine into Owen values.

A :class:`CoalitionPlan` is a game-independent recipe for one coalition structure:

* ``masks``: bool ``[C, n]``, the distinct coalitions whose values are needed, each once;
* a list of *terms* ``(player, plus, minus, weight)`` grouped by player (CSR ``player_ptr``), so that

      phi[i] = sum over the terms t of player i of  weight[t] * (v[plus[t]] - v[minus[t]])

  where ``v[c]`` is the value of coalition ``masks[c]``.

The exact plan enumerates the Owen formula; the sampled plan averages marginal contributions over
Owen-consistent orders. Both are aggregated by the same kernel (``owen.py``).

Coalitions are built as 64-bit masks (bit ``i`` = player ``i``), which is why structures stop at
:data:`~ospo_fast.structure.MAX_PLAYERS` players.

What is kept between calls is kept in :class:`PlanCache` objects, bounded and least-recently-used: the plans
of each structure in :data:`plan_cache` (exact plans, and sampled plans drawn from an int seed), and what
each plan or batch derives once (bit keys, boundary weights, device copies, prepared kernel calls) in its own
``cache``. Inspect them with ``len()``, ``hits`` and ``misses``; empty them with ``clear()``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import InitVar, dataclass, field
from typing import Callable, Hashable, TypeVar

import numpy as np
import torch

from . import defaults
from ._device import to_device_all
from .structure import CoalitionStructure

#: The exact plan refuses structures that need more coalitions than this unless the caller raises the cap
#: with ``max_exact_coalitions=`` (each coalition is one evaluation of the game: 4096 already take seconds
#: with a neural reward, 16 players in one union need 65536).
MAX_EXACT_COALITIONS = 1 << 12

#: The most coalitions ``max_exact_coalitions`` may admit: beyond it the plan alone needs gigabytes.
EXACT_COALITIONS_HARD_LIMIT = 1 << 20

#: The most orders a sampled plan may draw (each order adds up to ``n - 1`` coalitions to evaluate).
MAX_PERMUTATIONS = 1 << 16

#: Plans kept by :data:`plan_cache` (exact and int-seeded sampled plans, least recently used evicted first).
PLAN_CACHE_SIZE = 4096

#: Entries each plan keeps in its own cache: two host arrays, then a batch and a prepared kernel call per
#: values shape, device and dtype it is aggregated with (a training run sees a few).
PER_PLAN_CACHE_SIZE = 32

#: Device copies each :class:`PlanBatch` keeps (one per device and dtype).
PER_BATCH_CACHE_SIZE = 8

_U64 = np.uint64

_V = TypeVar("_V")
_MISSING = object()


class PlanCache:
    """A bounded cache that evicts the least recently used entry: the state plans keep between calls.

    ``get_or_build(key, build)`` returns the value kept under ``key`` (the same object on every hit), or calls
    ``build()``, keeps its result and, past ``maxsize`` entries, drops the entry used longest ago (never all at
    once). ``hits`` and ``misses`` count lookups since creation or the last :meth:`clear` (exactly, from one
    thread). Safe to share between threads: two threads that miss the same key may both build, and both get
    the value kept first.

    Args:
        maxsize: the most entries kept, a positive int.
    """

    __slots__ = ("maxsize", "hits", "misses", "_entries", "_lock")

    def __init__(self, maxsize: int):
        if isinstance(maxsize, bool) or not isinstance(maxsize, (int, np.integer)) or maxsize < 1:
            raise ValueError(f"maxsize: expected a positive int, got {maxsize!r}")
        self.maxsize = int(maxsize)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        """The value kept under ``key`` (now the most recently used), or ``default``."""
        # No lock: this is on every aggregation's path, and each OrderedDict call is atomic under the GIL.
        try:
            value = self._entries[key]
            self._entries.move_to_end(key)
        except KeyError:  # absent, or evicted by another thread in between
            self.misses += 1
            return default
        self.hits += 1
        return value

    def put(self, key: Hashable, value: _V) -> _V:
        """Keep ``value`` under ``key`` (replacing any), evicting the least recently used entry past ``maxsize``;
        returns ``value``."""
        with self._lock:
            self._entries[key] = value
            self._mark_used(key)
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], _V]) -> _V:
        """The value kept under ``key``; on a miss, ``build()``'s result, kept."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        value = build()  # outside the lock: building a plan can take long, and may use other caches
        with self._lock:
            kept = self._entries.setdefault(key, value)
            self._mark_used(key)
        return kept

    def _mark_used(self, key: Hashable) -> None:
        # The lock is held. Most recently used last; past maxsize the first (used longest ago) goes.
        self._entries.move_to_end(key)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset ``hits`` and ``misses``."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"PlanCache(maxsize={self.maxsize}, size={len(self)}, hits={self.hits}, misses={self.misses})"

    def __reduce__(self):
        # Copied or pickled (with its plan) empty: entries are derived, and hold device tensors and closures.
        return PlanCache, (self.maxsize,)


def _per_plan_cache() -> PlanCache:
    return PlanCache(PER_PLAN_CACHE_SIZE)


#: The plans of each structure: :func:`exact_plan` keys them by structure, :func:`sampled_plan` (int seed, no
#: ``rng``) by (structure, orders, seed, antithetic). ``plan_cache.clear()`` frees them all.
plan_cache = PlanCache(PLAN_CACHE_SIZE)


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
    the plans of :func:`exact_plan`, :func:`sampled_plan` and :func:`make_plans` are right by construction
    and skip the check.
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
    # Set only by this module's factories; an InitVar, so dataclasses.replace() does not carry it over.
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


# ----------------------------------------------------------------------------------------------------
# Shared construction: from (player, plus-mask, minus-mask, weight) terms given as 64-bit masks.


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int64)


def _plan_from_terms(
    structure: CoalitionStructure,
    player: np.ndarray,
    plus: np.ndarray,
    minus: np.ndarray,
    weight: np.ndarray,
    method: str,
    num_permutations: int = 0,
) -> CoalitionPlan:
    """Deduplicate coalitions and terms, order coalitions by size, group terms by player."""
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
        method=method,
        num_permutations=num_permutations,
        _trusted=True,
    )


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


# ----------------------------------------------------------------------------------------------------
# Exact plan


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
    :data:`EXACT_COALITIONS_HARD_LIMIT`. Plans are kept per structure in :data:`plan_cache`.
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
    return plan_cache.get_or_build(("exact", structure), lambda: _build_exact_plan(structure))


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
    return _plan_from_terms(structure, *_concat(players, plus, minus, weight), method="exact")


# ----------------------------------------------------------------------------------------------------
# Sampled plan


def owen_orders(
    structure: CoalitionStructure,
    num_permutations: int,
    seed: int = 0,
    antithetic: bool = True,
    *,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """int64 ``[K, n]``: Owen-consistent orders of the players.

    Unions arrive in a uniformly random order; the players of a union arrive together, in a uniformly
    random order. With ``antithetic`` every second order is the reverse of the one before it (the reverse
    of an Owen-consistent order is one too), which lowers the variance of the estimate.
    The draw uses numpy's PCG64 from ``seed``: the same seed gives the same orders on any machine. With
    ``rng`` (a :class:`numpy.random.Generator`; ``seed`` is then ignored) the orders are drawn from it and
    advance it: consecutive calls give fresh orders. ``rng=numpy.random.Generator(numpy.random.PCG64(s))``
    gives the orders of ``seed=s``.
    """
    _check_structure(structure)
    num_permutations = _check_num_permutations(num_permutations)
    seed = _check_seed(seed)
    _check_rng(rng)
    if rng is None:
        rng = np.random.Generator(np.random.PCG64(seed))
    n, m = structure.num_players, structure.num_unions
    drawn = _orders_drawn(num_permutations, antithetic)
    union_u = rng.random((drawn, m))
    inner_u = rng.random((drawn, n))
    union_of = np.asarray(structure.union_of, dtype=np.int64)
    orders = _drawn_orders(union_of[None], union_u[None], inner_u[None])[0]
    if antithetic:
        orders = np.stack([orders, orders[:, ::-1]], axis=1).reshape(2 * drawn, n)[:num_permutations]
    return orders


def _orders_drawn(K: int, antithetic: bool) -> int:
    """Orders drawn at random for K orders: half of them (rounded up) when the other half are reverses."""
    return (K + 1) // 2 if antithetic else K


def _drawn_orders(
    union_of: np.ndarray, union_u: np.ndarray, inner_u: np.ndarray, num_players: np.ndarray | None = None
) -> np.ndarray:
    """int64 ``[R, D, n]``: D Owen-consistent orders of each of R games, from their random keys.

    ``union_of``: int64 ``[R, n]``, each game's union of each player; ``union_u``: uniforms ``[R, D, m]``,
    the keys that order the unions; ``inner_u``: uniforms ``[R, D, n]``, the keys that order the players
    inside their union. With ``num_players`` (int64 ``[R]``) game r has only its first ``num_players[r]``
    players, and its unions' keys past its own are above 1: the padding players come last in every order.
    """
    R, D, n = inner_u.shape
    # Rank of each union in each order, then sort players by (rank of their union, key inside the union).
    union_rank = np.argsort(np.argsort(union_u, axis=-1, kind="stable"), axis=-1)
    player_union = np.broadcast_to(union_of[:, None, :], (R, D, n))
    sort_key = np.take_along_axis(union_rank, player_union, axis=-1) + inner_u
    if num_players is not None:
        sort_key[np.broadcast_to(np.arange(n) >= num_players[:, None, None], sort_key.shape)] = np.inf
    return np.argsort(sort_key, axis=-1, kind="stable")


def sampled_plan(
    structure: CoalitionStructure,
    num_permutations: int = defaults.NUM_PERMUTATIONS,
    seed: int = 0,
    antithetic: bool = True,
    *,
    rng: np.random.Generator | None = None,
) -> CoalitionPlan:
    """An unbiased Monte Carlo estimate of the Owen value from ``num_permutations`` Owen-consistent orders.

    Each order contributes the marginal contribution of every player to the players before it; its
    ``n - 1`` inner prefixes are coalitions to evaluate, the empty and grand coalitions are shared, and a
    coalition met in several orders is evaluated once.

    With an int ``seed`` (and no ``rng``) the plan is deterministic and kept in :data:`plan_cache` per
    (structure, K, seed, antithetic): every call returns the same orders, so averaging its estimates over
    calls does not remove their error. With ``rng`` (a :class:`numpy.random.Generator`) the orders are drawn
    fresh from it (see :func:`owen_orders`) and the plan is not cached: estimates of successive calls are
    independent, and their mean converges to the Owen value. Training should draw with an ``rng`` (as
    :class:`~ospo_fast.OwenAttributor` does).
    """
    _check_structure(structure)
    num_permutations = _check_num_permutations(num_permutations)
    seed = _check_seed(seed)
    _check_rng(rng)
    if rng is None:
        key = ("sampled", structure, num_permutations, seed, bool(antithetic))
        return plan_cache.get_or_build(key, lambda: _seeded_sampled_plan(*key[1:]))
    return _sampled_plan_from_orders(structure,
                                     owen_orders(structure, num_permutations, antithetic=antithetic, rng=rng))


def _seeded_sampled_plan(structure: CoalitionStructure, K: int, seed: int, antithetic: bool) -> CoalitionPlan:
    return _sampled_plan_from_orders(structure, owen_orders(structure, K, seed, antithetic))


#: Terms per vectorised construction of sampled plans (see :func:`_sampled_plans`).
_CHUNK_TERMS = 8192


def _sampled_plans(
    structures: list[CoalitionStructure], Ks: list[int], rng: np.random.Generator, antithetic: bool
) -> list[CoalitionPlan]:
    """Fresh sampled plans of many games at once: the same plans as ``sampled_plan(s, K, rng=rng)`` called
    for each (structure, K) in turn, from one draw of ``rng`` for all of them, with the orders and the
    plans built vectorised over the games (padded to the most players, unions and orders)."""
    R = len(structures)
    if R == 0:
        return []
    if R == 1:  # the same plan; for one game the vectorised construction's fixed cost does not pay
        return [sampled_plan(structures[0], Ks[0], antithetic=antithetic, rng=rng)]
    n = np.array([s.num_players for s in structures], dtype=np.int64)
    m = np.array([s.num_unions for s in structures], dtype=np.int64)
    K = np.array(Ks, dtype=np.int64)
    d = (K + 1) // 2 if antithetic else K  # orders drawn
    # Game r's uniforms come in stream order: [d_r, m_r] union keys, then [d_r, n_r] inner keys, as
    # owen_orders(rng=...) draws them. One call for all games; a double is one PCG64 output, so this is
    # the same stream as drawing game by game.
    start = _offsets(d * (m + n))
    uniforms = np.append(rng.random(int(start[-1])), 0.0)  # + a pad, read where nothing is drawn
    N, M, D = int(n.max()), int(m.max()), int(d.max())
    n_, m_, d_, start_ = n[:, None, None], m[:, None, None], d[:, None, None], start[:-1, None, None]
    j = np.arange(D)[None, :, None]
    k = np.arange(M)[None, None, :]
    i = np.arange(N)[None, None, :]
    union_ok = (j < d_) & (k < m_)
    union_u = np.where(union_ok, uniforms[np.where(union_ok, start_ + j * m_ + k, -1)], 2.0)  # pads rank last
    player_ok = (j < d_) & (i < n_)
    inner_u = uniforms[np.where(player_ok, start_ + d_ * m_ + j * n_ + i, -1)]
    union_of = np.zeros((R, N), dtype=np.int64)
    for r, s in enumerate(structures):
        union_of[r, : s.num_players] = s.union_of
    orders = _drawn_orders(union_of, union_u, inner_u, n)  # [R, D, N], each game's padding players last
    if antithetic:  # each order followed by its reverse (the padding left at the end)
        reverse = np.broadcast_to(np.where(i < n_, n_ - 1 - i, i), orders.shape)
        orders = np.stack([orders, np.take_along_axis(orders, reverse, axis=-1)], axis=2).reshape(R, 2 * D, N)
    orders = orders[:, : int(K.max())]
    bits = np.where(i < n_, _U64(1) << orders.astype(_U64), _U64(0))
    # prefix[..., j] is the coalition of the first j players: disjoint bits, so the sum is the union.
    prefixes = np.zeros(orders.shape[:2] + (N + 1,), dtype=_U64)
    np.cumsum(bits, axis=-1, dtype=_U64, out=prefixes[..., 1:])
    # Build in chunks of consecutive games of about _CHUNK_TERMS terms: one sort over many small plans
    # saves per-plan overhead, but over many large ones it costs more than sorting each alone.
    out: list[CoalitionPlan] = []
    chunk_of = np.cumsum(K * n) // _CHUNK_TERMS
    for lo, hi in _chunks(chunk_of):
        Kc, nc = K[lo:hi], n[lo:hi]
        out += _plans_from_prefixes(
            structures[lo:hi], orders[lo:hi, : int(Kc.max()), : int(nc.max())],
            prefixes[lo:hi, : int(Kc.max()), : int(nc.max()) + 1], nc, Kc,
        )
    return out


def _chunks(chunk_of: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of equal values of the non-decreasing ``chunk_of``."""
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    edges = [0, *bounds.tolist(), len(chunk_of)]
    return list(zip(edges[:-1], edges[1:]))


def _plans_from_prefixes(
    structures: list[CoalitionStructure], orders: np.ndarray, prefixes: np.ndarray, n: np.ndarray, K: np.ndarray
) -> list[CoalitionPlan]:
    """The sampled plans of R games from their orders (int64 ``[R, K_max, N]``, game r's first ``K[r]``
    orders of its first ``n[r]`` positions) and the orders' prefix coalitions (uint64 ``[R, K_max, N + 1]``):
    :func:`_sampled_plan_from_orders` for each game, with one pass of sorts for all of them."""
    R, K_max, N = orders.shape
    n_, K_ = n[:, None, None], K[:, None, None]
    k = np.arange(K_max)[None, :, None]
    i = np.arange(N + 1)[None, None, :]
    game = np.broadcast_to(np.arange(R)[:, None, None], prefixes.shape)
    # The coalitions: every prefix of every order (the empty and grand coalitions among them), each plan's
    # distinct ones sorted by (size, mask), found by one sort over (game, size, mask).
    is_prefix = (k < K_) & (i <= n_)
    key, key_game = prefixes[is_prefix], game[is_prefix]
    size = _popcount(key)
    n_max = int(n.max())
    size_bits = n_max.bit_length()
    if (R - 1).bit_length() + size_bits + n_max <= 64:  # (game, size, mask) packs into one uint64
        packed = (key_game.astype(_U64) << _U64(size_bits + n_max)) | (size.astype(_U64) << _U64(n_max)) | key
        packed, inverse = np.unique(packed, return_inverse=True)
        keys = packed & ((_U64(1) << _U64(n_max)) - _U64(1))
        keys_game = (packed >> _U64(size_bits + n_max)).astype(np.int64)
    else:
        order = np.lexsort((key, size, key_game))
        sorted_key, sorted_game = key[order], key_game[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (sorted_key[1:] != sorted_key[:-1]) | (sorted_game[1:] != sorted_game[:-1])
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        keys, keys_game = sorted_key[first], sorted_game[first]
    coalition_start = _offsets(np.bincount(keys_game, minlength=R))
    index = np.zeros(prefixes.shape, dtype=np.int64)  # each prefix's row in its plan
    index[is_prefix] = inverse.reshape(-1) - coalition_start[key_game]

    # Terms: player, plus = its prefix, minus = the one before; minus is fixed by (player, plus), so
    # identical terms are identical (game, player, plus) pairs, merged by one sort (CSR by player).
    is_term = is_prefix[..., 1:]
    term_game = game[..., 1:][is_term]
    player_start = _offsets(n)
    C = int(np.diff(coalition_start).max())
    term_key = (player_start[term_game] + orders[is_term]) * C + index[..., 1:][is_term]
    term_key, term_inverse = np.unique(term_key, return_inverse=True)
    term_inverse = term_inverse.reshape(-1)
    merged_weight = np.bincount(term_inverse, weights=(1.0 / K)[term_game], minlength=len(term_key))
    term_minus = np.empty(len(term_key), dtype=np.int64)
    term_minus[term_inverse] = index[..., :-1][is_term]
    global_player, term_plus = np.divmod(term_key, C)
    ptr = _offsets(np.bincount(global_player, minlength=int(player_start[-1])))

    # Cut each plan out (own copies: a plan does not hold on to the others' arrays).
    bits = ((keys[:, None] >> np.arange(n_max, dtype=_U64)) & _U64(1)).astype(bool)
    c_cut, p_cut, t_cut = coalition_start.tolist(), player_start.tolist(), ptr[player_start].tolist()
    out = []
    for r, structure in enumerate(structures):
        c0, c1, p0, p1, t0, t1 = c_cut[r], c_cut[r + 1], p_cut[r], p_cut[r + 1], t_cut[r], t_cut[r + 1]
        out.append(
            CoalitionPlan(
                structure=structure,
                masks=torch.from_numpy(bits[c0:c1, : p1 - p0].copy()),
                player_ptr=torch.from_numpy(ptr[p0 : p1 + 1] - t0),
                term_plus=torch.from_numpy(term_plus[t0:t1].copy()),
                term_minus=torch.from_numpy(term_minus[t0:t1].copy()),
                term_weight=torch.from_numpy(merged_weight[t0:t1].copy()),
                method="sampled",
                num_permutations=int(K[r]),
                _trusted=True,
            )
        )
    return out


def _sampled_plan_from_orders(structure: CoalitionStructure, orders: np.ndarray) -> CoalitionPlan:
    """The sampled plan of the orders ``[K, n]``: each player's marginal contribution in each, weight 1/K."""
    K, n = orders.shape
    bits = _U64(1) << orders.astype(_U64)
    # prefix[:, j] is the coalition of the first j players: disjoint bits, so the sum is the union.
    prefixes = np.cumsum(np.concatenate([np.zeros((K, 1), _U64), bits], axis=1), axis=1, dtype=_U64)
    return _plan_from_terms(
        structure,
        player=orders.reshape(-1),
        plus=prefixes[:, 1:].reshape(-1),
        minus=prefixes[:, :-1].reshape(-1),
        weight=np.full(K * n, 1.0 / K),
        method="sampled",
        num_permutations=K,
    )


# ----------------------------------------------------------------------------------------------------
# Choosing a plan


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
    ``n - 1`` coalitions; at most :data:`MAX_PERMUTATIONS`). ``num_permutations`` fixes K for ``sampled``
    (default 64). A sampled plan is drawn from ``seed`` (deterministic, cached) or, with ``rng`` (a
    :class:`numpy.random.Generator`), fresh from ``rng`` and not cached (see :func:`sampled_plan`). Exact
    plans are cached either way; ``exact`` refuses structures above ``max_exact_coalitions`` (see
    :func:`exact_plan`). Integer arguments accept Python and numpy integers, not bools.
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


def _sampled_orders(
    structure, method: str, budget: int, num_permutations: int | None, max_exact_coalitions: int
) -> int | None:
    """The number of orders K of ``method``'s sampled plan for ``structure``, or None for the exact plan."""
    if method == "exact":
        _check_structure(structure)
        return None
    if method == "sampled":
        _check_structure(structure)
        return _check_num_permutations(64 if num_permutations is None else num_permutations)
    if method == "auto":
        budget = _check_int(budget, "budget", "an int >= 2 (coalitions per response)", 2)
        _check_structure(structure)
        if num_exact_coalitions(structure) <= min(budget, _check_max_exact_coalitions(max_exact_coalitions)):
            return None
        if num_permutations is not None:
            return _check_num_permutations(num_permutations)
        per_order = max(structure.num_players - 1, 1)
        return min(max(1, (budget - 2) // per_order), MAX_PERMUTATIONS)  # a huge budget buys no more
    raise ValueError(f"method: expected 'exact', 'sampled' or 'auto', got {method!r}")


def _check_int(value, name: str, expected: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; numpy integers pass, bools and floats do not."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
    if not ok or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def _check_num_permutations(num_permutations) -> int:
    return _check_int(
        num_permutations, "num_permutations", f"a positive int up to MAX_PERMUTATIONS = {MAX_PERMUTATIONS}",
        1, MAX_PERMUTATIONS,
    )


def _check_seed(seed) -> int:
    return _check_int(seed, "seed", "a non-negative int", 0)


def _check_max_exact_coalitions(cap) -> int:
    return _check_int(
        cap, "max_exact_coalitions", f"an int in [1, EXACT_COALITIONS_HARD_LIMIT = {EXACT_COALITIONS_HARD_LIMIT}]",
        1, EXACT_COALITIONS_HARD_LIMIT,
    )


def _check_rng(rng) -> None:
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng: expected a numpy.random.Generator (e.g. numpy.random.default_rng(0)) or None, "
            f"got {type(rng).__name__}"
        )


def _check_structure(structure) -> None:
    if not isinstance(structure, CoalitionStructure):
        raise ValueError(
            f"structure: expected a CoalitionStructure, got {type(structure).__name__}; "
            "build one with CoalitionStructure([[0, 1], [2, 3]])"
        )


def _concat(*columns):
    out = []
    for parts, dtype in zip(columns, (np.int64, _U64, _U64, np.float64)):
        out.append(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    return out


# ----------------------------------------------------------------------------------------------------
# Many games at once


class PlanBatch:
    """Many games, each with its own plan, aggregated by one kernel launch.

    Game ``g`` owns ``values[value_offsets[g]:value_offsets[g+1]]`` (its plan's coalitions, in plan order)
    and ``phi[row_offsets[g]:row_offsets[g+1]]`` (its players). Distinct plans are stored once however
    many games share them: ``game_ptr_base[g]`` says where game g's plan starts in the concatenated CSR
    pointers ``player_ptr`` (already shifted into the concatenated term arrays).

    >>> batch = PlanBatch([exact_plan(s1), exact_plan(s2), exact_plan(s1)])
    >>> phi = owen_from_values(batch, values)      # values float [batch.num_values] -> float [batch.num_rows]
    >>> batch.split(phi)                           # list of float [n_g]
    """

    def __init__(self, plans):
        plans = list(plans)
        for g, plan in enumerate(plans):
            if not isinstance(plan, CoalitionPlan):
                raise ValueError(f"plans[{g}]: expected a CoalitionPlan, got {type(plan).__name__}")
        self.plans = plans
        slot_of: dict[int, int] = {}
        distinct: list[CoalitionPlan] = []
        for plan in plans:
            if id(plan) not in slot_of:
                slot_of[id(plan)] = len(distinct)
                distinct.append(plan)
        slot = np.array([slot_of[id(p)] for p in plans], dtype=np.int64)

        self.value_offsets = _offsets([p.num_coalitions for p in plans])
        self.row_offsets = _offsets([p.num_players for p in plans])
        term_base = _offsets([p.num_terms for p in distinct])
        ptr_base = _offsets([p.num_players + 1 for p in distinct])
        self.game_ptr_base = ptr_base[:-1][slot]
        self.player_ptr = np.concatenate(
            [np.zeros(0, np.int64)] + [p.player_ptr.numpy() + term_base[j] for j, p in enumerate(distinct)]
        )
        self.term_plus = _cat_tensors([p.term_plus for p in distinct], torch.int64)
        self.term_minus = _cat_tensors([p.term_minus for p in distinct], torch.int64)
        self.term_weight = _cat_tensors([p.term_weight for p in distinct], torch.float64)
        # Most terms of one row: consecutive pointers of one plan differ by its rows' term counts, and across
        # two plans by 0 (a plan's last pointer is the next one's first), so one diff covers every plan.
        self.max_terms_per_row = int(np.diff(self.player_ptr).max()) if len(self.player_ptr) > 1 else 0
        #: The device copies of :meth:`kernel_args`, one per device and dtype.
        self.cache = PlanCache(PER_BATCH_CACHE_SIZE)

    @classmethod
    def repeat(cls, plan: CoalitionPlan, num_games: int) -> "PlanBatch":
        """``num_games`` games sharing one plan (values laid out as ``[num_games, C]``)."""
        return cls([plan] * num_games)

    @property
    def num_games(self) -> int:
        return len(self.plans)

    @property
    def num_values(self) -> int:
        return int(self.value_offsets[-1])

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets[-1])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat per-row tensor ``[num_rows, ...]`` into the games' pieces ``[n_g, ...]``."""
        return list(torch.split(flat, np.diff(self.row_offsets).tolist()))

    def split_values(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat per-coalition tensor ``[num_values, ...]`` into the games' pieces ``[C_g, ...]``."""
        return list(torch.split(flat, np.diff(self.value_offsets).tolist()))

    def kernel_args(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, term_weight)``
        on ``device``, weights in ``dtype``: the arguments every aggregation backend takes after the values.
        Copied once per device and dtype (kept in :attr:`cache`)."""
        return self.cache.get_or_build((str(device), dtype), lambda: self._kernel_args(device, dtype))

    def _kernel_args(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        host = (
            torch.from_numpy(self.value_offsets),
            torch.from_numpy(self.row_offsets),
            torch.from_numpy(self.game_ptr_base),
            torch.from_numpy(self.player_ptr),
            self.term_plus,
            self.term_minus,
            self.term_weight.to(dtype),
        )
        return tuple(to_device_all(host, device))


def _offsets(sizes) -> np.ndarray:
    """int64 ``[len(sizes) + 1]``: 0 then the running sums."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=out[1:])
    return out


def _cat_tensors(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(tensors).to(dtype) if tensors else torch.zeros(0, dtype=dtype)
