"""Dense retrieval reward: rank an owner's candidate pool by cosine similarity to a text, score the ranking."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .encoder import SentenceEncoder, check_cache_dir, encode_cached
from .metrics import check_metric, check_queries, check_texts, pad_pools, pool_metric

__all__ = ["DenseRetrievalReward"]


class DenseRetrievalReward:
    """Text value function: the retrieval metric of a text used as a query against its owner's pool.

    ``reward(texts, owners)[j]`` embeds ``texts[j]``, ranks the pool ``pools[owners[j]]`` by cosine similarity
    to the item embeddings (ties by pool position) and returns the metric of that ranking under
    ``gains[owners[j]]``.

    Args:
        items: item texts (the catalogue); embedded once, cached on disk (see :func:`encode_cached`).
        pools: ``pools[o]``: indices into ``items`` of owner o's candidate pool; pools may differ in length.
        gains: ``gains[o]``: non-negative gains aligned with ``pools[o]`` (ESCI: see :func:`~ospo_fast.data.esci_gain`).
        encoder: a :class:`SentenceEncoder`; None loads the bundled all-MiniLM-L6-v2.
        k: metric cutoff; None for the whole pool.
        metric: "ndcg" (linear gain, log2 discount), "recall" or "mrr".
        cache_dir: embedding cache directory (a non-empty path); None for the default, False to disable.
        device: where embeddings and pool tensors live; None follows the encoder.

    Attributes (for evaluators that produce query embeddings themselves):
        item_embeddings: float32 [I, D], L2-normalised.
        pool_index: long [O, P]; pool_gains: float32 [O, P]; pool_valid: bool [O, P] (from ``pad_pools``).
    """

    def __init__(
        self,
        items: Sequence[str],
        pools,
        gains,
        encoder: Optional[SentenceEncoder] = None,
        k: Optional[int] = None,
        metric: str = "ndcg",
        cache_dir=None,
        device: Union[str, torch.device, None] = None,
    ):
        items = check_texts(items, "items")
        check_metric(metric, k)
        # Validate the pools before loading or running any model.
        index, pool_gains, valid = pad_pools(pools, gains, num_items=len(items))
        check_cache_dir(cache_dir)
        if encoder is None:
            encoder = SentenceEncoder(device=device)
        self.encoder = encoder
        self.device = torch.device(device) if device is not None else torch.device(getattr(encoder, "device", "cpu"))
        self.k = k
        self.metric = metric
        self.num_items = len(items)
        self.item_embeddings = encode_cached(encoder, items, cache_dir=cache_dir).to(self.device, torch.float32)
        self.pool_index = index.to(self.device)
        self.pool_gains = pool_gains.to(self.device)
        self.pool_valid = valid.to(self.device)

    @property
    def num_owners(self) -> int:
        return self.pool_index.shape[0]

    def pool_scores(self, query_emb: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Cosine similarities float32 [N, P] of each query embedding [N, D] with its owner's pool items.

        Padding columns hold arbitrary values; mask them with ``self.pool_valid[owners]``.
        """
        q = query_emb.to(self.item_embeddings.dtype)
        index = self.pool_index[owners]  # [N, P]
        num_items, width = self.item_embeddings.shape[0], index.shape[1]
        if num_items <= 16 * width:
            # Small catalogue: one GEMM against every item, then pick the pool columns.
            return (q @ self.item_embeddings.T).gather(1, index)
        # Large catalogue: gather each query's pool, in chunks bounded to ~2^26 floats of gathered embeddings.
        dim = q.shape[1]
        chunk = max(1, (1 << 26) // max(1, width * dim))
        parts = [
            torch.bmm(self.item_embeddings[index[s : s + chunk]], q[s : s + chunk].unsqueeze(-1)).squeeze(-1)
            for s in range(0, q.shape[0], chunk)
        ]
        return torch.cat(parts) if parts else q.new_zeros(0, width)

    def score_embeddings(self, query_emb: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Metric float32 [N] for given L2-normalised query embeddings [N, D] and owner indices long [N].

        Runs on the device with no host synchronisation. Owner indices are range-checked only when ``owners``
        is a CPU tensor (a device-side check would synchronise).
        """
        if query_emb.dim() != 2 or query_emb.shape[1] != self.item_embeddings.shape[1]:
            raise ValueError(
                f"query_emb: expected shape [N, {self.item_embeddings.shape[1]}], got {tuple(query_emb.shape)}"
            )
        if owners.dim() != 1 or owners.shape[0] != query_emb.shape[0]:
            raise ValueError(f"owners: expected shape [{query_emb.shape[0]}], got {tuple(owners.shape)}")
        if owners.device.type == "cpu" and owners.numel() and (owners.min() < 0 or owners.max() >= self.num_owners):
            raise ValueError(f"owners: owner index out of range for {self.num_owners} pools")
        owners = owners.to(self.device, torch.long)
        scores = self.pool_scores(query_emb.to(self.device), owners)
        out = pool_metric(self.metric, scores, self.pool_gains[owners], self.pool_valid[owners], self.k)
        return out.to(torch.float32)

    def __call__(self, texts: Sequence[str], owners) -> torch.Tensor:
        """Reward float32 [len(texts)] on ``self.device``: the metric of each text's ranking of its owner's pool."""
        own = check_queries(texts, owners, self.num_owners)
        if isinstance(self.encoder, SentenceEncoder):
            emb = self.encoder.encode(list(texts), show_progress=False)  # no progress bar per reward call
        else:
            emb = self.encoder.encode(list(texts))
        return self.score_embeddings(emb, own)
