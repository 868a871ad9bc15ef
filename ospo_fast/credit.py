"""The credit stage: from a policy's completion ids to Owen-value credit on each token, and from that credit and
each response's advantage to per-token advantages. Every trainer (``OSPOTrainer``, TRL, verl, your own) calls
the two functions at the ends of this module::

    completion ids [N, T] --attribute_completions--> CompletionCredit (texts, Owen values, credit [N, T])
    sequence advantages [N] + credit --token_advantages--> per-token advantages [N, T] --> the loss

Underneath, three maps: ``completion_offsets`` (ids -> decoded text and each token's character span),
``token_player_map(s)`` (character spans -> the segment of each token, for the tokens of any Hugging Face fast
tokenizer) and ``spread_credit`` (each segment's credit spread evenly over its tokens). The credit of a segment
is its *excess* Owen value (:func:`excess_credit`), which carries nothing of the reward itself; why is in
docs/credit.md. New credit modes are added here, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import as_real_tensor
from ._device import to_device
from .advantages import Redistribution, group_segment_advantages
from .attribution import Attributions, OwenAttributor
from .plans import CoalitionPlan
from .segment import Segmentation

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


# ----------------------------------------------------------------------------------------------------
# Owen values -> token credit


def excess_credit(plan: CoalitionPlan, values: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Each player's credit beyond its structural share of the whole response's value: its Owen value in the
    game with v(N) and v(empty) set to 0.

    ``phi_i = w_i v(N) + e_i v(empty) + (terms of the other coalitions)`` (:meth:`CoalitionPlan.boundary_weights`);
    this returns ``phi_i - w_i v(N) - e_i v(empty)``. It sums to 0 over the players and does not depend on
    v(N) or v(empty): when the other coalitions' values carry no information about the reward (the rewards are
    noise), it is independent of the response's reward, and so of its advantage. The Owen value itself is
    not: a share ``w_i`` of ``v(N) - v(empty)`` comes with every player, larger for the players of small
    unions. As the credit of a redistribution it keeps every token class neutral under rewards that carry no
    signal (docs/credit.md).

    Args:
        plan: the response's plan; values: float ``[C]`` (or ``[..., C]``), its coalitions' values;
        phi: float ``[n]`` (or ``[..., n]``), their Owen values (:func:`~ospo_fast.owen_from_values`).
    Returns:
        float, ``phi``'s shape, dtype and device.
    """
    if plan.num_players == 0:
        return phi
    full, empty = (w.to(device=phi.device, dtype=phi.dtype) for w in plan.boundary_weights())
    v_full = values[..., plan.full_index, None].to(phi.dtype)
    v_empty = values[..., plan.empty_index, None].to(phi.dtype)
    return phi - full * v_full - empty * v_empty



def segment_worth(structure, phi: torch.Tensor) -> torch.Tensor:
    """Each segment's Owen value scaled to the whole answer: ``phi_i * m * |U_i|``, with ``1 / (m |U_i|)`` the
    segment's structural share of ``v(N) - v(empty)`` (its weight in the exact Owen value). What the answer
    would be worth, over the empty one, if all its segments were like this one; for one segment it is
    ``v(N) - v(empty)``. Under rewards that carry no signal its expectation is the same for every segment,
    whatever its union's size: the signed mode compares it across a group
    (:func:`~ospo_fast.advantages.group_segment_advantages`).

    Args:
        structure: the response's :class:`~ospo_fast.CoalitionStructure`; phi: float ``[n]``, its Owen values.
    """
    if structure.num_players == 0:
        return phi
    scale = torch.tensor([structure.num_unions * structure.union_sizes[k] for k in structure.union_of],
                         dtype=phi.dtype, device=phi.device)
    return phi * scale


