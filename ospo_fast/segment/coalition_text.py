"""The text of a coalition: the response reduced to the kept segments, as the reward sees it."""

from __future__ import annotations

from itertools import compress
from typing import Sequence

import numpy as np
import torch

from .segmentation import Segmentation


def coalition_text(sg: Segmentation, mask) -> str:
    """The text of a coalition: the response with only the kept segments left.

    The kept segments come in text order. Between two adjacent kept segments ``i`` and ``i + 1`` stays the
    response's own text between them (``sg.text[sg.spans[i][1]:sg.spans[i + 1][0]]``: ", ", ". ", " & ");
    each run of removed segments between kept ones becomes one space, and removed segments before the first
    kept one or after the last leave nothing. So the grand coalition's text is the response from its first
    segment to its last, ``sg.text[sg.spans[0][0]:sg.spans[-1][1]]``, and v(N) is the response's reward.

    Args:
        sg: the segmentation.
        mask: bool ``[n]`` (a sequence, a numpy array or a 1-D bool tensor), ``n = sg.num_players``; True
            keeps a player.
    Returns:
        The coalition's text; ``""`` for the empty coalition.
    """
    _check_segmentation(sg)
    n = sg.num_players
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor, got dtype {mask.dtype}")
        if mask.dim() != 1 or mask.numel() != n:
            raise ValueError(f"mask: expected shape [{n}] (one entry per player), got {list(mask.shape)}")
        keep = mask.tolist()
    else:
        try:
            keep = list(mask)
        except TypeError:
            raise ValueError(f"mask: expected a bool sequence of length {n}, got {type(mask).__name__}") from None
        if len(keep) != n:
            raise ValueError(f"mask: has length {len(keep)}, expected {n} (one entry per player)")
        keep = [_as_bool(x) for x in keep]
    return _join_kept(sg, keep)


def coalition_texts(sg: Segmentation, masks) -> list[str]:
    """The texts of many coalitions of one segmentation (see :func:`coalition_text`).

    Args:
        sg: the segmentation.
        masks: bool ``[C, n]`` (a tensor or nested sequences), one coalition per row.
    Returns:
        ``C`` strings, ``coalition_text(sg, masks[c])`` each.
    """
    _check_segmentation(sg)
    n = sg.num_players
    if isinstance(masks, torch.Tensor):
        if masks.dtype != torch.bool:
            raise ValueError(f"masks: expected a bool tensor, got dtype {masks.dtype}")
        if masks.dim() != 2 or masks.size(1) != n:
            raise ValueError(f"masks: expected shape [C, {n}] (one column per player), got {list(masks.shape)}")
        rows = masks.tolist()  # one device -> host copy for all rows
    else:
        rows = []
        for c, row in enumerate(masks):
            row = list(row)
            if len(row) != n:
                raise ValueError(f"masks: row {c} has length {len(row)}, expected {n} (one entry per player)")
            rows.append([_as_bool(x, "masks") for x in row])
    # Plans repeat coalitions across responses and methods; join each distinct row once.
    cache: dict[tuple[bool, ...], str] = {}
    out = []
    for row in rows:
        key = tuple(row)
        text = cache.get(key)
        if text is None:
            text = cache[key] = _join_kept(sg, key)
        out.append(text)
    return out


def _join_kept(sg: Segmentation, keep: Sequence[bool]) -> str:
    """The coalition text of the kept players (``keep``: n bools); the one definition of it."""
    segments, spans = sg.segments, sg.spans
    parts: list[str] = []
    last = -2  # the last kept player so far
    for i in compress(range(len(keep)), keep):
        if parts:  # the response's own gap after an adjacent kept player, else one space for the removed run
            parts.append(sg.text[spans[last][1] : spans[i][0]] if i == last + 1 else " ")
        parts.append(segments[i])
        last = i
    return "".join(parts)


def _as_bool(x, name: str = "mask") -> bool:
    if isinstance(x, (bool, np.bool_)):  # Python or NumPy bool
        return bool(x)
    if isinstance(x, (int, np.integer)) and x in (0, 1):
        return bool(x)
    raise ValueError(f"{name}: entries must be bools (or 0/1), got {x!r}")


def _check_segmentation(sg) -> None:
    if not isinstance(sg, Segmentation):
        raise ValueError(f"sg: expected a Segmentation, got {type(sg).__name__}")
