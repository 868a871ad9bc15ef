"""A latent-semantic-analysis sentence encoder: TF-IDF over the item catalogue, then a truncated SVD.

A dense retriever that shares nothing with MiniLM (no pretrained weights; fitted on the catalogue itself),
so it serves as the "another encoder" of the out-of-distribution evaluation when no second pretrained
encoder is installed. Use it as ``DenseRetrievalReward(items, pools, gains, encoder=LSAEncoder(items))``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


class LSAEncoder:
    """TF-IDF (sublinear term frequency, smoothed IDF) of word unigrams, projected on the top ``dim``
    singular vectors of the catalogue's TF-IDF matrix, L2-normalised. Deterministic for given items."""

    def __init__(self, items: Sequence[str], dim: int = 128):
        from scipy.sparse import csr_matrix
        from scipy.sparse.linalg import svds

        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        docs = [self._words(t) for t in items]
        vocab: dict[str, int] = {}
        for words in docs:
            for w in words:
                vocab.setdefault(w, len(vocab))
        if len(vocab) < 2:
            raise ValueError("items: the catalogue needs at least two distinct words for an LSA encoder")
        self.vocab = vocab
        df = np.zeros(len(vocab))
        for words in docs:
            df[[vocab[w] for w in set(words)]] += 1
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1
        matrix = self._tfidf(docs, csr_matrix)
        k = min(dim, min(matrix.shape) - 1)
        _, _, vt = svds(matrix, k=k, random_state=0)
        # svds returns vectors in an arbitrary sign and ascending order: fix both for repeatable embeddings.
        vt = vt[::-1]
        vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]
        self.components = torch.from_numpy(vt.T.copy()).float()  # [V, k]
        self.dim = k
        self.device = torch.device("cpu")
        self.name = f"lsa-{k}"
        self._key = hashlib.sha256("\n".join(items).encode()).hexdigest()

    @staticmethod
    def _words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def _tfidf(self, docs: list[list[str]], csr_matrix):
        rows, cols, vals = [], [], []
        for i, words in enumerate(docs):
            counts: dict[int, int] = {}
            for w in words:
                j = self.vocab.get(w)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            for j, c in counts.items():
                rows.append(i)
                cols.append(j)
                vals.append((1 + np.log(c)) * self.idf[j])
        matrix = csr_matrix((vals, (rows, cols)), shape=(len(docs), len(self.vocab)), dtype=np.float64)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1))).ravel()
        norms[norms == 0] = 1.0
        return csr_matrix(matrix.multiply(1.0 / norms[:, None]))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 ``[N, dim]``, rows L2-normalised (a text with no known word gives the zero vector)."""
        from scipy.sparse import csr_matrix

        tfidf = self._tfidf([self._words(t) for t in texts], csr_matrix)
        emb = torch.from_numpy(np.asarray(tfidf @ self.components.double().numpy())).float()
        return torch.nn.functional.normalize(emb, p=2, dim=-1)

    def cache_key(self) -> str:
        return f"{self.name}:{self._key}"
