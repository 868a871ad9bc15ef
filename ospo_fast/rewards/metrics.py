"""Batched ranking metrics over padded candidate pools, and the helpers that build those pools.

Every metric takes

- ``scores`` float ``[N, P]``: one row per query, one column per pool entry; higher ranks earlier;
- ``gains`` float ``[N, P]`` (>= 0): graded relevance of each pool entry;
- ``valid`` bool ``[N, P]`` (optional): which entries are real. Padding is never ranked, never fills a
  top-k slot and never counts as relevant;

and returns float ``[N]`` (float64 when scores or gains are float64, float32 otherwise).

Conventions shared by all metrics:

- **Ties** in scores are broken by pool position: among equal scores the entry that comes first in the
  pool ranks first. Rankings are therefore deterministic (a query that scores every entry equally, such as
  an empty BM25 query, ranks the pool in its given order).
- NaN scores are treated as the lowest possible score.
- ``k=None`` means the whole pool.
- A row with nothing to find (zero ideal DCG, no relevant entry) scores 0, never NaN.

Everything is pure torch, batched over rows, runs on any device and does no host synchronisation, so it
can sit inside a CUDA-graph-friendly attribution step. Input validation here is limited to shapes; the
data checks (finite, non-negative gains, index ranges) happen once, host side, in :func:`pad_pools`.
"""

from __future__ import annotations

import math
import operator
from itertools import chain
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "ndcg_at_k",
    "recall_at_k",
    "mrr",
    "ranking_metrics",
    "pool_metric",
    "pad_pools",
    "check_queries",
    "check_metric",
    "METRICS",
]

#: Metric names accepted by the retrieval rewards.
METRICS = ("ndcg", "recall", "mrr")

# ----------------------------------------------------------------------------------------------------------
# ranking core


class _Ranked(NamedTuple):
    gains: torch.Tensor  # [N, P] gains in ranked order, 0 at padding
    rank: torch.Tensor  # [N, P] 1-based rank among valid entries (padding: rank of the previous valid one)
    valid: torch.Tensor  # [N, P] valid mask in ranked order
    ideal: torch.Tensor  # [N, P] gains sorted descending (the ideal ranking), 0 at padding


