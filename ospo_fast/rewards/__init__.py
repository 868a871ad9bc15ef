"""Retrieval rewards (dense encoder, BM25) and batched ranking metrics (NDCG, recall, MRR).

A reward is a text value function: ``reward(texts, owners)`` returns a float tensor ``[len(texts)]``, the
ranking metric of each text used as a query against the candidate pool of its owner.
"""

from .bm25 import BM25Reward
from .dense import DenseRetrievalReward
from .encoder import MINILM_NAME, SentenceEncoder, default_cache_dir, encode_cached, load_minilm, mean_pool, minilm_path
from .lsa import LSAEncoder
from .metrics import (
    METRICS,
    check_queries,
    mrr,
    ndcg_at_k,
    pad_pools,
    pool_metric,
    ranking_metrics,
    recall_at_k,
)

__all__ = [
    "DenseRetrievalReward",
    "BM25Reward",
    "LSAEncoder",
    "SentenceEncoder",
    "load_minilm",
    "minilm_path",
    "mean_pool",
    "encode_cached",
    "default_cache_dir",
    "MINILM_NAME",
    "METRICS",
    "ndcg_at_k",
    "recall_at_k",
    "mrr",
    "ranking_metrics",
    "pool_metric",
    "pad_pools",
    "check_queries",
]
