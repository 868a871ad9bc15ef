"""The rule-based segmenter: phrases (opened by conjunctions and prepositions) grouped into sentences or clauses.

Deterministic, language-agnostic tokenisation by character classes, nothing downloaded. Only the answer is
segmented (answer tags and a think block are recognised), and a response has at most ``max_players`` players.
"""

from __future__ import annotations

import heapq
import re
from typing import Sequence

from .. import defaults
from ..structure import MAX_PLAYERS
from .segmentation import Segmentation, _build

# --------------------------------------------------------------------------------------------------
# Lexicon. Conjunctions and prepositions *open* a phrase: "soft cotton tee | for summer",
# "black | and white". They stay in the phrase they open rather than being dropped, so that the grand
# coalition's text keeps every word of the response and v(N) is the reward of the response itself.

#: Words (and symbols) that join phrases; a phrase starts at them.
CONJUNCTIONS = frozenset({"and", "or", "but", "nor", "plus", "&", "+"})

#: Prepositions that start a phrase. Particles that usually belong to the verb before them ("up", "down",
#: "off", "out") and comparatives ("than") are left out; "on" stays, so "slip on shoes" gives
#: "slip | on shoes", a price the query-like texts this is for rarely pay.
PREPOSITIONS = frozenset(
    {
        "about", "above", "across", "after", "against", "along", "among", "around", "at", "before",
        "behind", "below", "beneath", "beside", "besides", "between", "beyond", "by", "despite",
        "during", "except", "for", "from", "in", "including", "inside", "into", "like", "near",
        "of", "on", "onto", "outside", "over", "per", "through", "throughout", "to", "toward",
        "towards", "under", "underneath", "until", "upon", "versus", "via", "vs", "with", "within",
        "without",
    }
)  # fmt: skip

_OPENERS = CONJUNCTIONS | PREPOSITIONS

# A period after these does not end a sentence ("e.g. red", "Nike vs. Adidas"). Kept to abbreviations
# that rarely end one; "etc." and "U.S." often do.
_ABBREVIATIONS = frozenset({"e.g", "i.e", "vs", "cf", "approx", "incl", "esp", "mr", "mrs", "ms", "dr"})

# --------------------------------------------------------------------------------------------------
# Character classes. Every character is whitespace, a separator, or part of a token; a token is a run of
# non-separator characters, glued across "." "'" "-" between its characters (3.5, men's, t-shirt,
# amazon.com) and across "," ":" "/" between digits (1,000, 10:30, 1/2).