def spread_credit(
    player_values: Sequence[torch.Tensor] | torch.Tensor,
    token_player: torch.Tensor,
    player_offsets: torch.Tensor | None = None,
    check_indices: bool | None = None,
) -> torch.Tensor:
    """Token credit from the Owen values of each response's segments.

    Args:
        player_values: a list of ``N`` float ``[n_j]`` tensors (the Owen values of response j's segments), or
            a flat float ``[sum n_j]`` tensor with ``player_offsets``.
        token_player: int ``[N, T]``: the player of each completion token, -1 for tokens outside every segment
            (as :func:`ospo_fast.token_player_maps` returns).
        player_offsets: int ``[N + 1]``: response j's values are ``player_values[offsets[j]:offsets[j + 1]]``;
            only with a flat tensor.
        check_indices: check that every index lies in ``[-1, n_j)`` (None: on CPU tensors only; see the
            module docstring).
    Returns:
        float ``[N, T]`` on ``token_player``'s device (float64 when the values are, else float32): each token
        gets its segment's value divided by the segment's token count, so a segment's credit sums to its
        Owen value; tokens with -1 get 0. A segment without any token (e.g. truncated away) contributes nothing.
    """
    if not isinstance(token_player, torch.Tensor):
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {type(token_player).__name__}")
    if token_player.dim() != 2 or token_player.dtype.is_floating_point or token_player.dtype == torch.bool:
        got = f"{token_player.dtype} {list(token_player.shape)}"
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {got}")
    N, T = token_player.shape
    device = token_player.device
    if isinstance(player_values, torch.Tensor):
        if player_offsets is None:
            raise ValueError("player_offsets: required with a flat player_values tensor ([N + 1] start offsets)")
        values = as_real_tensor(player_values, "player_values", integers_to=torch.float32)
        if values.dim() != 1:
            raise ValueError(
                "player_values: expected a flat [sum n_j] tensor or a list of N tensors, "
                f"got shape {list(values.shape)}"
            )
        offsets = torch.as_tensor(player_offsets)
        if offsets.dim() != 1 or offsets.numel() != N + 1 or offsets.dtype.is_floating_point:
            got = f"{offsets.dtype} {list(offsets.shape)}"
            raise ValueError(f"player_offsets: expected integer [N + 1] = [{N + 1}], got {got}")
        offsets = to_device(offsets.to(torch.long), device)
    else:
        if player_offsets is not None:
            raise ValueError("player_offsets: only with a flat player_values tensor; a list carries its own lengths")
        rows = [as_real_tensor(v, f"player_values[{j}]", integers_to=torch.float32)
                for j, v in enumerate(player_values)]
        if len(rows) != N:
            raise ValueError(f"player_values: has {len(rows)} responses, token_player has N={N} rows")
        for j, v in enumerate(rows):
            if v.dim() != 1:
                raise ValueError(f"player_values[{j}]: expected a 1-D tensor [n_j], got shape {list(v.shape)}")
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in rows) else torch.float32
        values = torch.cat([to_device(v.to(dtype), device) for v in rows]) if rows else torch.zeros(0, device=device)
        offsets = to_device(torch.tensor([0] + [v.numel() for v in rows]).cumsum(0), device)  # lengths: from shapes
    values = to_device(values, device)
    P = values.numel()
    if check_indices or (check_indices is None and device.type == "cpu"):
        _check_player_indices(token_player, offsets, P)

    valid = token_player >= 0
    # Tokens outside segments point at an extra slot P holding value 0 (no boolean indexing: it syncs).
    slot = torch.where(valid, offsets[:-1, None] + token_player.long(), P).reshape(-1)
    counts = torch.zeros(P + 1, dtype=values.dtype, device=device)
    counts.index_add_(0, slot, valid.reshape(-1).to(values.dtype))
    padded = torch.cat([values, values.new_zeros(1)])
    return (padded[slot] / counts[slot].clamp(min=1)).view(N, T)


def _check_player_indices(token_player: torch.Tensor, offsets: torch.Tensor, num_values: int) -> None:
    if bool((offsets.diff() < 0).any()) or int(offsets[0]) != 0 or int(offsets[-1]) != num_values:
        raise ValueError(
            f"player_offsets: expected non-decreasing offsets from 0 to len(player_values)={num_values}, "
            f"got {offsets.tolist()}"
        )
    counts = offsets.diff()[:, None]
    bad = (token_player < -1) | (token_player >= counts)
    if bool(bad.any()):
        j, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token_player: entry [{j}, {t}] = {int(token_player[j, t])} is not a player of response {j} "
            f"(it has {int(counts[j, 0])}; -1 marks tokens outside every segment)"
        )


# ----------------------------------------------------------------------------------------------------
# Attributed texts -> credit on a tokenizer's tokens


