"""The layout of a batch's coalitions: which coalitions of which responses (both kinds of reward), and for the
packed encoder path the host-side arrays of one evaluation and its split into forwards of bounded size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..aggregation import PlanBatch
from ..plans import CoalitionPlan
from ..segment import Segmentation


@dataclass
class CoalitionBatch:
    """The coalitions of a batch of responses, with duplicate responses collapsed.

    ``responses`` index ``unique`` (distinct response texts); ``plans[u]`` is the plan of unique text ``u``.
    Values are laid out per *response* (``PlanBatch(plans of the responses)``), so each response keeps its
    own owner; ``value_source[k]`` says which (unique text, coalition) row value ``k`` comes from.
    """

    segmentations: list[Segmentation]  # per unique text
    plans: list[CoalitionPlan]  # per unique text
    unique_of_response: np.ndarray  # int64 [R]
    owners: np.ndarray  # int64 [R]
    batch: PlanBatch  # over the responses

    @classmethod
    def build(cls, segmentations: Sequence[Segmentation], plans: Sequence[CoalitionPlan], owners) -> "CoalitionBatch":
        key_of: dict[str, int] = {}
        unique_of_response = np.empty(len(segmentations), dtype=np.int64)
        seg_u, plan_u = [], []
        for r, (sg, plan) in enumerate(zip(segmentations, plans)):
            u = key_of.get(sg.text)
            if u is None:
                u = key_of[sg.text] = len(seg_u)
                seg_u.append(sg)
                plan_u.append(plan)
            unique_of_response[r] = u
        owners = np.asarray(owners, dtype=np.int64)
        return cls(seg_u, plan_u, unique_of_response, owners, PlanBatch([plan_u[u] for u in unique_of_response]))

    @property
    def num_responses(self) -> int:
        return len(self.unique_of_response)

    def value_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """For each value of the response-level batch: (unique text, coalition index in its plan)."""
        sizes = np.diff(self.batch.value_offsets)
        response = np.repeat(np.arange(self.num_responses), sizes)
        coalition = np.arange(self.batch.num_values) - self.batch.value_offsets[:-1][response]
        return self.unique_of_response[response], coalition

    def value_owners(self) -> np.ndarray:
        return np.repeat(self.owners, np.diff(self.batch.value_offsets))


@dataclass
class PackedLayout:
    """The host-side layout of one packed evaluation (:meth:`EncoderCoalitionEvaluator.layout`): the distinct
    texts' tokens, the sequences to embed sorted by length, and for every value of the batch its sequence
    and owner. Everything here is numpy; the device half (:meth:`EncoderCoalitionEvaluator.values`) copies
    it over without a stream sync."""

    token_ids: np.ndarray  # int64 [N]: the tokens of all distinct texts' players and gaps, concatenated
    token_need: np.ndarray  # int64 [N]: the players each token needs kept (see pack_coalitions_reference)
    text_offsets: np.ndarray  # int64 [U + 1]
    max_text_tokens: int
    lengths: np.ndarray  # int64 [S]: sequence lengths, [CLS] and [SEP] included, ascending
    seq_text: np.ndarray  # int64 [S]: each sequence's text (-1: the empty coalition)
    seq_keep: np.ndarray  # int64 [S]: bit mask of each sequence's kept players
    value_sequence: np.ndarray  # int64 [num_values]: the sequence of every value of the batch
    value_owners: np.ndarray  # int64 [num_values]

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)


def _chunks(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of sequences holding at most ``max_tokens`` tokens each (at least one)."""
    if int(lengths.sum()) <= max_tokens:  # the common case, without a Python loop over the sequences
        return [(0, len(lengths))] if len(lengths) else []
    chunks, lo, total = [], 0, 0
    for s, n in enumerate(lengths.tolist()):
        if s > lo and total + n > max_tokens:
            chunks.append((lo, s))
            lo, total = s, 0
        total += n
    chunks.append((lo, len(lengths)))
    return chunks
