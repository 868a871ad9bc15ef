"""BM25 retrieval reward: rank an owner's candidate pool by BM25 score of a text, score the ranking.

:func:`bm25_index` (the catalogue index, tokenised as :meth:`BM25Reward.tokenize`) is public for the data layer,
which ranks catalogue items by BM25 to draw related negatives (:func:`ospo_fast.data.bm25_ranked`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from .metrics import check_metric, check_queries, check_texts, pad_pools, pool_metric

__all__ = ["BM25Reward", "BM25_METHODS", "bm25_index"]

#: ``bm25s`` scoring variants.
BM25_METHODS = ("lucene", "robertson", "atire")


def _bm25s():
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("BM25Reward needs the package bm25s: pip install bm25s") from e
    return bm25s


def _check_method(method: str) -> None:
    if method not in BM25_METHODS:
        raise ValueError(f"method: expected one of {BM25_METHODS}, got {method!r}")


def bm25_index(texts: Sequence[str], k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
    """A ``bm25s.BM25`` index of ``texts`` (tokenised by :meth:`BM25Reward.tokenize`), with BM25 parameters
    ``k1`` and ``b`` and scoring variant ``method`` (one of :data:`BM25_METHODS`)."""
    _check_method(method)
    retriever = _bm25s().BM25(k1=k1, b=b, method=method)
    retriever.index(BM25Reward.tokenize(texts), show_progress=False)
    return retriever


class BM25Reward:
    """Text value function: the retrieval metric of a text used as a BM25 query against its owner's pool.

    The whole item catalogue is indexed once with ``bm25s`` (its scikit-learn-style tokenizer: lowercase,
    words of 2+ word characters, English stopwords removed, no stemming). A text is tokenised the same way
    and each of its owner's pool items gets its BM25 score against the whole-catalogue statistics (IDF and
    average length come from all items, as with a real index; only the pool is ranked). Query terms count
    with their multiplicity, as in ``bm25s``.

    A text with no indexed term (the empty coalition ``""``, or only stopwords) scores every item 0, so the
    pool is ranked in its given order (ties are broken by pool position) and the reward is the metric of that
    order.

    Args:
        items: item texts (the catalogue).
        pools: ``pools[o]``: indices into ``items`` of owner o's candidate pool.
        gains: ``gains[o]``: non-negative gains aligned with ``pools[o]``.
        k: metric cutoff; None for the whole pool.
        metric: "ndcg", "recall" or "mrr".
        k1, b: BM25 parameters.
        method: ``bm25s`` scoring variant: "lucene" (default), "robertson" or "atire".

    Attributes:
        pool_index: long [O, P]; pool_gains: float32 [O, P]; pool_valid: bool [O, P] (CPU).
        retriever: the ``bm25s.BM25`` index.
    """

    def __init__(
        self,
        items: Sequence[str],
        pools,
        gains,
        k: Optional[int] = None,
        metric: str = "ndcg",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
    ):
        items = check_texts(items, "items")
        check_metric(metric, k)
        _check_method(method)
        self.pool_index, self.pool_gains, self.pool_valid = pad_pools(pools, gains, num_items=len(items))
        self.k = k
        self.metric = metric
        self.num_items = len(items)

        self.retriever = bm25_index(items, k1=k1, b=b, method=method)
        sc = self.retriever.scores
        self._vocab = self.retriever.vocab_dict
        self._num_terms = len(sc["indptr"]) - 1
        # bm25s stores per-term columns (CSC over [items, terms]); rows per item make pool lookups cheap.
        from scipy.sparse import csc_matrix

        self._item_term = csc_matrix(
            (sc["data"], sc["indices"], sc["indptr"]), shape=(sc["num_docs"], self._num_terms)
        ).tocsr()
        self._item_term.sort_indices()
        self._pool_index_np = self.pool_index.numpy()

    @property
    def num_owners(self) -> int:
        return self.pool_index.shape[0]

    @staticmethod
    def tokenize(texts: Sequence[str]) -> List[List[str]]:
        """bm25s tokenisation (lowercase, English stopwords removed) -> list of token lists."""
        return _bm25s().tokenize(list(texts), lower=True, stopwords="english", return_ids=False, show_progress=False)

    def pool_scores(self, texts: Sequence[str], owners: torch.Tensor) -> torch.Tensor:
        """BM25 scores float32 [N, P] of each text against its owner's pool (padding columns 0)."""
        n, width = len(texts), self.pool_index.shape[1]
        # Coalition texts repeat: tokenise each distinct text once.
        distinct = list(dict.fromkeys(texts))
        tokens = dict(zip(distinct, self.tokenize(distinct)))
        rows, cols = [], []
        for j, t in enumerate(texts):
            ids = [self._vocab[w] for w in tokens[t] if w in self._vocab]
            rows.extend([j] * len(ids))
            cols.extend(ids)
        q_rows = np.asarray(rows, dtype=np.int64)
        q_terms = np.asarray(cols, dtype=np.int64)
        keep = q_terms < self._num_terms
        q_rows, q_terms = q_rows[keep], q_terms[keep]

        scores = np.zeros((n, width), dtype=np.float64)
        if q_rows.size:
            pools = self._pool_index_np[owners.numpy()]  # [N, P]
            # One lookup per (query term occurrence, pool entry): score[j, p] += S[pools[j, p], term].
            # Chunked so the lookup arrays stay around 2^22 entries.
            step = max(1, (1 << 22) // width)
            for s in range(0, q_rows.size, step):
                r, t = q_rows[s : s + step], q_terms[s : s + step]
                item = pools[r]  # [m, P]
                vals = np.asarray(self._item_term[item.ravel(), np.repeat(t, width)]).reshape(item.shape)
                np.add.at(scores, r, vals)
            scores *= self.pool_valid.numpy()[owners.numpy()]  # padding points at item 0: zero it
        return torch.from_numpy(scores).to(torch.float32)

    def __call__(self, texts: Sequence[str], owners) -> torch.Tensor:
        """Reward float32 [len(texts)] (CPU): the metric of each text's BM25 ranking of its owner's pool."""
        own = check_queries(texts, owners, self.num_owners)
        scores = self.pool_scores(list(texts), own)
        out = pool_metric(self.metric, scores, self.pool_gains[own], self.pool_valid[own], self.k)
        return out.to(torch.float32)
