"""The result of segmentation: a response cut into players (character spans) grouped into unions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..structure import CoalitionStructure

# --------------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class Segmentation:
    """A response cut into players.

    Attributes:
        text: the whole response.
        spans: ``spans[i] = (start, end)``, the ``[start, end)`` characters of player ``i`` in ``text``;
            in text order, disjoint, non-empty.
        structure: the players grouped into unions of consecutive players (union 0 holds the first ones).
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    structure: CoalitionStructure

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"text: expected a str, got {type(self.text).__name__}")
        spans = tuple((int(s), int(e)) for s, e in self.spans)
        object.__setattr__(self, "spans", spans)
        last = 0
        for i, (s, e) in enumerate(spans):
            if not (last <= s < e <= len(self.text)):
                raise ValueError(
                    f"spans: span {i} = {(s, e)} must be non-empty, inside the text (length {len(self.text)})"
                    f" and start at or after the previous span's end ({last})"
                )
            last = e
        if not isinstance(self.structure, CoalitionStructure):
            raise ValueError(f"structure: expected a CoalitionStructure, got {type(self.structure).__name__}")
        if self.structure.num_players != len(spans):
            raise ValueError(
                f"structure: has {self.structure.num_players} players but there are {len(spans)} spans"
            )
        if not self.structure.is_contiguous:
            raise ValueError(f"structure: unions must be contiguous runs of players, got {self.structure}")

    @property
    def num_players(self) -> int:
        return len(self.spans)

    @cached_property
    def segments(self) -> tuple[str, ...]:
        """The players' texts, ``text[start:end]`` for each span."""
        return tuple(self.text[s:e] for s, e in self.spans)


def _build(text: str, unions: list[list[list[int]]]) -> Segmentation:
    """A Segmentation from unions of ``[start, end]`` spans (empty unions already removed)."""
    spans = tuple((s, e) for union in unions for s, e in union)
    return Segmentation(text, spans, _structure(tuple(len(u) for u in unions)))


@lru_cache(maxsize=4096)
def _structure(sizes: tuple[int, ...]) -> CoalitionStructure:
    # Few distinct shapes recur across a batch; structures are immutable, so they can be shared.
    return CoalitionStructure.from_sizes(sizes)