def _result_dtype(scores: torch.Tensor, gains: torch.Tensor) -> torch.dtype:
    if scores.dtype == torch.float64 or gains.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check(scores: torch.Tensor, gains: torch.Tensor, valid: Optional[torch.Tensor], k: Optional[int]) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores: expected a 2-D tensor [N, P], got {_describe(scores)}")
    if not isinstance(gains, torch.Tensor) or gains.shape != scores.shape:
        raise ValueError(f"gains: expected a tensor of shape {tuple(scores.shape)}, got {_describe(gains)}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.shape != scores.shape):
        raise ValueError(f"valid: expected a bool tensor of shape {tuple(scores.shape)}, got {_describe(valid)}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int or None, got {k!r}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    return type(x).__name__


def _rank(scores: torch.Tensor, gains: torch.Tensor, valid: Optional[torch.Tensor]) -> _Ranked:
    dtype = _result_dtype(scores, gains)
    gains = gains.to(dtype)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        valid = valid.to(torch.bool)
    # Padding and NaN go to the bottom. A real entry scored -inf can tie with padding; that is harmless
    # because ranks below count valid entries only (cumsum), so padding never takes a rank.
    key = torch.where(valid & ~torch.isnan(scores), scores, torch.full_like(scores, -math.inf))
    # Stable ascending sort of the negated scores = descending order with ties kept in pool order.
    order = torch.sort(-key, dim=1, stable=True).indices
    valid_sorted = valid.gather(1, order)
    gains = torch.where(valid, gains, torch.zeros_like(gains))
    gains_sorted = gains.gather(1, order)
    rank = torch.cumsum(valid_sorted.to(dtype), dim=1)
    ideal = torch.sort(gains, dim=1, descending=True).values
    return _Ranked(gains_sorted, rank, valid_sorted, ideal)


def _top(r: _Ranked, k: Optional[int]) -> torch.Tensor:
    """Mask [N, P] of the ranked positions inside the top k valid entries."""
    if k is None:
        return r.valid
    return r.valid & (r.rank <= k)


def _discount(r: _Ranked) -> torch.Tensor:
    # Padding sorted before the first valid entry has rank 0; clamp so its (masked) discount stays finite.
    return 1.0 / torch.log2(r.rank.clamp(min=1.0) + 1.0)


def _gain_transform(g: torch.Tensor, gain: str) -> torch.Tensor:
    if gain == "linear":
        return g
    if gain == "exponential":
        return torch.exp2(g) - 1.0
    raise ValueError(f"gain: expected 'linear' or 'exponential', got {gain!r}")


def _ndcg(r: _Ranked, k: Optional[int], gain: str) -> torch.Tensor:
    g = _gain_transform(r.gains, gain)
    dcg = (g * _discount(r) * _top(r, k)).sum(dim=1)
    ideal = _gain_transform(r.ideal, gain)
    positions = torch.arange(1, ideal.shape[1] + 1, device=ideal.device, dtype=ideal.dtype)
    ideal_disc = 1.0 / torch.log2(positions + 1.0)
    if k is not None:
        ideal_disc = ideal_disc * (positions <= k)
    # Padding sits at zero gain in `ideal`, and every row has at least as many valid entries as positive
    # gains, so the ideal ranking never needs a padded slot.
    idcg = (ideal * ideal_disc).sum(dim=1)
    return torch.where(idcg > 0, dcg / torch.where(idcg > 0, idcg, torch.ones_like(idcg)), torch.zeros_like(dcg))


def _recall(r: _Ranked, k: Optional[int], threshold: float) -> torch.Tensor:
    rel = (r.gains > threshold) & r.valid
    total = rel.sum(dim=1)
    hit = (rel & _top(r, k)).sum(dim=1)
    dtype = r.gains.dtype
    recall = hit.to(dtype) / total.clamp(min=1).to(dtype)
    return torch.where(total > 0, recall, torch.zeros_like(recall))


def _mrr(r: _Ranked, k: Optional[int], threshold: float) -> torch.Tensor:
    rel = (r.gains > threshold) & _top(r, k)
    # Reciprocal ranks of the relevant entries; the first relevant one has the largest.
    rr = torch.where(rel, 1.0 / r.rank.clamp(min=1.0), torch.zeros_like(r.rank))
    return rr.amax(dim=1) if rr.shape[1] > 0 else rr.sum(dim=1)


def ndcg_at_k(
    scores: torch.Tensor,
    gains: torch.Tensor,
    k: Optional[int] = None,
    valid: Optional[torch.Tensor] = None,
    gain: str = "linear",
) -> torch.Tensor:
    """NDCG@k of each row's ranking.

    DCG = sum over the top k ranked valid entries of ``g(gain) / log2(rank + 1)`` (rank 1-based), divided by
    the DCG of the ideal ranking (the row's valid gains sorted descending). ``gain="linear"`` (default) uses
    the graded gain as is, so ESCI gains 1 / 0.1 / 0.01 / 0 enter directly; ``gain="exponential"`` uses
    ``2**g - 1``. A row with zero ideal DCG scores 0.

    Args:
        scores: float [N, P], higher ranks earlier; ties broken by pool position.
        gains: float [N, P], >= 0.
        k: cutoff, or None for the whole pool.
        valid: bool [N, P] marking real pool entries, or None (all real).
        gain: "linear" or "exponential".

    Returns:
        float [N] in [0, 1].
    """
    _check(scores, gains, valid, k)
    _gain_transform(gains[:0], gain)  # validate the option before any work
    return _ndcg(_rank(scores, gains, valid), k, gain)


def recall_at_k(
    scores: torch.Tensor,
    gains: torch.Tensor,
    k: Optional[int] = None,
    valid: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Recall@k: relevant entries in the top k / relevant entries; relevant means ``gain > threshold``.

    Args:
        scores: float [N, P]; ties broken by pool position.
        gains: float [N, P].
        k: cutoff, or None for the whole pool (then recall is 1 for every row with a relevant entry).
        valid: bool [N, P] or None.
        threshold: gains strictly above it are relevant (default 0: any positive gain).

    Returns:
        float [N] in [0, 1]; 0 for a row with no relevant entry.
    """
    _check(scores, gains, valid, k)
    return _recall(_rank(scores, gains, valid), k, threshold)


def mrr(
    scores: torch.Tensor,
    gains: torch.Tensor,
    k: Optional[int] = None,
    valid: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Reciprocal rank of the first relevant entry (``gain > threshold``), 0 if none is within the top k.

    Args:
        scores: float [N, P]; ties broken by pool position.
        gains: float [N, P].
        k: cutoff, or None for the whole pool.
        valid: bool [N, P] or None.
        threshold: gains strictly above it are relevant.

    Returns:
        float [N] in [0, 1].
    """
    _check(scores, gains, valid, k)
    return _mrr(_rank(scores, gains, valid), k, threshold)


def ranking_metrics(
    scores: torch.Tensor,
    gains: torch.Tensor,
    ks: Iterable[Optional[int]] = (10, 20, 50, 100),
    valid: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    gain: str = "linear",
) -> Dict[str, torch.Tensor]:
    """NDCG, recall and MRR at several cutoffs from one sort.

    Returns a dict of float [N] tensors with keys ``"ndcg@10"``, ``"recall@10"``, ``"mrr@10"``, ... for each
    k in ``ks`` (``None`` gives the keys ``"ndcg"``, ``"recall"``, ``"mrr"``: the whole pool).
    """
    ks = list(ks)
    for k in ks:
        _check(scores, gains, valid, k)
    if not ks:
        _check(scores, gains, valid, None)
    _gain_transform(gains[:0], gain)
    r = _rank(scores, gains, valid)
    out: Dict[str, torch.Tensor] = {}
    for k in ks:
        suffix = "" if k is None else f"@{k}"
        out[f"ndcg{suffix}"] = _ndcg(r, k, gain)
        out[f"recall{suffix}"] = _recall(r, k, threshold)
        out[f"mrr{suffix}"] = _mrr(r, k, threshold)
    return out


def pool_metric(
    metric: str,
    scores: torch.Tensor,
    gains: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    k: Optional[int] = None,
) -> torch.Tensor:
    """Dispatch by name: ``"ndcg"`` (linear gain), ``"recall"`` or ``"mrr"``; float [N]."""
    if metric == "ndcg":
        return ndcg_at_k(scores, gains, k=k, valid=valid)
    if metric == "recall":
        return recall_at_k(scores, gains, k=k, valid=valid)
    if metric == "mrr":
        return mrr(scores, gains, k=k, valid=valid)
    raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


# ----------------------------------------------------------------------------------------------------------
# host-side helpers


def _flatten(name: str, rows, numeric_kind: str):
    """Flatten a ragged list of 1-D sequences into (list of values, list of lengths)."""
    if isinstance(rows, torch.Tensor) or hasattr(rows, "__array__"):
        t = torch.as_tensor(rows)
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a list of 1-D sequences or a 2-D array, got shape {tuple(t.shape)}")
        return t.reshape(-1), [t.shape[1]] * t.shape[0]
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(f"{name}: expected a list of {numeric_kind} sequences, got {type(rows).__name__}")
    lengths = []
    for o, row in enumerate(rows):
        if isinstance(row, torch.Tensor) or hasattr(row, "__array__"):
            row_t = torch.as_tensor(row)
            if row_t.dim() != 1:
                raise ValueError(f"{name}[{o}]: expected a 1-D sequence, got shape {tuple(row_t.shape)}")
            lengths.append(row_t.shape[0])
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{o}]: expected a sequence of {numeric_kind}s, got {type(row).__name__}")
        else:
            lengths.append(len(row))
    flat = list(chain.from_iterable(r.tolist() if hasattr(r, "tolist") else r for r in rows))
    return flat, lengths


def pad_pools(
    pools,
    gains,
    device: Union[str, torch.device, None] = None,
    *,
    num_items: Optional[int] = None,
):
    """Pad ragged candidate pools into rectangular tensors.

    Args:
        pools: O sequences of item indices (``pools[o]`` is owner o's candidate pool; lengths may differ),
            or a 2-D integer array/tensor.
        gains: O sequences of non-negative finite gains aligned with ``pools`` (see
            :func:`~ospo_fast.data.esci_gain` for ESCI labels), or a 2-D float array/tensor.
        device: where the returned tensors live.
        num_items: if given, every index must be in ``[0, num_items)``.

    Returns:
        ``(index, gains, valid)``: long [O, P], float32 [O, P], bool [O, P] with P the longest pool. Pools are
        left-aligned; padding has index 0, gain 0 and ``valid`` False.

    Raises:
        ValueError naming the argument: empty ``pools``, an empty pool, ``pools``/``gains`` length mismatch
        (overall or per pool), non-integer indices, indices out of range, NaN/inf/negative gains, gains the
        float32 metrics cannot hold (a positive gain that rounds to 0, a pool whose gains sum past 1.7e38).
    """
    flat_idx, lengths = _flatten("pools", pools, "int")
    if len(lengths) == 0:
        raise ValueError("pools: expected at least one candidate pool, got an empty list")
    flat_gain, g_lengths = _flatten("gains", gains, "float")
    if len(g_lengths) != len(lengths):
        raise ValueError(f"gains: expected {len(lengths)} rows (one per pool), got {len(g_lengths)}")
    for o, (n, m) in enumerate(zip(lengths, g_lengths)):
        if n == 0:
            raise ValueError(f"pools[{o}]: candidate pool is empty")
        if n != m:
            raise ValueError(f"gains[{o}]: expected {n} gains (the length of pools[{o}]), got {m}")

    try:
        idx = torch.as_tensor(flat_idx)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"pools: entries must be integer item indices ({e})") from None
    if idx.numel() and (idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex):
        raise ValueError(f"pools: entries must be integer item indices, got {idx.dtype}")
    idx = idx.to(torch.long)
    try:
        g = torch.as_tensor(flat_gain, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"gains: entries must be numbers ({e}); map ESCI labels with esci_gain") from None

    lengths_t = torch.tensor(lengths, dtype=torch.long)
    owner_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    if not torch.isfinite(g).all():
        o = int(owner_of[~torch.isfinite(g)][0])
        raise ValueError(f"gains[{o}]: gains must be finite (found NaN or inf)")
    if (g < 0).any():
        o = int(owner_of[g < 0][0])
        raise ValueError(f"gains[{o}]: gains must be non-negative")
    _check_gains_fit(g, owner_of, len(lengths))
    if (idx < 0).any():
        o = int(owner_of[idx < 0][0])
        raise ValueError(f"pools[{o}]: item index must be >= 0, got {int(idx[idx < 0][0])}")
    if num_items is not None and (idx >= num_items).any():
        o = int(owner_of[idx >= num_items][0])
        raise ValueError(
            f"pools[{o}]: item index {int(idx[idx >= num_items][0])} out of range for {num_items} items"
        )

    num_pools, width = len(lengths), max(lengths)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    col = torch.arange(idx.numel()) - torch.repeat_interleave(starts, lengths_t)
    index = torch.zeros(num_pools, width, dtype=torch.long)
    gain_t = torch.zeros(num_pools, width, dtype=GAIN_DTYPE)
    valid = torch.zeros(num_pools, width, dtype=torch.bool)
    index[owner_of, col] = idx
    gain_t[owner_of, col] = g.to(GAIN_DTYPE)
    valid[owner_of, col] = True
    return index.to(device), gain_t.to(device), valid.to(device)


#: The dtype the pools' gains are stored and the metrics computed in.
GAIN_DTYPE = torch.float32


def _check_gains_fit(g: torch.Tensor, owner_of: torch.Tensor, num_pools: int) -> None:
    """Gains (finite, >= 0, float64) must survive the metrics' dtype: no positive gain may round to 0 (it
    would stop counting as relevant), and each pool's gains must sum to at most half the dtype's largest
    value (DCG and ideal DCG are sums of gains; the half is a margin for rounding), or NDCG becomes NaN."""
    info = torch.finfo(GAIN_DTYPE)
    vanish = (g > 0) & (g.to(GAIN_DTYPE) == 0)
    if vanish.any():
        o = int(owner_of[vanish][0])
        raise ValueError(
            f"gains[{o}]: gain {float(g[vanish][0]):.3g} rounds to 0 in {GAIN_DTYPE} (smallest positive "
            f"{info.smallest_normal * info.eps:.3g}); rescale the gains"
        )
    totals = torch.zeros(num_pools, dtype=torch.float64).index_add_(0, owner_of, g)
    limit = float(info.max) / 2
    if (totals > limit).any():
        o = int(torch.nonzero(totals > limit)[0])
        raise ValueError(
            f"gains[{o}]: the pool's gains sum to {float(totals[o]):.3g}, beyond what the metrics can sum in "
            f"{GAIN_DTYPE} (at most {limit:.3g}); rescale the gains"
        )


def check_texts(texts, name: str) -> list:
    """``texts`` as a list after checking it is a non-empty sequence of str; ValueError naming ``name``."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{name}: expected a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{name}: expected a non-empty list of str")
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{j}]: expected str, got {type(t).__name__}")
    return list(texts)


def check_metric(metric: str, k: Optional[int]) -> None:
    """A retrieval reward's ``metric`` (one of :data:`METRICS`) and cutoff ``k`` (a positive int, or None for the
    whole pool); ValueError naming the bad argument."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int or None, got {k!r}")