_SEP = r""".,;:!?()\[\]{}<>"“”„‘’'`«»‹›/\\|…—–\-_*~=^·•。，；：！？、（）【】「」『』"""
# Invisible characters that separate like a space: zero-width space, word joiner, byte order mark. (The
# zero-width (non-)joiners are left inside tokens: they join letters in some scripts and emoji sequences.)
_INVISIBLE = "\u200b\u2060\ufeff"
_TOKEN = re.compile(rf"[^\s{_INVISIBLE}{_SEP}]+(?:(?:[.'’\-]|(?<=\d)[,:/](?=\d))[^\s{_INVISIBLE}{_SEP}]+)*")
_WORD_CHAR = re.compile(r"[^\W_]")  # a letter or a digit, any script
_AS_SPACE = str.maketrans({c: " " for c in _INVISIBLE})
# Line boundaries are those of str.splitlines.
_SENTENCE_END = re.compile(r"[.!?;…。！？；\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_CLAUSE_END = re.compile(r"[,，、]")
_ANY_SEP = re.compile(rf"[{_SEP}]")

_NO_BREAK, _PHRASE_BREAK, _UNION_BREAK = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Segmenters


class _SegmenterBase:
    """What every segmenter shares: answer extraction, the player cap, the call protocol.

    Subclasses implement ``_unions(text, lo, hi)``: the unions of ``[start, end]`` player spans found in
    ``text[lo:hi]``, in text order, with no empty union.
    """

    def __init__(self, max_players: int, answer_tags, think_tags):
        if isinstance(max_players, bool) or not isinstance(max_players, int) or not 1 <= max_players <= MAX_PLAYERS:
            raise ValueError(f"max_players: expected an int in [1, {MAX_PLAYERS}], got {max_players!r}")
        self.max_players = max_players
        self.answer_tags = _check_tags(answer_tags, "answer_tags")
        self.think_tags = _check_tags(think_tags, "think_tags")
        self._any_tag = _tag_pattern([t for pair in (self.answer_tags, self.think_tags) if pair for t in pair])
        self._answer_open = _tag_pattern(self.answer_tags[:1]) if self.answer_tags else None
        self._think_open = _tag_pattern(self.think_tags[:1]) if self.think_tags else None
        self._think_close = _tag_pattern(self.think_tags[1:]) if self.think_tags else None

    def __call__(self, text: str) -> Segmentation:
        """Segment one response. Returns a :class:`Segmentation` with at most ``max_players`` players."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        unions = self._unions(text, *self.answer_span(text))
        return _build(text, _cap_players(unions, self.max_players))

    def batch(self, texts: Sequence[str]) -> list[Segmentation]:
        """Segment every response of a batch; ``len(result) == len(texts)``."""
        if isinstance(texts, str):
            raise ValueError("texts: expected a sequence of str, got a single str (use seg(text))")
        return [self(t) for t in texts]

    def answer_span(self, text: str) -> tuple[int, int]:
        """The ``[start, end)`` characters of ``text`` that are segmented: the answer.

        It starts after the first opening answer tag that is not inside a closed think block; without
        one, after the think block's closing tag; without either, at the start of the text. A think
        block opened but never closed, with no answer tag, leaves no answer: the response was cut off
        while thinking. The answer ends at the next tag of either pair (the
        closing answer tag, normally), or at the end of the text when it is missing. Tags are matched
        case-insensitively and are never part of a player.
        """
        n = len(text)
        think = closed = None
        if self._think_open is not None:
            think = self._think_open.search(text)
            closed = self._think_close.search(text, think.end() if think is not None else 0)
        opened = self._answer_open.search(text) if self._answer_open is not None else None
        if opened is not None and closed is not None and think is not None:
            if think.end() <= opened.start() < closed.start():  # a tag quoted while thinking
                opened = self._answer_open.search(text, closed.end())
        if opened is not None:
            lo = opened.end()
        elif closed is not None:
            lo = closed.end()
        elif think is not None:
            return n, n
        else:
            lo = 0
        if self._any_tag is not None:
            tag = self._any_tag.search(text, lo)
            if tag is not None:
                return lo, tag.start()
        return lo, n

    def _unions(self, text: str, lo: int, hi: int) -> list[list[list[int]]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_players={self.max_players})"


class Segmenter(_SegmenterBase):
    """Rule-based phrase segmenter: deterministic, pure Python, nothing to download.

    Unions are sentences (``unit="sentence"``: they end at ``. ! ? ;`` and line breaks) or clauses
    (``unit="clause"``: commas end them too). Inside a union, a new phrase starts

    - after punctuation: commas, semicolons, colons, brackets, quotes, slashes, dashes;
    - at a conjunction (:data:`CONJUNCTIONS`) or a preposition (:data:`PREPOSITIONS`) that follows a
      content word. The conjunction or preposition belongs to the phrase it opens ("for summer",
      "and white"); a run of them opens one phrase ("with or without straps").

    So punctuation-free query text still splits: ``"red running shoes for women size 8 with arch
    support"`` gives ``red running shoes | for women size 8 | with arch support``. A phrase made only of
    such function words (a trailing "and") joins the phrase before it in its union, else the one after
    it. Phrases are trimmed to their first and last word (symbols standing alone at an edge, like "&",
    are dropped; "$50" is a word), so no player is empty, whitespace or punctuation only; text with no
    letter or digit gives no players and ``CoalitionStructure([])``. Numbers and compounds stay whole
    ("3.5", "1,000", "men's", "t-shirt"), and a period after a few abbreviations ("e.g.", "vs.") does
    not end a sentence.

    When there are more than ``max_players`` phrases, the shortest phrase (in characters; the earliest on
    ties) is merged with its shorter neighbour in the same union (the left one on ties), or, when it is
    alone in its union, with its shorter neighbour in the next or previous union, which merges the two
    unions; this repeats until ``max_players`` remain. A merged span runs from the first start to the
    last end.

    Only the answer is segmented (see :meth:`answer_span`); spans are relative to the whole response.

    Args:
        max_players: the most players a segmentation may have, at most ``MAX_PLAYERS``.
        unit: ``"sentence"`` or ``"clause"``: what a union is.
        answer_tags: ``(open, close)`` tags around the answer, or None.
        think_tags: ``(open, close)`` tags around the reasoning, or None.
    """

    def __init__(
        self,
        max_players: int = defaults.SEGMENTER_MAX_PLAYERS,
        unit: str = "sentence",
        answer_tags: tuple[str, str] | None = ("<answer>", "</answer>"),
        think_tags: tuple[str, str] | None = ("<think>", "</think>"),
    ):
        super().__init__(max_players, answer_tags, think_tags)
        if unit not in ("sentence", "clause"):
            raise ValueError(f"unit: expected 'sentence' or 'clause', got {unit!r}")
        self.unit = unit

    def _unions(self, text: str, lo: int, hi: int) -> list[list[list[int]]]:
        clause = self.unit == "clause"
        unions: list[list[list[int]]] = []
        phrases = _Phrases(unions)
        prev_end, prev_token = -1, ""
        for m in _TOKEN.finditer(text, lo, hi):
            start, end = m.span()
            if start != prev_end + 1 or text[prev_end] != " ":  # one plain space, the common case, breaks nothing
                level = _gap_level(text[prev_end:start], clause, prev_token) if prev_end >= 0 else _NO_BREAK
                if level == _UNION_BREAK:
                    phrases.end_union()
                elif level == _PHRASE_BREAK:
                    phrases.end_phrase()
            token = m.group()
            prev_end, prev_token = end, token
            is_opener = len(token) <= 11 and token.lower() in _OPENERS
            if is_opener and phrases.has_content:
                phrases.end_phrase()
            if token[0].isalnum() or _WORD_CHAR.search(token) is not None:  # a letter or a digit
                phrases.add_word(start, end, not is_opener)
        phrases.end_union()
        return unions

    def __repr__(self) -> str:
        return f"Segmenter(max_players={self.max_players}, unit={self.unit!r})"


def _gap_level(gap: str, clause: bool, before: str) -> int:
    """How strongly the characters ``gap`` between the token ``before`` and the next one separate them."""
    gap = gap.translate(_AS_SPACE)
    if gap.isspace():
        return _UNION_BREAK if _SENTENCE_END.search(gap) else _NO_BREAK
    if gap[0] == "." and gap[1:].isspace() and "\n" not in gap and before.lower() in _ABBREVIATIONS:
        return _NO_BREAK
    if _SENTENCE_END.search(gap) or (clause and _CLAUSE_END.search(gap)):
        return _UNION_BREAK
    return _PHRASE_BREAK if _ANY_SEP.search(gap) else _NO_BREAK


class _Phrases:
    """Accumulates word tokens into phrases and phrases into unions (appended to ``unions``).

    A phrase spans its first to its last word token. One made only of function words (openers) joins
    the previous phrase of its union, or is held and prepended to the next one; a union holding nothing
    else keeps it as its only player.
    """

    __slots__ = ("unions", "union", "start", "end", "has_content", "held_start", "held_end")

    def __init__(self, unions: list[list[list[int]]]):
        self.unions = unions
        self.union: list[list[int]] = []
        self.start = self.end = -1  # current phrase, -1 while it has no word
        self.has_content = False  # the current phrase has a word that is not an opener
        self.held_start = self.held_end = -1  # function-word-only phrase waiting for the next phrase

    def add_word(self, start: int, end: int, content: bool) -> None:
        if self.start < 0:
            self.start = start
        self.end = end
        self.has_content = self.has_content or content

    def end_phrase(self) -> None:
        if self.start < 0:
            return
        if self.has_content:
            start = self.start if self.held_start < 0 else self.held_start
            self.union.append([start, self.end])
            self.held_start = -1
        elif self.union:
            self.union[-1][1] = self.end
        else:
            if self.held_start < 0:
                self.held_start = self.start
            self.held_end = self.end
        self.start = self.end = -1
        self.has_content = False

    def end_union(self) -> None:
        self.end_phrase()
        if self.held_start >= 0:  # only function words in this union: they are its player
            self.union.append([self.held_start, self.held_end])
            self.held_start = -1
        if self.union:
            self.unions.append(self.union)
            self.union = []


def _check_tags(tags, name: str):
    if tags is None:
        return None
    if (
        isinstance(tags, str)
        or not isinstance(tags, Sequence)
        or len(tags) != 2
        or not all(isinstance(t, str) and t for t in tags)
    ):
        raise ValueError(f"{name}: expected None or a pair of non-empty strings (open, close), got {tags!r}")
    return (tags[0], tags[1])


def _tag_pattern(tags: list[str]):
    if not tags:
        return None
    # Longest first, so that "</think>" is not cut short by a tag that is its prefix.
    alternatives = sorted(set(tags), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in alternatives), re.IGNORECASE)


def _cap_players(unions: list[list[list[int]]], max_players: int) -> list[list[list[int]]]:
    """Merge neighbouring spans until at most ``max_players`` remain (see :class:`Segmenter`).

    A heap keyed by (length, position) finds the shortest span; entries made stale by a merge are
    skipped when popped. O(n log n), for the long answers where it matters.
    """
    n = sum(len(u) for u in unions)
    if n <= max_players:
        return unions
    start, end, group = [], [], []
    for k, union in enumerate(unions):
        for s, e in union:
            start.append(s)
            end.append(e)
            group.append(k)
    parent = list(range(len(unions)))  # union-find over unions, for merges across unions

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    heap = [(end[i] - start[i], i) for i in range(n)]
    heapq.heapify(heap)
    remaining = n
    while remaining > max_players:
        length, i = heapq.heappop(heap)
        if not alive[i] or end[i] - start[i] != length:
            continue  # stale: merged away, or grown since it was pushed
        neighbours = [j for j in (prev[i], nxt[i]) if j >= 0]
        same = [j for j in neighbours if root(group[j]) == root(group[i])]
        # min() keeps the first (left) neighbour on ties.
        j = min(same or neighbours, key=lambda j: end[j] - start[j])
        a, b = (j, i) if j < i else (i, j)  # a is immediately left of b: keep a, absorb b
        end[a] = end[b]
        alive[b] = False
        nxt[a] = nxt[b]
        if nxt[b] >= 0:
            prev[nxt[b]] = a
        ra, rb = root(group[a]), root(group[b])
        if ra != rb:
            parent[rb] = ra
        heapq.heappush(heap, (end[a] - start[a], a))
        remaining -= 1

    merged: list[list[list[int]]] = []
    last_root = -1
    for i in range(n):
        if not alive[i]:
            continue
        r = root(group[i])
        if r != last_root:
            merged.append([])
            last_root = r
        merged[-1].append([start[i], end[i]])
    return merged
