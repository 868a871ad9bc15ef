"""The sampled plan: an unbiased estimate of the Owen value from Owen-consistent orders of the players.

One construction serves one structure and many: :func:`sampled_plan` is a batch of one of
:func:`_sampled_plans`, which draws the orders of all games from one generator in one call (the same
stream as drawing them game by game) and builds their plans with one pass of sorts, vectorised over the
games (padded to the most players, unions and orders). Plans from an int seed are kept in
:data:`~ospo_fast.plans.plan_cache`; plans drawn from a :class:`numpy.random.Generator` are fresh and not kept.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import defaults
from .._checks import check_int
from ..structure import CoalitionStructure
from . import cache
from .plan import _U64, CoalitionPlan, _check_structure, _offsets, _popcount

#: The most orders a sampled plan may draw (each order adds up to ``n - 1`` coalitions to evaluate).
MAX_PERMUTATIONS = 1 << 16

#: Terms per vectorised construction of sampled plans (see :func:`_sampled_plans`).
_CHUNK_TERMS = 8192


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
    n, K = np.array([structure.num_players]), np.array([num_permutations])
    return _draw_orders([structure], n, K, rng, antithetic)[0]


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

    With an int ``seed`` (and no ``rng``) the plan is deterministic and kept in
    :data:`~ospo_fast.plans.plan_cache` per (structure, K, seed, antithetic): every call returns the same
    orders, so averaging its estimates over calls does not remove their error. With ``rng`` (a
    :class:`numpy.random.Generator`) the orders are drawn fresh from it (see :func:`owen_orders`) and the
    plan is not cached: estimates of successive calls are independent, and their mean converges to the Owen
    value. Training should draw with an ``rng`` (as :class:`~ospo_fast.OwenAttributor` does).
    """
    _check_structure(structure)
    num_permutations = _check_num_permutations(num_permutations)
    seed = _check_seed(seed)
    _check_rng(rng)
    if rng is None:
        key = ("sampled", structure, num_permutations, seed, bool(antithetic))
        return cache.plan_cache.get_or_build(key, lambda: _sampled_plans(
            [structure], [num_permutations], np.random.Generator(np.random.PCG64(seed)), bool(antithetic))[0])
    return _sampled_plans([structure], [num_permutations], rng, bool(antithetic))[0]


def _check_num_permutations(num_permutations) -> int:
    return check_int(
        num_permutations, "num_permutations", 1, MAX_PERMUTATIONS,
        expected=f"a positive int up to MAX_PERMUTATIONS = {MAX_PERMUTATIONS}",
    )


def _check_seed(seed) -> int:
    return check_int(seed, "seed", 0)


def _check_rng(rng) -> None:
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng: expected a numpy.random.Generator (e.g. numpy.random.default_rng(0)) or None, "
            f"got {type(rng).__name__}"
        )


