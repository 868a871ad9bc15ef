"""What every trainer calls: a batch of completion ids -> their Owen-value credit (:func:`attribute_completions`)
-> per-token advantages from the trainer's own sequence advantages (:func:`token_advantages`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..advantages import Redistribution, group_segment_advantages
from ..attribution import Attributions, OwenAttributor
from ..segment import Segmentation
from .spread import excess_credit, segment_worth, spread_credit
from .token_maps import completion_offsets, token_player_maps

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
