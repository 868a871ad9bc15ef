"""A segmenter whose players are spaCy noun chunks and verb phrases, and whose unions are sentences."""

from __future__ import annotations

from typing import Sequence

from .. import defaults
from .segmentation import Segmentation, _build
from .segmenter import _WORD_CHAR, _cap_players, _Phrases, _SegmenterBase


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
