"""How the negatives of a pool are drawn: the ways (``NEGATIVES``), the mix of kinds, each owner's nearest
neighbours, and uniform draws (the rules are in :mod:`ospo_fast.data.pools`)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from .ngrams import char_ngram_vectors, ngram_neighbours

#: Ways to draw the negatives: the first is the default of :func:`esci_pools`, :func:`hm_pools` and the tasks.
NEGATIVES = ("neighbours", "mix")

#: Share of negatives per kind (category, related, random) with ``negatives="mix"``.
DEFAULT_MIX = (0.5, 0.3, 0.2)


def resolve_negatives(negatives, mix) -> tuple[str, Optional[tuple[float, float, float]]]:
    """``(negatives, mix)`` checked: None picks ``"mix"`` when ``mix`` is given, else ``"neighbours"``."""
    if negatives is None:
        negatives = "mix" if mix is not None else NEGATIVES[0]
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives: expected one of {list(NEGATIVES)}, got {negatives!r}")
    if negatives == "mix":
        return negatives, check_mix(DEFAULT_MIX if mix is None else mix)
    if mix is not None:
        raise ValueError(f"mix: only used with negatives='mix', got negatives={negatives!r} and mix={mix!r}")
    return negatives, None


def target_neighbours(items, judged, gains, exclude, pool_size) -> List[np.ndarray]:
    """Each owner's char n-gram neighbours of its targets (positive gain; all judged when none), best first."""
    targets = [[int(i) for i, g in zip(j, g_) if g > 0] or [int(i) for i in j] for j, g_ in zip(judged, gains)]
    skip = [list(j) + (list(exclude[o]) if exclude is not None else []) for o, j in enumerate(judged)]
    return ngram_neighbours(char_ngram_vectors(items), targets, depth=pool_size, skip=skip, texts=items)


def category_text(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


def first_free(ranked, need: int, taken: set, num_items: int) -> List[int]:
    """The first ``need`` items of ``ranked`` not in ``taken`` (all of them when fewer)."""
    picked: List[int] = []
    for i in ranked:
        if len(picked) >= need:
            break
        i = int(i)
        if i not in taken and 0 <= i < num_items and i not in picked:
            picked.append(i)
    return picked


def check_mix(mix) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in mix)
    except TypeError:
        raise ValueError(f"mix: expected three shares (category, related, random), got {mix!r}") from None
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(
            f"mix: expected three non-negative shares (category, related, random) summing to 1, got {mix!r}"
        )
    return values


def quotas_of(n: int, mix: tuple[float, float, float]) -> List[int]:
    """Split ``n`` negatives by ``mix`` with largest remainders (ties to the earlier kind): they sum to ``n``."""
    exact = [n * m for m in mix]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(3), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    return counts


def category_groups(codes: np.ndarray, num_items: int) -> Dict[int, np.ndarray]:
    """code -> sorted item indices with that code (codes -1 left out)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape != (num_items,):
        raise ValueError(f"category_keys: each must have shape [{num_items}] (a code per item), got {codes.shape}")
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    bounds = np.r_[starts, len(codes)]
    return {int(sorted_codes[a]): order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if sorted_codes[a] >= 0}


def draw_uniform(rng: np.random.Generator, num_items: int, need: int, taken: set) -> List[int]:
    """``need`` distinct items uniformly from those not in ``taken`` (all of them when fewer remain)."""
    free = num_items - sum(1 for i in taken if 0 <= i < num_items)
    if need <= 0 or free <= 0:
        return []
    if free <= 4 * need:  # a small or nearly used-up catalogue: draw from the explicit rest
        rest = np.setdiff1d(np.arange(num_items), np.fromiter(taken, dtype=np.int64, count=len(taken)))
        return rng.permutation(rest)[:need].tolist()
    # A large catalogue: rejection sampling avoids materialising it for every owner.
    picked: List[int] = []
    seen = set(taken)
    while len(picked) < need:
        i = int(rng.integers(num_items))
        if i not in seen:
            seen.add(i)
            picked.append(i)
    return picked
