"""Text -> segments (players, as character spans) -> coalition structure, and coalition texts.

A response is cut into *players* (phrases) grouped into *unions* (sentences or clauses). The value of a
coalition is the reward of :func:`coalition_text`: the kept segments in text order, with the response's
own text between adjacent kept segments and one space where removed ones were. The maps from character
spans to a tokenizer's tokens are part of the credit stage, :mod:`ospo_fast.credit`.

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

from .coalition_text import coalition_text, coalition_texts
from .segmentation import Segmentation
from .segmenter import CONJUNCTIONS, PREPOSITIONS, Segmenter
from .spacy_segmenter import SpacySegmenter

__all__ = [
    "CONJUNCTIONS",
    "PREPOSITIONS",
    "Segmentation",
    "Segmenter",
    "SpacySegmenter",
    "coalition_text",
    "coalition_texts",
]
