"""Generated token ids -> character spans of the decoded completion, and character spans -> the segment of each
token, for the tokens of any Hugging Face fast tokenizer (a policy's or an encoder's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..segment import Segmentation

# ----------------------------------------------------------------------------------------------------
# Generated ids -> character spans


def completion_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded completion and each generated token's character span in it.

    Special tokens (padding, end of sequence) get the empty span (0, 0). When re-tokenising the decoded
    text gives back the same ids (the usual case), the tokenizer's own offsets are used; otherwise each
    span is found by decoding growing prefixes, which is exact for any tokenizer.
    """
    ids = [int(t) for t in token_ids]
    special = set(tokenizer.all_special_ids)
    kept = [t for t in ids if t not in special]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] == kept:
        spans = iter([tuple(o) for o in encoded["offset_mapping"]])
    else:
        prefix_spans, end = [], 0
        for k in range(1, len(kept) + 1):
            new_end = len(tokenizer.decode(kept[:k], skip_special_tokens=True))
            prefix_spans.append((end, new_end))
            end = new_end
        spans = iter(prefix_spans)
    return text, [(0, 0) if t in special else next(spans) for t in ids]


# ----------------------------------------------------------------------------------------------------
# Character spans -> the segment of each token


def token_player_map(sg: Segmentation, offsets, char_offset: int = 0) -> torch.Tensor:
    """Which player each token belongs to.

    Args:
        sg: the segmentation of the response.
        offsets: int ``[T, 2]``: a fast tokenizer's ``offset_mapping`` (``return_offsets_mapping=True``),
            token ``t`` covering characters ``[offsets[t, 0], offsets[t, 1])`` of ``sg.text[char_offset:]``.
        char_offset: where the tokenized text starts in ``sg.text``; e.g. the prompt's length when only
            the completion is tokenized and ``sg.text`` is prompt + completion. 0 when it is ``sg.text``.
    Returns:
        int64 ``[T]`` on the device of ``offsets``: entry ``t`` is the player whose span overlaps token
        ``t`` by the most characters (the earlier player on ties), or -1 when the token overlaps no player:
        special tokens (zero-width offsets), whitespace and punctuation between segments, the think block.
        A token that straddles a segment's edge (" for" in byte-level BPE) goes to that segment.
    """
    if not isinstance(sg, Segmentation):
        raise ValueError(f"sg: expected a Segmentation, got {type(sg).__name__}")
    offs = _as_offsets(offsets, "offsets")
    base = _check_char_offset(char_offset, sg, "char_offset")
    _check_offsets_fit(offs[None], [sg], [base], "offsets")
    return _player_maps([sg], offs[None], [base])[0]


