"""From generated completions to Owen-value credit on their tokens: the step every OSPO trainer shares.

:func:`attribute_completions` decodes each completion with :func:`~ospo_fast.token_credit.completion_offsets`,
segments it, attributes its reward with an :class:`~ospo_fast.OwenAttributor` (one batched evaluation for the
whole batch), and spreads each segment's credit over the completion tokens that produced it
(:func:`~ospo_fast.spread_credit`). The credit is the segment's Owen value beyond its structural share of
the whole answer's value (:func:`~ospo_fast.owen.excess_credit`), so that it carries nothing of the reward
itself: see :mod:`ospo_fast.advantages`. :class:`~ospo_fast.OSPOTrainer` and the TRL and verl integrations all
call it; each then redistributes its own advantages with the credit (:func:`~ospo_fast.redistribute`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .attribution import Attributions, OwenAttributor
from .owen import excess_credit
from .segment import Segmentation
from .token_credit import completion_offsets, spread_credit, token_player_maps


@dataclass
class CompletionCredit:
    """The attribution of a batch of completions, aligned to their tokens.

    Attributes:
        texts: the decoded completions (special tokens dropped), ``N`` strings.
        offsets: ``offsets[j][t]``: the character span of token t in ``texts[j]`` ((0, 0) for special tokens).
        attributions: the :class:`~ospo_fast.Attributions` of the texts (segments, Owen values, v(S)).
        token_player: int64 ``[N, T]``: the segment of each completion token, -1 outside every segment.
        credit: float32 ``[N, T]`` on the ids' device: each segment's excess credit
            (:func:`~ospo_fast.owen.excess_credit`, its Owen value less its share of v(N) - v(empty)) spread
            evenly over its tokens; it sums to 0 over a completion's segment tokens.
    """

    texts: list[str]
    offsets: list[list[tuple[int, int]]]
    attributions: Attributions
    token_player: torch.Tensor
    credit: torch.Tensor

    @property
    def full_values(self) -> torch.Tensor:
        """float64 ``[N]``: v(N) of each response's game (the reward of all its segments; v(empty) without any)."""
        return torch.stack([a.values[a.plan.full_index] for a in self.attributions.items]).double()


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
    """Owen-value credit of every completion token of a batch.

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
    if permute is not None:
        excess = [e[torch.from_numpy(permute.permutation(e.numel())).to(e.device)] for e in excess]
    credit = spread_credit(excess, token_player)
    return CompletionCredit(texts, offsets, out, token_player, credit)