def _sampled_plans(
    structures: list[CoalitionStructure], Ks: list[int], rng: np.random.Generator, antithetic: bool
) -> list[CoalitionPlan]:
    """Fresh sampled plans of the games ``(structures[r], Ks[r])``, from one draw of ``rng`` for all of them
    (the same orders, and the same state of ``rng`` after, as drawing them game by game, in list order)."""
    if not structures:
        return []
    n = np.array([s.num_players for s in structures], dtype=np.int64)
    K = np.array(Ks, dtype=np.int64)
    orders = _draw_orders(structures, n, K, rng, antithetic)
    # Build in chunks of consecutive games of about _CHUNK_TERMS terms: one sort over many small plans
    # saves per-plan overhead, but over many large ones it costs more than sorting each alone.
    out: list[CoalitionPlan] = []
    for lo, hi in _chunks(np.cumsum(K * n) // _CHUNK_TERMS):
        out += _plans_from_orders(structures[lo:hi], orders[lo:hi], n[lo:hi], K[lo:hi])
    return out


def _draw_orders(
    structures: list[CoalitionStructure], n: np.ndarray, K: np.ndarray, rng: np.random.Generator, antithetic: bool
) -> np.ndarray:
    """int64 ``[R, K_max, N]``: ``K[r]`` Owen-consistent orders of each game's ``n[r]`` players (positions past
    ``K[r]`` or ``n[r]`` are padding; each game's padding players come last in its orders).

    Each order sorts the players by (rank of their union, a key inside the union), from uniform keys: game
    r's come in stream order, ``[d_r, m_r]`` union keys then ``[d_r, n_r]`` inner keys, ``d_r`` the orders
    drawn (half of ``K[r]``, rounded up, when the other half are reverses). One call of ``rng`` for all
    games: a double is one PCG64 output, so this is the same stream as drawing game by game.
    """
    R = len(structures)
    m = np.array([s.num_unions for s in structures], dtype=np.int64)
    d = (K + 1) // 2 if antithetic else K  # orders drawn
    start = _offsets(d * (m + n))
    uniforms = np.append(rng.random(int(start[-1])), 0.0)  # + a pad, read where nothing is drawn
    N, M, D = int(n.max()), int(m.max()), int(d.max())
    n_, m_, d_, start_ = n[:, None, None], m[:, None, None], d[:, None, None], start[:-1, None, None]
    game, j = np.arange(R)[:, None, None], np.arange(D)[None, :, None]
    k = np.arange(M)[None, None, :]
    i = np.arange(N)[None, None, :]
    union_ok = (j < d_) & (k < m_)
    union_u = np.where(union_ok, uniforms[np.where(union_ok, start_ + j * m_ + k, -1)], 2.0)  # pads rank last
    player_ok = (j < d_) & (i < n_)
    inner_u = uniforms[np.where(player_ok, start_ + d_ * m_ + j * n_ + i, -1)]
    union_of = np.zeros((R, 1, N), dtype=np.int64)
    for r, s in enumerate(structures):
        union_of[r, 0, : s.num_players] = s.union_of
    # Rank of each union in each order, then sort players by (rank of their union, key inside the union).
    union_rank = np.argsort(np.argsort(union_u, axis=-1, kind="stable"), axis=-1)
    sort_key = np.where(i < n_, union_rank[game, j, union_of] + inner_u, np.inf)
    orders = np.argsort(sort_key, axis=-1, kind="stable")
    if antithetic:  # each order followed by its reverse (the padding left at the end)
        reverse = np.where(i < n_, n_ - 1 - i, i)
        orders = np.stack([orders, orders[game, j, reverse]], axis=2).reshape(R, 2 * D, N)
    return orders[:, : int(K.max())]


def _chunks(chunk_of: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of equal values of the non-decreasing ``chunk_of``."""
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    edges = [0, *bounds.tolist(), len(chunk_of)]
    return list(zip(edges[:-1], edges[1:]))


def _plans_from_orders(
    structures: list[CoalitionStructure], orders: np.ndarray, n: np.ndarray, K: np.ndarray
) -> list[CoalitionPlan]:
    """The sampled plans of R games from their orders (int64 ``[R, >= K_max, >= N]``, game r's first ``K[r]``
    orders of its first ``n[r]`` positions): the marginal contribution of each player in each order, weight
    ``1 / K[r]``, identical terms merged, with one pass of sorts for all games."""
    R, K_max, N = len(structures), int(K.max()), int(n.max())
    orders = orders[:, :K_max, :N]
    n_, K_ = n[:, None, None], K[:, None, None]
    k = np.arange(K_max)[None, :, None]
    i = np.arange(N + 1)[None, None, :]
    player_bits = np.where(i[..., :-1] < n_, _U64(1) << orders.astype(_U64), _U64(0))
    # prefix[..., j] is the coalition of the first j players: disjoint bits, so the sum is the union.
    prefixes = np.zeros((R, K_max, N + 1), dtype=_U64)
    np.cumsum(player_bits, axis=-1, dtype=_U64, out=prefixes[..., 1:])
    # The coalitions: every prefix of every order (the empty and grand coalitions among them), each plan's
    # distinct ones sorted by (size, mask), found by one sort over (game, size, mask).
    is_prefix = (k < K_) & (i <= n_)
    key, key_game = prefixes[is_prefix], np.repeat(np.arange(R), K * (n + 1))  # game-major, as the mask reads
    size = _popcount(key)
    size_bits = N.bit_length()
    if (R - 1).bit_length() + size_bits + N <= 64:  # (game, size, mask) packs into one uint64
        packed = (key_game.astype(_U64) << _U64(size_bits + N)) | (size.astype(_U64) << _U64(N)) | key
        packed, inverse = np.unique(packed, return_inverse=True)
        keys = packed & ((_U64(1) << _U64(N)) - _U64(1))
        keys_game = (packed >> _U64(size_bits + N)).astype(np.int64)
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
    term_game = np.repeat(np.arange(R), K * n)
    player_start = _offsets(n)
    C = int(np.diff(coalition_start).max())
    term_key = (player_start[term_game] + orders[is_term]) * C + index[..., 1:][is_term]
    term_key, term_inverse = np.unique(term_key, return_inverse=True)
    term_inverse = term_inverse.reshape(-1)
    # (float64 even with no terms at all, where bincount would give int64)
    merged_weight = np.bincount(term_inverse, weights=(1.0 / K)[term_game], minlength=len(term_key)).astype(np.float64)
    term_minus = np.empty(len(term_key), dtype=np.int64)
    term_minus[term_inverse] = index[..., :-1][is_term]
    global_player, term_plus = np.divmod(term_key, C)
    ptr = _offsets(np.bincount(global_player, minlength=int(player_start[-1])))

    # Cut each plan out (own copies: a plan does not hold on to the others' arrays).
    bits = ((keys[:, None] >> np.arange(N, dtype=_U64)) & _U64(1)).astype(bool)
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
