"""Two-level coalition structures: players (segments) grouped into unions (sentences)."""

from __future__ import annotations

from typing import Iterable, Sequence

from ._checks import check_int

#: Largest number of players a structure may have. Coalitions are handled as 64-bit masks when plans
#: are built, and a segmenter merges neighbouring segments to stay under this.
MAX_PLAYERS = 64


class CoalitionStructure:
    """A partition of players ``0..n-1`` into unions.

    ``unions[k]`` lists the players of union ``k``. Every player belongs to exactly one union and no union
    is empty. The structure with no players (``CoalitionStructure([])``) is allowed: it stands for a
    response with nothing to attribute.

    >>> s = CoalitionStructure([[0, 1], [2, 3, 4]])
    >>> s.num_players, s.num_unions, s.union_sizes
    (5, 2, (2, 3))
    """

    __slots__ = ("_unions", "_union_of", "_num_players")

    def __init__(self, unions: Iterable[Iterable[int]]):
        try:
            unions = tuple(tuple(int(_as_index(p)) for p in u) for u in unions)
        except TypeError as exc:
            raise ValueError(
                f"unions: expected a list of lists of player indices, got {unions!r} ({exc})"
            ) from None
        seen: dict[int, int] = {}
        for k, union in enumerate(unions):
            if not union:
                raise ValueError(f"unions: union {k} is empty; every union needs at least one player")
            for p in union:
                if p < 0:
                    raise ValueError(f"unions: player {p} in union {k} is negative; players are 0..n-1")
                if p in seen:
                    where = "twice in union" if seen[p] == k else f"in unions {seen[p]} and"
                    raise ValueError(f"unions: player {p} is {where} {k}; each player must be in exactly one union")
                seen[p] = k
        n = len(seen)
        missing = sorted(set(range(n)) - set(seen))
        if missing:
            raise ValueError(
                f"unions: players must be numbered 0..n-1 without gaps; missing player(s) {missing[:8]}"
                f" (largest player is {max(seen)}, so n would be {max(seen) + 1})"
            )
        if n > MAX_PLAYERS:
            raise ValueError(
                f"unions: {n} players is above the supported maximum of {MAX_PLAYERS}; merge segments first"
                " (Segmenter(max_players=...) does this)"
            )
        self._unions = unions
        self._num_players = n
        union_of = [0] * n
        for k, union in enumerate(unions):
            for p in union:
                union_of[p] = k
        self._union_of = tuple(union_of)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "CoalitionStructure":
        """The structure whose union ``k`` holds the next ``sizes[k]`` players, in order. Each size must be a
        positive int (2.5 or True is refused, not rounded)."""
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
            raise ValueError(f"sizes: expected a sequence of positive ints, got {type(sizes).__name__}")
        unions, start = [], 0
        for k, size in enumerate(sizes):
            size = check_int(size, f"sizes[{k}]", 1, expected="a positive int (a union's number of players)")
            unions.append(range(start, start + size))
            start += size
        return cls(unions)

    @property
    def unions(self) -> tuple[tuple[int, ...], ...]:
        return self._unions

    @property
    def num_players(self) -> int:
        return self._num_players

    @property
    def num_unions(self) -> int:
        return len(self._unions)

    @property
    def union_sizes(self) -> tuple[int, ...]:
        return tuple(len(u) for u in self._unions)

    @property
    def union_of(self) -> tuple[int, ...]:
        """``union_of[i]``: the union that player ``i`` belongs to."""
        return self._union_of

    @property
    def is_contiguous(self) -> bool:
        """True when union 0 holds the first players, union 1 the next ones, and so on, each in order."""
        flat = [p for u in self._unions for p in u]
        return flat == list(range(self._num_players))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CoalitionStructure) and self._unions == other._unions

    def __hash__(self) -> int:
        return hash(self._unions)

    def __len__(self) -> int:
        return self._num_players

    def __repr__(self) -> str:
        return f"CoalitionStructure({[list(u) for u in self._unions]})"


def _as_index(p) -> int:
    """An integer player index; bools and non-integral floats are refused rather than silently truncated."""
    if isinstance(p, bool) or not hasattr(p, "__index__"):
        raise TypeError(f"player {p!r} is not an integer")
    return p.__index__()