@dataclass
class TokenCredit:
    """Per-token credit of a batch of attributed texts (:func:`credit_on_tokens`), padded to ``T``.

    Attributes:
        input_ids: int64 ``[N, T]``: the tokenizer's ids of each text, right-padded with 0.
        attention_mask: int64 ``[N, T]``: 1 for a token, 0 for padding.
        token_player: int64 ``[N, T]``: the segment each token falls in, -1 outside every segment.
        credit: float ``[N, T]``: the segment's Owen value divided by its number of tokens; 0 outside segments.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_player: torch.Tensor
    credit: torch.Tensor


def credit_on_tokens(attributions: Attributions, tokenizer, add_special_tokens: bool = False) -> TokenCredit:
    """Each segment's Owen value spread evenly over the tokens that cover it, for the tokens of ``tokenizer``
    (a Hugging Face fast tokenizer: its offset mappings place the tokens) on each attributed text.

    Tokens outside every segment (tags, a think block, punctuation between segments, special tokens, padding)
    get 0, so each response's credit sums to the sum of its Owen values. The credit lives on the device of the
    Owen values. For a policy's own completion tokens in training, see :func:`attribute_completions`.
    """
    if not isinstance(attributions, Attributions):
        raise ValueError(f"attributions: expected an OwenAttributor's output (Attributions), "
                         f"got {type(attributions).__name__}")
    texts = [a.text for a in attributions]
    try:  # unpadded: a policy's tokenizer often has no padding token
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:  # what a slow tokenizer raises for return_offsets_mapping
        raise ValueError(
            f"tokenizer: expected a Hugging Face fast tokenizer (offset mappings), got {type(tokenizer).__name__}"
        ) from None
    ids = encoded["input_ids"]
    input_ids = torch.zeros(len(ids), max(map(len, ids), default=0), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for j, row in enumerate(ids):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[j, : len(row)] = 1
    device = attributions[0].phi.device if len(attributions) else torch.device("cpu")
    token_player = token_player_maps(attributions.segmentations, encoded["offset_mapping"]).to(device)
    credit = spread_credit(attributions.phi, token_player)
    return TokenCredit(input_ids, attention_mask, token_player, credit)


# ----------------------------------------------------------------------------------------------------
# What every trainer calls: completion ids -> credit -> per-token advantages


@dataclass
class CompletionCredit:
    """The attribution of a batch of completions, aligned to their tokens.

    Attributes:
        texts: the decoded completions (special tokens dropped), ``N`` strings.
        offsets: ``offsets[j][t]``: the character span of token t in ``texts[j]`` ((0, 0) for special tokens).
        attributions: the :class:`~ospo_fast.Attributions` of the texts (segments, Owen values, v(S)).
        token_player: int64 ``[N, T]``: the segment of each completion token, -1 outside every segment.
        credit: float32 ``[N, T]`` on the ids' device: each segment's excess credit (:func:`excess_credit`, its
            Owen value less its share of v(N) - v(empty)) spread evenly over its tokens; it sums to 0 over a
            completion's segment tokens.
        worth: ``N`` float32 tensors ``[n_j]``: each segment's :func:`segment_worth`, which the signed mode
            compares across a group.
    """

    texts: list[str]
    offsets: list[list[tuple[int, int]]]
    attributions: Attributions
    token_player: torch.Tensor
    credit: torch.Tensor
    worth: list[torch.Tensor]

    @property
    def full_values(self) -> torch.Tensor:
        """float64 ``[N]``: v(N) of each response's game (the reward of all its segments; v(empty) without any)."""
        return torch.stack([a.values[a.plan.full_index] for a in self.attributions.items]).double()

    @property
    def segment_mask(self) -> torch.Tensor:
        """bool ``[N, T]``: the tokens of the answer's segments, the only ones that share out the advantage."""
        return self.token_player >= 0


