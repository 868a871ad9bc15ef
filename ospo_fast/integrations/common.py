"""What the trainer integrations share: host rewards as attribution games, and the context of the batch being
attributed. The credit itself (completion ids -> token credit -> per-token advantages) is
:mod:`ospo_fast.credit`, which every trainer calls.

* :class:`CompletionReward`: a host trainer's reward function (TRL's ``f(prompts, completions, **kwargs)``,
  verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``) as the text reward of the
  attribution game. The game's owner of response j is row j of the batch, so the reward sees row j's prompt
  and columns; a coalition's text is put back in response j's *frame* (the text before its first segment
  and after its last: think block, answer tags), so a reward that parses the answer's format still finds it.
* :class:`BatchContext` and :class:`BatchContextHolder`: the one way an integration keeps what it knows
  about the batch being processed (each row's context, its prompts, its frames) on ``self``, for that batch
  only, where its reward calls read it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..segment import Segmentation


@dataclass
class BatchContext:
    """What the reward calls of one batch read about it.

    Attributes:
        rows: row j's context for the host's reward: TRL's input dict (prompt and dataset columns), or verl's
            ``compute_score`` arguments (``data_source``, ``ground_truth``, ``extra_info``).
        prompts: row j's prompt as TRL's reward functions take it; None where the rows carry what is needed.
        frames: row j's text before its first segment and after its last (:func:`segment_frame`), which
            :meth:`CompletionReward.bind` records while the batch is attributed.
    """

    rows: Sequence = ()
    prompts: Sequence | None = None
    frames: list[tuple[str, str]] | None = None


class BatchContextHolder:
    """Keeps one :class:`BatchContext` on ``self`` while a batch is processed, and nothing in between.

    Set it with :meth:`ospo_batch_scope` around the batch (or :meth:`set_ospo_batch` where a host's hooks
    set and clear it in different methods), read it with :attr:`ospo_batch`.
    """

    _ospo_batch: BatchContext | None = None

    @property
    def ospo_batch(self) -> BatchContext:
        """The batch being processed; a RuntimeError outside one."""
        if self._ospo_batch is None:
            raise RuntimeError(f"{type(self).__name__}: no batch is being processed (its context is set only "
                               "while one is)")
        return self._ospo_batch

    @property
    def in_batch(self) -> bool:
        return self._ospo_batch is not None

    def set_ospo_batch(self, batch: BatchContext | None) -> None:
        self._ospo_batch = batch

    @contextlib.contextmanager
    def ospo_batch_scope(self, batch: BatchContext):
        """``batch`` is the context for the duration of the block."""
        self._ospo_batch = batch
        try:
            yield batch
        finally:
            self._ospo_batch = None


def segment_frame(sg: Segmentation) -> tuple[str, str]:
    """``(before, after)``: the text before the first segment and after the last (the whole text and ""
    when there is no segment)."""
    if not sg.spans:
        return sg.text, ""
    return sg.text[: sg.spans[0][0]], sg.text[sg.spans[-1][1] :]


class CompletionReward(BatchContextHolder):
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

    @property
    def num_owners(self) -> int | None:
        return len(self.ospo_batch.frames) if self.in_batch else None

    @contextlib.contextmanager
    def bind(self, texts: Sequence[str], segmentations: Sequence[Segmentation]):
        """Frames of this batch's responses (row j: ``segmentations[j]``) for the duration of the block."""
        with self.ospo_batch_scope(BatchContext(frames=[segment_frame(sg) for sg in segmentations])):
            yield self

    def __call__(self, texts: Sequence[str], owners) -> torch.Tensor:
        """float64 ``[len(texts)]``: ``texts[k]`` (a coalition's text) scored as a completion of row ``owners[k]``."""
        if not self.in_batch:
            raise RuntimeError("CompletionReward: call it inside `with reward.bind(texts, segmentations):`")
        rows = [int(o) for o in owners]
        if self.framed:
            frames = self.ospo_batch.frames
            texts = [frames[r][0] + t + frames[r][1] for t, r in zip(texts, rows)]
        scores = self.score_rows(list(texts), rows)
        scores = [float("nan") if s is None else float(s) for s in scores]
        if len(scores) != len(rows):
            raise ValueError(f"score_rows: returned {len(scores)} values for {len(rows)} completions")
        return torch.tensor(scores, dtype=torch.float64).nan_to_num(nan=0.0)
