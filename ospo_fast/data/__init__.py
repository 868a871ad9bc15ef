"""Data for the generative-search tasks: ESCI and H&M loaders, candidate pools, prompts, a shipped sample.

>>> from ospo_fast.data import default_task, extract_answer, pool_mix
>>> task = default_task()                  # 188 real ESCI queries, pools of 100, no download
>>> mix = pool_mix(task)                   # what the pools hold: {"neighbour": 1.0, ..., "same_category": ...}
>>> reward = task.reward("bm25")           # BM25Reward(task.items, task.pools, task.gains)
>>> s = task.samples[0]
>>> float(reward([s.query], [s.owner])[0]) > 0
True

Official files: ESCI from https://github.com/amazon-science/esci-data (:func:`load_esci`); H&M from the
Kaggle competition (:func:`load_hm`). The shipped default dataset (``default/``) holds ESCI rows only
(Apache-2.0, attribution in ``default/NOTICE``).
"""

from .gains import ESCI_GAINS, esci_gain  # loaded at once, as the prompts: no pandas
from .prompts import (  # loaded at once: the application reads the answer format, and it needs no pandas
    ESCI_SYSTEM,
    ESCI_TEMPLATE,
    ESCI_WORKED_EXAMPLES,
    HM_TEMPLATE,
    MAX_QUERY_WORDS,
    TEMPLATE_FIELDS,
    chat,
    check_template,
    extract_answer,
    follows_format,
    render,
)

#: The names of the modules that read files (they import pandas), loaded on first use.
_LAZY_NAMES = {
    "esci": (
        "ESCI_COLUMNS", "EXAMPLE_COLUMNS", "PRODUCT_COLUMNS", "default_esci_path", "load_default_esci",
        "load_esci", "load_esci_csv", "product_text", "product_text_parts", "title_category",
    ),
    "hm": (
        "ARTICLE_COLUMNS", "CUSTOMER_COLUMNS", "TRANSACTION_COLUMNS", "HMData", "article_text",
        "customer_histories", "load_hm", "normalise_article_id",
    ),
    "ngrams": (
        "char_ngram_vectors", "ngram_neighbours",
    ),
    "negatives": (
        "DEFAULT_MIX", "NEGATIVES",
    ),
    "pools": (
        "KINDS", "Pools", "bm25_ranked", "build_pools", "category_codes",
        "esci_pools", "hm_pools", "owner_rng", "pool_mix",
    ),
    "tasks": (
        "Sample", "SearchTask", "default_task", "esci_task", "held_out_items", "hm_task", "three_way_split",
        "train_eval_split",
    ),
}
_MODULE_OF = {name: module for module, names in _LAZY_NAMES.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        import importlib

        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ARTICLE_COLUMNS",
    "CUSTOMER_COLUMNS",
    "DEFAULT_MIX",
    "ESCI_COLUMNS",
    "ESCI_GAINS",
    "ESCI_TEMPLATE",
    "ESCI_SYSTEM",
    "ESCI_WORKED_EXAMPLES",
    "MAX_QUERY_WORDS",
    "EXAMPLE_COLUMNS",
    "HM_TEMPLATE",
    "HMData",
    "KINDS",
    "NEGATIVES",
    "PRODUCT_COLUMNS",
    "Pools",
    "Sample",
    "SearchTask",
    "TEMPLATE_FIELDS",
    "TRANSACTION_COLUMNS",
    "article_text",
    "bm25_ranked",
    "build_pools",
    "category_codes",
    "char_ngram_vectors",
    "chat",
    "check_template",
    "customer_histories",
    "default_esci_path",
    "default_task",
    "esci_gain",
    "esci_pools",
    "esci_task",
    "extract_answer",
    "follows_format",
    "held_out_items",
    "hm_pools",
    "hm_task",
    "load_default_esci",
    "load_esci",
    "load_esci_csv",
    "load_hm",
    "ngram_neighbours",
    "normalise_article_id",
    "owner_rng",
    "pool_mix",
    "product_text",
    "product_text_parts",
    "render",
    "three_way_split",
    "title_category",
    "train_eval_split",
]