def attribute_completions(
    tokenizer,
    completion_ids: torch.Tensor,
    attributor: OwenAttributor,
    owners: Sequence[int],
    keep: torch.Tensor | None = None,
    reserve_last: torch.Tensor | None = None,
    reward_scope: Callable[[list[str], list[Segmentation]], contextlib.AbstractContextManager] | None = None,
    permute: np.random.Generator | None = None,
) -> CompletionCredit:
    """Owen-value credit of every completion token of a batch: decode, segment, attribute (one batched
    evaluation for the whole batch), spread each segment's excess credit over its tokens.

    Args:
        tokenizer: the policy's tokenizer (decodes ``completion_ids``).
        completion_ids: int ``[N, T]``: generated tokens, right-padded.
        attributor: evaluates the games; its segmenter cuts the decoded texts.
        owners: ``N`` owner indices for the attributor's reward.
        keep: bool ``[N, T]`` or None: tokens outside it (padding, tokens after the end of sequence) are
            replaced by the pad token before decoding. None keeps every token.
        reserve_last: bool ``[N, T]`` or None: at most one True per row, a token that must carry no credit
            (the segment it belongs to spreads its value over its other tokens). verl's dense rewards put the
            outcome reward on the last response token; see :mod:`ospo_fast.integrations.verl`.
        reward_scope: None, or ``reward_scope(texts, segmentations)``: a context manager entered around the
            attribution (:meth:`CompletionReward.bind` binds a batch's frames to a row reward).
        permute: None, or a generator that permutes each response's segment credits among its segments (the
            shuffled-credit control of an experiment: the same values, in the wrong places).
    Returns:
        :class:`CompletionCredit`.
    """
    if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
        raise ValueError(f"completion_ids: expected an int tensor [N, T], got {type(completion_ids).__name__}")
    if len(owners) != completion_ids.shape[0]:
        raise ValueError(f"owners: expected {completion_ids.shape[0]}, one per completion, got {len(owners)}")
    ids = completion_ids
    if keep is not None:
        ids = ids.masked_fill(~keep.bool(), tokenizer.pad_token_id)
    decoded = [completion_offsets(tokenizer, row) for row in ids.tolist()]
    texts = [text for text, _ in decoded]
    offsets = [offs for _, offs in decoded]
    segmentations = attributor.segment(texts)
    scope = reward_scope(texts, segmentations) if reward_scope is not None else contextlib.nullcontext()
    with scope:
        out = attributor(texts, list(owners), segmentations=segmentations)
    token_player = token_player_maps(segmentations, offsets).to(ids.device)  # one span per id: [N, T]
    if reserve_last is not None:
        token_player = token_player.masked_fill(reserve_last.bool().to(ids.device), -1)
    excess = [excess_credit(a.plan, a.values, a.phi).float() for a in out.items]
    worth = [segment_worth(a.segmentation.structure, a.phi).float() for a in out.items]
    if permute is not None:
        orders = [torch.from_numpy(permute.permutation(e.numel())).to(e.device) for e in excess]
        excess = [e[order] for e, order in zip(excess, orders)]
        worth = [w[order] for w, order in zip(worth, orders)]
    credit = spread_credit(excess, token_player)
    return CompletionCredit(texts, offsets, out, token_player, credit, worth)


def token_advantages(
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    credit: CompletionCredit | torch.Tensor | None,
    redistribution: Redistribution | None = None,
    segment_mask: torch.Tensor | None = None,
    groups: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantages from each response's (sequence) advantage and its tokens' credit.

    Args:
        advantages: float ``[N]``: the host trainer's advantage of each response (its own scaling stays).
        completion_mask: ``[N, T]``, nonzero on the completion tokens that are trained.
        credit: a :class:`CompletionCredit`; a float ``[N, T]`` credit tensor (with ``segment_mask``); or None,
            which is GRPO: every trained token gets its response's advantage.
        redistribution: how the advantage is shared out (:class:`~ospo_fast.advantages.Redistribution`,
            checked when it was built); None: the defaults.
        segment_mask: bool ``[N, T]``, the tokens of the answer's segments; only with a credit tensor (None:
            every trained token). A :class:`CompletionCredit` carries its own.
        groups: the signed mode with a :class:`CompletionCredit` compares each segment with the segments of its
            group: the group size ``G`` (consecutive groups) or an int tensor ``[N]`` of group ids. (A credit
            tensor is taken as the segment advantages themselves.)
    Returns:
        ``[N, T]`` in ``advantages``' dtype and device, 0 where ``completion_mask`` is 0. Tokens outside the
        segments get exactly their response's advantage; without ``clip`` each row's mean over its segment
        tokens is its advantage (:func:`~ospo_fast.redistribute`).
    """
    mask = completion_mask != 0
    if credit is None:
        return torch.where(mask, advantages[:, None], torch.zeros((), dtype=advantages.dtype,
                                                                   device=advantages.device))
    redistribution = redistribution if redistribution is not None else Redistribution()
    if isinstance(credit, CompletionCredit):
        if segment_mask is not None:
            raise ValueError("segment_mask: a CompletionCredit carries its own (credit.segment_mask); pass None")
        if redistribution.mode == "signed":
            if groups is None:
                raise ValueError("groups: mode='signed' compares each segment with the segments of its group; pass "
                                 "the group size or an int tensor [N] of group ids")
            segment_mask = credit.segment_mask
            credit = group_segment_advantages(credit.worth, credit.token_player, groups)
        else:
            credit, segment_mask = credit.credit, credit.segment_mask
    device = advantages.device
    out = redistribution(advantages, credit.to(device), mask,
                         segment_mask=None if segment_mask is None else segment_mask.to(device))
    return out.to(advantages.dtype)
