"""Character n-gram TF-IDF vectors and item-to-item nearest neighbours: the retriever that picks hard negatives.

The pools' negatives (:mod:`ospo_fast.data.pools`) are the catalogue items nearest to an owner's judged
items by the cosine of these vectors. The retriever is deliberately one that nothing else uses: training
scores with MiniLM (dense, pretrained), evaluation with BM25 over words and LSA (word TF-IDF + SVD), so no
table is biased by how its pools were built.

Vectors: the text is lower-cased and cut into words (``\\w+``); each word is padded with a space on both sides
and contributes its character 3-, 4- and 5-grams (n-grams never cross a word boundary, so word order does not
matter). Weights are TF-IDF with sublinear term frequency (``1 + log tf``) and smoothed IDF
(``log((1 + N) / (1 + df)) + 1``, fitted on the texts given); rows are L2-normalised, so a dot product is a
cosine. The vocabulary is numbered in order of first appearance: the same texts give the same matrix on any
machine. numpy and scipy.sparse only.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["NGRAMS", "char_ngrams", "char_ngram_vectors", "ngram_neighbours", "ngram_similarity"]

#: The n-gram lengths (inclusive range).
NGRAMS = (3, 5)

_WORD = re.compile(r"\w+")
#: Scores are rounded to this many decimals before ranking, so a last-bit difference between machines cannot
#: reorder two items (equal rounded scores are ordered by item index).
_DECIMALS = 9
#: Upper bound on the dense score block of one chunk of targets (entries).
_BLOCK = 1 << 22


def char_ngrams(text: str, ngrams: Tuple[int, int] = NGRAMS) -> List[str]:
    """The character n-grams of ``text`` within word boundaries (see the module docstring), in text order.

    >>> char_ngrams("Tea", (3, 4))
    [' te', 'tea', 'ea ', ' tea', 'tea ']
    """
    lo, hi = _check_ngrams(ngrams)
    out: List[str] = []
    for word in _WORD.findall(str(text).lower()):
        padded = f" {word} "
        size = len(padded)
        for n in range(lo, min(hi, size) + 1):
            out.extend(padded[i : i + n] for i in range(size - n + 1))
    return out


def char_ngram_vectors(texts: Sequence[str], ngrams: Tuple[int, int] = NGRAMS):
    """``scipy.sparse.csr_matrix`` ``[len(texts), V]`` float64: L2-normalised char n-gram TF-IDF rows.

    A text without any word gets a zero row (cosine 0 to everything).
    """
    from scipy.sparse import csr_matrix

    lo_hi = _check_ngrams(ngrams)
    vocab: dict = {}
    indptr, indices, counts = [0], [], []
    for text in texts:
        grams = Counter(char_ngrams(text, lo_hi))
        for gram, count in grams.items():
            indices.append(vocab.setdefault(gram, len(vocab)))
            counts.append(count)
        indptr.append(len(indices))
    n = len(indptr) - 1
    indices_arr = np.asarray(indices, dtype=np.int64)
    df = np.bincount(indices_arr, minlength=len(vocab)).astype(np.float64)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    values = (1.0 + np.log(np.asarray(counts, dtype=np.float64))) * idf[indices_arr]
    matrix = csr_matrix((values, indices_arr, np.asarray(indptr, dtype=np.int64)), shape=(n, max(len(vocab), 1)))
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    matrix.data *= np.repeat(scale, np.diff(matrix.indptr))
    return matrix


def ngram_similarity(vectors, targets: Sequence[int], items: Sequence[int]) -> np.ndarray:
    """float64 ``[len(items)]``: each item's highest cosine to any of ``targets`` (rows of ``vectors``).

    0 for every item when ``targets`` is empty.
    """
    items = np.asarray(items, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if not len(targets) or not len(items):
        return np.zeros(len(items))
    return (vectors[items] @ vectors[targets].T).toarray().max(axis=1)


def ngram_neighbours(
    vectors,
    targets: Sequence[Sequence[int]],
    depth: int,
    skip: Optional[Sequence[Sequence[int]]] = None,
    texts: Optional[Sequence[str]] = None,
) -> List[np.ndarray]:
    """For each owner, the items nearest to its ``targets``, best first, at most ``depth``.

    An item's score is its highest cosine (rows of ``vectors``, :func:`char_ngram_vectors`) to any of the
    owner's targets, rounded to 9 decimals; equal scores are ordered by item index, so the order is the same
    on any machine. Left out: items scoring 0 (nothing in common), the targets themselves, the owner's
    ``skip`` items and, when ``texts`` are given, items whose text equals a target's (an unlabelled duplicate
    of the target, which no retriever can rank below it).

    Args:
        vectors: ``[I, V]`` L2-normalised sparse rows, one per catalogue item.
        targets: ``[O]`` lists of item indices.
        depth: the most neighbours returned per owner.
        skip: ``[O]`` item indices never returned (the owner's other judged items, excluded items).
        texts: ``[I]`` item texts, to leave out exact duplicates of a target.
    Returns:
        ``len(targets)`` int64 arrays of item indices.
    """
    num_items = vectors.shape[0]
    if skip is not None and len(skip) != len(targets):
        raise ValueError(f"skip: has {len(skip)} entries for {len(targets)} owners (targets)")
    if texts is not None and len(texts) != num_items:
        raise ValueError(f"texts: has {len(texts)} entries for {num_items} items (vectors)")
    by_text: dict = {}
    if texts is not None:
        for i, t in enumerate(texts):
            by_text.setdefault(t, []).append(i)
    out: List[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(targets)
    rows_per_chunk = max(1, _BLOCK // max(num_items, 1))
    start = 0
    while start < len(targets):
        # A chunk of owners whose targets fit in one dense block (at least one owner).
        stop, rows = start, 0
        while stop < len(targets) and (stop == start or rows + len(targets[stop]) <= rows_per_chunk):
            rows += len(targets[stop])
            stop += 1
        flat = np.asarray([int(t) for o in range(start, stop) for t in targets[o]], dtype=np.int64)
        block = (vectors[flat] @ vectors.T).toarray() if len(flat) else np.zeros((0, num_items))
        row = 0
        for o in range(start, stop):
            own = [int(t) for t in targets[o]]
            if not own:
                row_scores = np.zeros(num_items)
            else:
                row_scores = np.round(block[row : row + len(own)].max(axis=0), _DECIMALS)
            row += len(own)
            banned = set(own)
            if skip is not None:
                banned.update(int(i) for i in skip[o])
            for t in own:
                if texts is not None:
                    banned.update(by_text.get(texts[t], ()))
            hit = np.flatnonzero(row_scores > 0)
            if banned:
                hit = hit[~np.isin(hit, np.fromiter(banned, dtype=np.int64, count=len(banned)))]
            if hit.size > depth:
                floor = np.partition(row_scores[hit], hit.size - depth)[hit.size - depth]
                hit = hit[row_scores[hit] >= floor]
            order = np.lexsort((hit, -row_scores[hit]))
            out[o] = hit[order][:depth].astype(np.int64)
        start = stop
    return out


def _check_ngrams(ngrams) -> Tuple[int, int]:
    try:
        lo, hi = (int(n) for n in ngrams)
    except (TypeError, ValueError):
        raise ValueError(f"ngrams: expected (min, max) n-gram lengths, got {ngrams!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"ngrams: expected 1 <= min <= max, got {ngrams!r}")
    return lo, hi