def _owner_index(o, j: int) -> int:
    """One owner as a Python int: an int, a numpy integer or an integer 0-d tensor; not a bool or a float."""
    if isinstance(o, (bool, np.bool_)):
        raise ValueError(f"owners[{j}]: expected an int, got {type(o).__name__}")
    try:
        return operator.index(o)
    except TypeError:
        raise ValueError(f"owners[{j}]: expected an int, got {type(o).__name__} {o!r:.40}") from None


def check_queries(texts, owners, num_owners: Optional[int]):
    """Validate a reward call's ``texts`` (non-empty list of str) and ``owners`` (one index per text, in
    ``[0, num_owners)``; only non-negative when ``num_owners`` is None).

    Returns ``owners`` as a CPU long tensor [N]. Raises ValueError naming the bad argument.
    """
    check_texts(texts, "texts")
    if isinstance(owners, torch.Tensor):
        if owners.dim() != 1 or owners.dtype.is_floating_point or owners.dtype == torch.bool:
            raise ValueError(f"owners: expected a 1-D integer tensor, got {_describe(owners)}")
        own = owners.detach().to("cpu", torch.long)
    else:
        if isinstance(owners, (str, bytes)) or not isinstance(owners, Sequence) and not hasattr(owners, "__array__"):
            raise ValueError(f"owners: expected a sequence of int, got {type(owners).__name__}")
        if hasattr(owners, "__array__") and getattr(owners, "ndim", 1) != 1:
            raise ValueError(f"owners: expected a 1-D sequence of int, got shape {tuple(owners.shape)}")
        # One by one: Python and numpy integers of any width mix freely (torch cannot promote uint64 with
        # int64, nor read object arrays); floats and bools are refused.
        if isinstance(owners, np.ndarray) and owners.dtype.kind in "iu":  # the vectorised common case
            values = (owners.tolist() if owners.dtype == np.uint64 and owners.size and owners.max() > 2**63 - 1
                      else owners)
        else:
            values = [_owner_index(o, j) for j, o in enumerate(owners)]
        try:
            own = torch.as_tensor(np.asarray(values, dtype=np.int64))
        except (OverflowError, ValueError, TypeError):
            raise ValueError(f"owners: owner index {max(values, key=abs)} out of the int64 range") from None
    if own.numel() != len(texts):
        raise ValueError(f"owners: expected {len(texts)} owners (one per text), got {own.numel()}")
    bad = (own < 0) | (own >= num_owners) if num_owners is not None else own < 0
    if bad.any():
        where = f"for {num_owners} pools" if num_owners is not None else "(owners are >= 0)"
        raise ValueError(f"owners: owner index {int(own[bad][0])} out of range {where}")
    return own
