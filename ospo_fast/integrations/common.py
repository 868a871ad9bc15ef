"""What the trainer integrations share: completion token ids -> Owen-value token credit, and host rewards
as attribution games.

Two pieces, used by :mod:`ospo_fast.integrations.trl` and :mod:`ospo_fast.integrations.verl` (and usable
by any trainer that holds a batch of generated completions):

* :func:`attribute_completions`: decode each completion with :func:`~ospo_fast.policy.completion_offsets`,
  segment it, attribute its reward with an :class:`~ospo_fast.OwenAttributor` (one batched evaluation for
  the whole batch), and spread the Owen values over the completion tokens that produced each segment
  (:func:`~ospo_fast.spread_credit`). The caller redistributes its own advantages with the credit
  (:func:`~ospo_fast.redistribute`), so the host trainer's advantage scaling stays in force.
* :class:`CompletionReward`: a host trainer's reward function (TRL's ``f(prompts, completions, **kwargs)``,
  verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``) as the text reward of the
  attribution game. The game's owner of response j is row j of the batch, so the reward sees row j's prompt
  and columns; a coalition's text is put back in response j's *frame* (the text before its first segment
  and after its last: think block, answer tags), so a reward that parses the answer's format still finds it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..advantages import spread_credit
from ..attribution import Attributions, OwenAttributor
from ..policy import completion_offsets
from ..segment import Segmentation, token_player_maps


@dataclass
class CompletionCredit:
    """The attribution of a batch of completions, aligned to their tokens.

    Attributes:
        texts: the decoded completions (special tokens dropped), ``N`` strings.
        offsets: ``offsets[j][t]``: the character span of token t in ``texts[j]`` ((0, 0) for special tokens).
        attributions: the :class:`~ospo_fast.Attributions` of the texts (segments, Owen values, v(S)).
        token_player: int64 ``[N, T]``: the segment of each completion token, -1 outside every segment.
        credit: float32 ``[N, T]`` on the ids' device: each segment's Owen value spread evenly over its tokens.
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
    segmentations = [attributor.segmenter(t) for t in texts]
    scope = reward_scope(texts, segmentations) if reward_scope is not None else contextlib.nullcontext()
    with scope:
        out = attributor(texts, list(owners), segmentations=segmentations)
    token_player = token_player_maps(segmentations, offsets).to(ids.device)  # one span per id: [N, T]
    if reserve_last is not None:
        token_player = token_player.masked_fill(reserve_last.bool().to(ids.device), -1)
    credit = spread_credit([p.float() for p in out.phi], token_player)
    return CompletionCredit(texts, offsets, out, token_player, credit)


def segment_frame(sg: Segmentation) -> tuple[str, str]:
    """``(before, after)``: the text before the first segment and after the last (the whole text and ""
    when there is no segment)."""
    if not sg.spans:
        return sg.text, ""
    return sg.text[: sg.spans[0][0]], sg.text[sg.spans[-1][1] :]


class CompletionReward:
    """A host trainer's per-row reward function as the text reward ``reward(texts, owners)`` of the game.

    Args:
        score_rows: ``score_rows(completions, rows) -> N floats``: the host's reward of completion texts,
            completion k scored in the context (prompt, dataset columns, ground truth) of batch row
            ``rows[k]``. None means "no reward" and counts 0.
        framed: put each coalition back in its response's frame (:func:`segment_frame`) before scoring.

    Use :meth:`bind` around each batch's attribution: it records the frames and sets :attr:`num_owners`.
    The owners of the game are the batch rows ``0..N-1``.
    """

    def __init__(self, score_rows: Callable[[list[str], list[int]], Sequence[float]], framed: bool = True):
        if not callable(score_rows):
            raise ValueError(f"score_rows: expected a callable, got {type(score_rows).__name__}")
        self.score_rows = score_rows
        self.framed = framed
        self._frames: list[tuple[str, str]] | None = None

    @property
    def num_owners(self) -> int | None:
        return None if self._frames is None else len(self._frames)

    @contextlib.contextmanager
    def bind(self, texts: Sequence[str], segmentations: Sequence[Segmentation]):
        """Frames of this batch's responses (row j: ``segmentations[j]``) for the duration of the block."""
        self._frames = [segment_frame(sg) for sg in segmentations]
        try:
            yield self
        finally:
            self._frames = None

    def __call__(self, texts: Sequence[str], owners) -> torch.Tensor:
        """float64 ``[len(texts)]``: ``texts[k]`` (a coalition's text) scored as a completion of row ``owners[k]``."""
        if self._frames is None:
            raise RuntimeError("CompletionReward: call it inside `with reward.bind(texts, segmentations):`")
        rows = [int(o) for o in owners]
        if self.framed:
            texts = [self._frames[r][0] + t + self._frames[r][1] for t, r in zip(texts, rows)]
        scores = self.score_rows(list(texts), rows)
        scores = [float("nan") if s is None else float(s) for s in scores]
        if len(scores) != len(rows):
            raise ValueError(f"score_rows: returned {len(scores)} values for {len(rows)} completions")
        return torch.tensor(scores, dtype=torch.float64).nan_to_num(nan=0.0)
