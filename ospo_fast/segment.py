"""Text -> segments (players, as character spans) -> coalition structure, and coalition texts.

A response is cut into *players* (phrases) grouped into *unions* (sentences or clauses). The value of a
coalition is the reward of :func:`coalition_text`: the kept segments in text order, with the response's
own text between adjacent kept segments and one space where removed ones were. The maps from character
spans to tokens (``token_player_map``, ``token_player_maps``) are part of the credit stage,
:mod:`ospo_fast.token_credit`; they are still importable from here.

>>> sg = Segmenter()("soft cotton tee for summer. navy blue, slim fit")
>>> sg.segments
('soft cotton tee', 'for summer', 'navy blue', 'slim fit')
>>> sg.structure
CoalitionStructure([[0, 1], [2, 3]])
>>> coalition_text(sg, [True, False, False, True])
'soft cotton tee slim fit'
>>> coalition_text(sg, [False, True, True, True])
'for summer. navy blue, slim fit'
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import compress
from typing import Sequence

import torch

from . import defaults
from .structure import MAX_PLAYERS, CoalitionStructure

__all__ = [
    "Segmentation",
    "Segmenter",
    "SpacySegmenter",
    "coalition_text",
    "coalition_texts",
    "token_player_map",  # noqa: F822  (served by __getattr__ from ospo_fast.token_credit)
    "token_player_maps",  # noqa: F822
    "CONJUNCTIONS",
    "PREPOSITIONS",
]

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
_TOKEN = re.compile(rf"[^\s{_SEP}]+(?:(?:[.'’\-]|(?<=\d)[,:/](?=\d))[^\s{_SEP}]+)*")
_WORD_CHAR = re.compile(r"[^\W_]")  # a letter or a digit, any script
# Line boundaries are those of str.splitlines.
_SENTENCE_END = re.compile(r"[.!?;…。！？；\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_CLAUSE_END = re.compile(r"[,，、]")
_ANY_SEP = re.compile(rf"[{_SEP}]")

_NO_BREAK, _PHRASE_BREAK, _UNION_BREAK = 0, 1, 2


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


class SpacySegmenter(_SegmenterBase):
    """Segmenter whose players are spaCy noun chunks and verb phrases, and whose unions are sentences.

    Each noun chunk is a phrase. The other words form runs between punctuation and chunks, and a verb
    after a non-verb starts a new run, so a run is a verb group with its auxiliaries, particles and
    adverbs ("runs fast", "slip on"). Adpositions, conjunctions, determiners and particles outside
    chunks open the phrase after them ("for" + "summer" gives "for summer"), as in :class:`Segmenter`.
    Only the answer is segmented (:meth:`answer_span`), and the player cap is that of :class:`Segmenter`.

    spaCy is imported when the segmenter is built, and the model must be installed::

        pip install spacy && python -m spacy download en_core_web_sm

    Args:
        model: the spaCy pipeline to load (needs a parser for noun chunks and sentences).
        max_players, answer_tags, think_tags: as in :class:`Segmenter`.
        nlp: an already loaded ``spacy.Language`` to use instead of loading ``model``.
        batch_size: documents per ``nlp.pipe`` batch in :meth:`batch`.
    """

    _FUNCTION_POS = frozenset({"ADP", "CCONJ", "SCONJ", "DET", "PART"})

    def __init__(
        self,
        model: str = "en_core_web_sm",
        max_players: int = defaults.SEGMENTER_MAX_PLAYERS,
        answer_tags: tuple[str, str] | None = ("<answer>", "</answer>"),
        think_tags: tuple[str, str] | None = ("<think>", "</think>"),
        nlp=None,
        batch_size: int = 256,
    ):
        super().__init__(max_players, answer_tags, think_tags)
        if nlp is None:
            try:
                import spacy
            except ImportError as exc:
                raise ImportError(
                    "SpacySegmenter needs spaCy: pip install spacy && python -m spacy download "
                    f"{model}  (or use the rule-based ospo_fast.Segmenter)"
                ) from exc
            try:
                nlp = spacy.load(model)
            except OSError as exc:
                raise ImportError(
                    f"spaCy model {model!r} is not installed: python -m spacy download {model}"
                ) from exc
        self.nlp = nlp
        self.model = model
        self.batch_size = int(batch_size)

    def __call__(self, text: str) -> Segmentation:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        return self.batch([text])[0]

    def batch(self, texts: Sequence[str]) -> list[Segmentation]:
        if isinstance(texts, str):
            raise ValueError("texts: expected a sequence of str, got a single str (use seg(text))")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts: item {i} is a {type(t).__name__}, expected a str")
        spans = [self.answer_span(t) for t in texts]
        # One pipe over the answers of all texts keeps spaCy's batching.
        docs = self.nlp.pipe([t[lo:hi] for t, (lo, hi) in zip(texts, spans)], batch_size=self.batch_size)
        return [
            _build(text, _cap_players(self._doc_unions(doc, lo), self.max_players))
            for text, (lo, _), doc in zip(texts, spans, docs)
        ]

    def _unions(self, text, lo, hi):  # pragma: no cover - batch() does the work
        raise NotImplementedError

    def _doc_unions(self, doc, offset: int) -> list[list[list[int]]]:
        """Unions of ``[start, end]`` spans (shifted by ``offset``) for one spaCy ``Doc``."""
        chunk_of = {}  # token index -> (chunk start, chunk end) in token indices
        for chunk in doc.noun_chunks:
            for i in range(chunk.start, chunk.end):
                chunk_of[i] = (chunk.start, chunk.end)
        unions = []
        for sent in doc.sents:
            phrases = _Phrases(unions)
            i = sent.start
            while i < sent.end:
                tok = doc[i]
                if i in chunk_of:
                    a, b = chunk_of[i]
                    b = min(b, sent.end)
                    if phrases.has_content:  # a chunk starts a phrase; held function words join it
                        phrases.end_phrase()
                    for j in range(i, b):
                        self._add(phrases, doc[j], offset, content=True)
                    phrases.end_phrase()
                    i = b
                    continue
                if tok.is_punct or tok.is_space:
                    phrases.end_phrase()
                elif tok.pos_ in self._FUNCTION_POS:
                    if phrases.has_content:
                        phrases.end_phrase()
                    self._add(phrases, tok, offset, content=False)
                else:
                    if tok.pos_ in ("VERB", "AUX") and phrases.has_content and doc[i - 1].pos_ not in ("VERB", "AUX"):
                        phrases.end_phrase()  # a new verb group
                    self._add(phrases, tok, offset, content=True)
                i += 1
            phrases.end_union()
        return unions

    @staticmethod
    def _add(phrases: "_Phrases", tok, offset: int, content: bool) -> None:
        """Add the word characters of one spaCy token (trimmed to its first and last letter or digit)."""
        text = tok.text
        first = _WORD_CHAR.search(text)
        if first is None:
            return
        last = len(text) - _WORD_CHAR.search(text[::-1]).start()
        start = offset + tok.idx
        phrases.add_word(start + first.start(), start + last, content)

    def __repr__(self) -> str:
        return f"SpacySegmenter(model={self.model!r}, max_players={self.max_players})"


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


# --------------------------------------------------------------------------------------------------
# Coalition texts


def coalition_text(sg: Segmentation, mask) -> str:
    """The text of a coalition: the response with only the kept segments left.

    The kept segments come in text order. Between two adjacent kept segments ``i`` and ``i + 1`` stays the
    response's own text between them (``sg.text[sg.spans[i][1]:sg.spans[i + 1][0]]``: ", ", ". ", " & ");
    each run of removed segments between kept ones becomes one space, and removed segments before the first
    kept one or after the last leave nothing. So the grand coalition's text is the response from its first
    segment to its last, ``sg.text[sg.spans[0][0]:sg.spans[-1][1]]``, and v(N) is the response's reward.

    Args:
        sg: the segmentation.
        mask: bool ``[n]`` (a sequence or a 1-D bool tensor), ``n = sg.num_players``; True keeps a player.
    Returns:
        The coalition's text; ``""`` for the empty coalition.
    """
    _check_segmentation(sg)
    n = sg.num_players
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor, got dtype {mask.dtype}")
        if mask.dim() != 1 or mask.numel() != n:
            raise ValueError(f"mask: expected shape [{n}] (one entry per player), got {list(mask.shape)}")
        keep = mask.tolist()
    else:
        try:
            keep = list(mask)
        except TypeError:
            raise ValueError(f"mask: expected a bool sequence of length {n}, got {type(mask).__name__}") from None
        if len(keep) != n:
            raise ValueError(f"mask: has length {len(keep)}, expected {n} (one entry per player)")
        keep = [_as_bool(x) for x in keep]
    return _join_kept(sg, keep)


def coalition_texts(sg: Segmentation, masks) -> list[str]:
    """The texts of many coalitions of one segmentation (see :func:`coalition_text`).

    Args:
        sg: the segmentation.
        masks: bool ``[C, n]`` (a tensor or nested sequences), one coalition per row.
    Returns:
        ``C`` strings, ``coalition_text(sg, masks[c])`` each.
    """
    _check_segmentation(sg)
    n = sg.num_players
    if isinstance(masks, torch.Tensor):
        if masks.dtype != torch.bool:
            raise ValueError(f"masks: expected a bool tensor, got dtype {masks.dtype}")
        if masks.dim() != 2 or masks.size(1) != n:
            raise ValueError(f"masks: expected shape [C, {n}] (one column per player), got {list(masks.shape)}")
        rows = masks.tolist()  # one device -> host copy for all rows
    else:
        rows = []
        for c, row in enumerate(masks):
            row = list(row)
            if len(row) != n:
                raise ValueError(f"masks: row {c} has length {len(row)}, expected {n} (one entry per player)")
            rows.append([_as_bool(x, "masks") for x in row])
    # Plans repeat coalitions across responses and methods; join each distinct row once.
    cache: dict[tuple[bool, ...], str] = {}
    out = []
    for row in rows:
        key = tuple(row)
        text = cache.get(key)
        if text is None:
            text = cache[key] = _join_kept(sg, key)
        out.append(text)
    return out


def _join_kept(sg: Segmentation, keep: Sequence[bool]) -> str:
    """The coalition text of the kept players (``keep``: n bools); the one definition of it."""
    segments, spans = sg.segments, sg.spans
    parts: list[str] = []
    last = -2  # the last kept player so far
    for i in compress(range(len(keep)), keep):
        if parts:  # the response's own gap after an adjacent kept player, else one space for the removed run
            parts.append(sg.text[spans[last][1] : spans[i][0]] if i == last + 1 else " ")
        parts.append(segments[i])
        last = i
    return "".join(parts)


def _as_bool(x, name: str = "mask") -> bool:
    if isinstance(x, bool) or type(x).__name__ == "bool_":  # Python or NumPy bool
        return bool(x)
    if isinstance(x, int) and x in (0, 1):
        return bool(x)
    raise ValueError(f"{name}: entries must be bools (or 0/1), got {x!r}")


def _check_segmentation(sg) -> None:
    if not isinstance(sg, Segmentation):
        raise ValueError(f"sg: expected a Segmentation, got {type(sg).__name__}")


def __getattr__(name: str):
    # The span -> token maps moved up to the credit stage, which imports this module: served on first use.
    if name in ("token_player_map", "token_player_maps"):
        from . import token_credit

        return getattr(token_credit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