def token_player_maps(segs: Sequence[Segmentation], offsets, char_offsets: int | Sequence[int] = 0) -> torch.Tensor:
    """:func:`token_player_map` for a batch, in one vectorised pass, padded with -1.

    Args:
        segs: ``B`` segmentations.
        offsets: ``B`` int ``[T_b, 2]`` offset mappings, or an int ``[B, T, 2]`` tensor (a padded batch, as
            a tokenizer returns with ``padding=True, return_tensors="pt"``; the padding's zero-width
            offsets map to -1).
        char_offsets: one int for every response, or ``B`` ints (see ``char_offset`` of
            :func:`token_player_map`).
    Returns:
        int64 ``[B, max_b T_b]``; -1 where a token overlaps no player and in the padding.
    """
    segs = list(segs)
    for b, sg in enumerate(segs):
        if not isinstance(sg, Segmentation):
            raise ValueError(f"segs: item {b} is a {type(sg).__name__}, expected a Segmentation")
    if isinstance(offsets, torch.Tensor) and offsets.dim() == 3:
        if offsets.size(0) != len(segs) or offsets.size(2) != 2:
            raise ValueError(f"offsets: expected shape [{len(segs)}, T, 2], got {list(offsets.shape)}")
        offs = _as_offsets(offsets.reshape(-1, 2), "offsets").reshape(offsets.shape)
    else:
        if isinstance(offsets, torch.Tensor):
            raise ValueError(f"offsets: expected B offset mappings or a [B, T, 2] tensor, got {list(offsets.shape)}")
        if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__iter__"):
            raise ValueError(f"offsets: expected B offset mappings or a [B, T, 2] tensor, got {type(offsets).__name__}")
        rows = [_as_offsets(o, f"offsets[{b}]") for b, o in enumerate(offsets)]
        if len(rows) != len(segs):
            raise ValueError(f"offsets: has {len(rows)} entries for {len(segs)} segmentations (segs)")
        width = max((r.size(0) for r in rows), default=0)
        device = rows[0].device if rows else None
        offs = torch.zeros(len(rows), width, 2, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            offs[b, : r.size(0)] = r
    if isinstance(char_offsets, Sequence):
        if len(char_offsets) != len(segs):
            raise ValueError(f"char_offsets: has {len(char_offsets)} entries for {len(segs)} segmentations")
        bases = [_check_char_offset(c, sg, "char_offsets") for c, sg in zip(char_offsets, segs)]
    else:
        bases = [_check_char_offset(char_offsets, sg, "char_offsets") for sg in segs]
    _check_offsets_fit(offs, segs, bases, "offsets")
    return _player_maps(segs, offs, bases)


def _as_offsets(offsets, name: str) -> torch.Tensor:
    """``offsets`` as an int64 ``[T, 2]`` tensor with ``0 <= start <= end`` in every row."""
    if isinstance(offsets, torch.Tensor):
        t = offsets
    else:
        try:
            t = torch.as_tensor(offsets if not isinstance(offsets, (str, bytes)) else None)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: expected [T, 2] integer (start, end) offsets per token, "
                             f"got {type(offsets).__name__} {str(offsets)[:40]!r}") from None
    if t.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=t.device)
    if t.dim() != 2 or t.size(1) != 2:
        raise ValueError(f"{name}: expected shape [T, 2] (start, end) per token, got {list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer character offsets, got dtype {t.dtype}")
    t = t.long()
    if bool(((t[:, 0] < 0) | (t[:, 1] < t[:, 0])).any()):
        raise ValueError(f"{name}: every token needs 0 <= start <= end")
    return t


def _check_char_offset(value, sg: Segmentation, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or not 0 <= value.__index__() <= len(sg.text):
        raise ValueError(f"{name}: expected an int in [0, {len(sg.text)}] (the text's length), got {value!r}")
    return value.__index__()


def _check_offsets_fit(offs: torch.Tensor, segs: list[Segmentation], bases: list[int], name: str) -> None:
    """Every token of row ``b`` must end inside ``segs[b].text[bases[b]:]``."""
    if offs.numel() == 0:
        return
    room = [len(sg.text) - base for sg, base in zip(segs, bases)]
    ends = offs[..., 1].amax(dim=1).tolist()  # one host copy per batch
    for b, (end, limit) in enumerate(zip(ends, room)):
        if end > limit:
            raise ValueError(
                f"{name}: a token of response {b} ends at character {end}, past the end of the tokenized text "
                f"(length {limit} = len(text) - char_offset); were the offsets taken on another text?"
            )


def _player_maps(segs: list[Segmentation], offs: torch.Tensor, bases: list[int]) -> torch.Tensor:
    """Core of the token maps: ``offs`` int64 ``[B, T, 2]`` -> player per token, int64 ``[B, T]``."""
    B, T = offs.size(0), offs.size(1)
    P = max((sg.num_players for sg in segs), default=0)
    if P == 0 or T == 0:
        return torch.full((B, T), -1, dtype=torch.long, device=offs.device)
    # Missing players are empty spans [0, 0): they overlap nothing.
    spans = torch.tensor(
        [list(sg.spans) + [(0, 0)] * (P - sg.num_players) for sg in segs], dtype=torch.long, device=offs.device
    )  # [B, P, 2]
    base = torch.tensor(bases, dtype=torch.long, device=offs.device)[:, None, None]  # [B, 1, 1]
    tok_start = offs[..., :1] + base  # [B, T, 1]
    tok_end = offs[..., 1:] + base
    overlap = torch.minimum(tok_end, spans[:, None, :, 1]) - torch.maximum(tok_start, spans[:, None, :, 0])
    overlap.clamp_min_(0)  # [B, T, P], characters shared by token t and player p
    best = overlap.argmax(dim=-1)  # the first maximum: the earlier player on ties
    hit = overlap.gather(-1, best[..., None]).squeeze(-1) > 0
    return torch.where(hit, best, torch.full_like(best, -1))
