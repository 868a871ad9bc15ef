"""Search tasks: prompts for a policy plus the candidate pools its answers are scored against.

A :class:`SearchTask` is what training and evaluation consume: ``task.samples`` give the prompts, and
``task.items, task.pools, task.gains`` go straight into a retrieval reward::

    task = default_task()                       # 200 real ESCI queries shipped with the package
    reward = task.reward("bm25")                # or BM25Reward(task.items, task.pools, task.gains)
    answers = [extract_answer(c) for c in completions]
    r = reward(answers, [s.owner for s in batch])

- ESCI (:func:`esci_task`): an under-specified shopping query -> the model writes a search query -> the
  pool holds the query's judged products (ESCI gains E=1, S=0.1, C=0.01, I=0) and negatives.
- H&M (:func:`hm_task`): a customer's earlier purchases -> the model describes the next item -> the pool
  holds the article bought next (gain 1) and negatives.

The negatives are by default the catalogue items nearest to the targets by a retriever used nowhere else
(``negatives="neighbours"``; ``negatives="mix"`` or ``mix=`` for the reference category / related / random mix;
:mod:`ospo_fast.data.pools`); :func:`~ospo_fast.data.pool_mix` reports what the pools hold.

Splits: :meth:`SearchTask.split` (train / eval) and :meth:`SearchTask.three_way_split` (train / validation /
test) keep every pool, so one reward serves all parts; :meth:`SearchTask.held_out_items` names the items
judged for held-out samples, which anything fitted for training (a vocabulary, an LSA encoder) should not see.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .._checks import check_int
from ..defaults import REWARD_KINDS
from .esci import load_default_esci, load_esci, load_esci_csv
from .hm import HMData, article_text, customer_histories, load_hm
from .pools import Pools, esci_pools, hm_pools
from .prompts import ESCI_SYSTEM, ESCI_TEMPLATE, ESCI_WORKED_EXAMPLES, HM_TEMPLATE, chat, check_template, render

__all__ = [
    "Sample",
    "SearchTask",
    "esci_task",
    "hm_task",
    "default_task",
    "train_eval_split",
    "three_way_split",
    "held_out_items",
]


@dataclass(frozen=True)
class Sample:
    """One prompt of a search task.

    Attributes:
        id: a stable id (``"esci-<query_id>"``, ``"hm-<customer_id>"``).
        owner: index into the task's ``pools`` / ``gains``: the owner to pass to the reward.
        prompt: chat messages (``[{"role": ..., "content": ...}]``), the user message last.
        text: the user message as plain text.
        query: ESCI: the shopper's original query; H&M: None.
        target_ids: ids of the items to find, best first (ESCI: judged products with a positive gain;
            H&M: the next article).
        info: extra reference data (ESCI: ``{"judged": {product_id: gain}}``; H&M: ``{"history": [ids]}``).
    """

    id: str
    owner: int
    prompt: List[Dict[str, str]]
    text: str
    query: Optional[str]
    target_ids: Tuple[str, ...]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchTask:
    """Samples and the candidate pools they are scored against.

    Attributes:
        name: the task's name ("esci", "esci-default", "hm", ...).
        items: ``[I]`` item texts, the catalogue.
        item_ids: ``[I]`` the items' dataset ids.
        pools: ``[O]`` lists of indices into ``items``.
        gains: ``[O]`` lists of gains aligned with ``pools``.
        kinds: ``[O]`` lists of entry kinds (:data:`~ospo_fast.data.KINDS`: "judged", "neighbour", "category",
            "related", "random").
        samples: the samples; ``sample.owner`` indexes ``pools``. A split keeps every pool, so owners stay valid
            and one reward serves every part.
        categories: ``[I]`` each item's category key (ESCI: the title's head noun; H&M: ``product_type_name``;
            ``""``: none), for :func:`~ospo_fast.data.pool_mix`; None: unknown.
    """

    name: str
    items: List[str]
    item_ids: List[str]
    pools: List[List[int]]
    gains: List[List[float]]
    kinds: List[List[str]]
    samples: List[Sample]
    categories: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def owners(self) -> List[int]:
        """``[len(samples)]`` each sample's owner."""
        return [s.owner for s in self.samples]

    @property
    def prompts(self) -> List[List[Dict[str, str]]]:
        """``[len(samples)]`` chat prompts."""
        return [s.prompt for s in self.samples]

    def select(self, indices: Sequence[int]) -> "SearchTask":
        """The task with only ``samples[i]`` for ``i`` in ``indices`` (pools unchanged)."""
        return replace(self, samples=[self.samples[int(i)] for i in indices])

    def split(self, eval_fraction: float = 0.1, seed: int = 0) -> Tuple["SearchTask", "SearchTask"]:
        """``(train, eval)``: see :func:`train_eval_split`."""
        return train_eval_split(self, eval_fraction, seed)

    def three_way_split(
        self, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
    ) -> Tuple["SearchTask", "SearchTask", "SearchTask"]:
        """``(train, val, test)``: see :func:`three_way_split`."""
        return three_way_split(self, val_fraction, test_fraction, seed)

    def held_out_items(self, *others: "SearchTask") -> List[int]:
        """Sorted indices into this task's ``items`` of the items judged with a positive gain for the samples
        of ``others`` (held-out parts of this task: its validation and test splits).

        Fit anything training may see (a vocabulary, an LSA encoder) on the rest of the catalogue::

            train, val, test = task.three_way_split()
            held = set(train.held_out_items(val, test))
            fit_items = [t for i, t in enumerate(task.items) if i not in held]

        Raises ``ValueError`` when another task has a different catalogue (its indices would mean other items).
        """
        for k, other in enumerate(others):
            if not isinstance(other, SearchTask):
                raise ValueError(f"others[{k}]: expected a SearchTask, got {type(other).__name__}")
            if other.items is not self.items and (other.item_ids != self.item_ids or other.items != self.items):
                raise ValueError(f"others[{k}]: task {other.name!r} has a different catalogue (items) from this task")
        return held_out_items(*others)

    def reward(self, kind: str = "bm25", **kwargs):
        """A retrieval reward over this task's pools: ``"bm25"`` (:class:`~ospo_fast.rewards.BM25Reward`) or
        ``"dense"`` (:class:`~ospo_fast.rewards.DenseRetrievalReward`); ``kwargs`` go to its constructor."""
        from .. import rewards

        classes = {"bm25": rewards.BM25Reward, "dense": rewards.DenseRetrievalReward}
        if kind not in REWARD_KINDS:
            raise ValueError(f"kind: expected one of {list(REWARD_KINDS)}, got {kind!r}")
        return classes[kind](self.items, self.pools, self.gains, **kwargs)


def train_eval_split(task: SearchTask, eval_fraction: float = 0.1, seed: int = 0) -> Tuple[SearchTask, SearchTask]:
    """Split a task's samples at random (PCG64, ``seed``) into train and eval, each in the original order.

    ``round(eval_fraction * len(task))`` samples go to eval, at least one of each side when there are two or
    more samples and ``0 < eval_fraction < 1``.
    """
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction: expected a number in [0, 1], got {eval_fraction!r}")
    n = len(task.samples)
    n_eval = int(round(eval_fraction * n))
    if 0 < eval_fraction < 1 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    perm = np.random.Generator(np.random.PCG64(check_int(seed, "seed", 0))).permutation(n)
    eval_idx = sorted(perm[:n_eval].tolist())
    chosen = set(eval_idx)
    return task.select([i for i in range(n) if i not in chosen]), task.select(eval_idx)


def three_way_split(
    task: SearchTask, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Tuple[SearchTask, SearchTask, SearchTask]:
    """Split a task's samples at random (PCG64, ``seed``) into train, validation and test, each in the
    original order; disjoint, together all samples.

    ``round(test_fraction * n)`` samples go to test and ``round(val_fraction * n)`` to validation. Each part
    with a non-zero fraction gets at least one sample when there are enough samples for that (one per part);
    train always keeps at least one. The test part is the one :func:`train_eval_split` with
    ``eval_fraction=test_fraction`` and the same seed would give, so ``val_fraction=0`` reproduces that split.

    Raises:
        ValueError: a fraction outside ``[0, 1)``, or fractions summing to 1 or more (naming the argument).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction, test_fraction: expected a sum below 1 (train needs samples), got "
            f"{val_fraction!r} + {test_fraction!r}"
        )
    n = len(task.samples)
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    if n >= 1 + (val_fraction > 0) + (test_fraction > 0):
        if test_fraction > 0:
            n_test = max(n_test, 1)
        if val_fraction > 0:
            n_val = max(n_val, 1)
        while n_test + n_val > n - 1:  # train keeps one: take it from the larger part, never below one
            if n_val > n_test or (n_val == n_test and n_val > 1):
                n_val -= 1
            else:
                n_test -= 1
    else:  # too few samples for one per part: train keeps one, then test, then validation
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
    perm = np.random.Generator(np.random.PCG64(check_int(seed, "seed", 0))).permutation(n)
    test_idx = sorted(perm[:n_test].tolist())
    val_idx = sorted(perm[n_test : n_test + n_val].tolist())
    held = set(test_idx) | set(val_idx)
    return task.select([i for i in range(n) if i not in held]), task.select(val_idx), task.select(test_idx)


def held_out_items(*tasks: SearchTask) -> List[int]:
    """Sorted indices of the catalogue items judged with a positive gain for any sample of ``tasks`` (which
    share one catalogue: parts of one task). See :meth:`SearchTask.held_out_items`."""
    out = set()
    for task in tasks:
        for s in task.samples:
            out.update(int(i) for i, g in zip(task.pools[s.owner], task.gains[s.owner]) if g > 0)
    return sorted(out)


def esci_task(
    source,
    pool_size: int = 100,
    seed: int = 0,
    mix: Optional[Sequence[float]] = None,
    template: Optional[str] = None,
    max_samples: Optional[int] = None,
    *,
    negatives: Optional[str] = None,
    system: Optional[str] = None,
    worked_examples: Optional[Sequence[Tuple[str, str]]] = None,
    max_item_chars: int = 600,
    require_relevant: bool = True,
    name: str = "esci",
) -> SearchTask:
    """The ESCI generative-search task.

    Args:
        source: a joined ESCI DataFrame (:func:`~ospo_fast.data.load_esci`), the path of a flat ESCI CSV
            (:func:`~ospo_fast.data.load_esci_csv`), or ``(examples_path, products_path)`` of the official
            parquet files (loaded with :func:`~ospo_fast.data.load_esci`'s defaults: train, small, us).
        pool_size: candidates per query (judged + negatives).
        seed: seeds the negatives (:mod:`ospo_fast.data.pools`).
        mix: shares of negatives (category, related, random) with ``negatives="mix"``; given alone, it selects
            ``"mix"``.
        template: a format string with the field ``{request}``; default :data:`~ospo_fast.data.ESCI_TEMPLATE`.
        max_samples: keep the first this many queries.
        negatives: ``"neighbours"`` (default: the products nearest to the judged ones by char n-gram TF-IDF)
            or ``"mix"`` (:mod:`ospo_fast.data.pools`).
        system: the system message of every prompt; default :data:`~ospo_fast.data.ESCI_SYSTEM` with the
            default template, none with a template of your own.
        worked_examples: (request, query) exchanges shown before the request; default
            :data:`~ospo_fast.data.ESCI_WORKED_EXAMPLES` with the default template, none with your own.
        max_item_chars: item text length.
        require_relevant: drop queries with no judged product of positive gain.
        name: the task's name.
    Returns:
        A :class:`SearchTask` with one sample per query.
    """
    if template is None:
        template = ESCI_TEMPLATE
        system = ESCI_SYSTEM if system is None else system
        worked_examples = ESCI_WORKED_EXAMPLES if worked_examples is None else worked_examples
    template = check_template(template, "esci")
    frame = _esci_frame(source)
    pools = esci_pools(
        frame, pool_size=pool_size, mix=mix, seed=seed, max_item_chars=max_item_chars,
        require_relevant=require_relevant, max_owners=_check_max_samples(max_samples), negatives=negatives,
    )  # fmt: skip
    queries = dict(zip(frame["query_id"].astype(str), frame["query"]))
    samples = []
    for o, qid in enumerate(pools.owners):
        query = str(queries[qid])
        judged = _judged(pools, o)
        text = render(template, "esci", request=query)
        samples.append(
            Sample(
                id=f"esci-{qid}",
                owner=o,
                prompt=chat(text, system, worked_examples or ()),
                text=text,
                query=query,
                target_ids=tuple(pid for pid, g in judged.items() if g > 0),
                info={"judged": judged},
            )
        )
    return _task(name, pools, samples)


def hm_task(
    source,
    pool_size: int = 100,
    seed: int = 0,
    mix: Optional[Sequence[float]] = None,
    template: Optional[str] = None,
    max_samples: Optional[int] = None,
    *,
    negatives: Optional[str] = None,
    system: Optional[str] = None,
    max_history: int = 10,
    history_chars: int = 160,
    max_item_chars: int = 400,
    min_history: int = 1,
    name: str = "hm",
) -> SearchTask:
    """The H&M next-item task.

    A customer's purchases, sorted by date (:func:`~ospo_fast.data.customer_histories`), give a history (all
    but the last) and a target (the last). The prompt lists the last ``max_history`` history items.

    Args:
        source: an :class:`~ospo_fast.data.HMData` with articles and transactions (customers optional:
            they fill the template's ``{age}``), or ``(articles_path, customers_path, transactions_path)``.
        pool_size, seed, mix, max_samples, negatives, system, name: as for :func:`esci_task` (neighbours: the
            articles nearest to the target; the customer's earlier purchases are never negatives).
        template: a format string with fields among ``{history}``, ``{num_items}``, ``{age}``; default
            :data:`~ospo_fast.data.HM_TEMPLATE`.
        max_history: the most history items shown in a prompt (the latest).
        history_chars: text length of each history item in the prompt.
        max_item_chars: text length of the catalogue items.
        min_history: the fewest earlier purchases a customer needs.
    Returns:
        A :class:`SearchTask` with one sample per kept customer.
    """
    template = check_template(HM_TEMPLATE if template is None else template, "hm")
    data = source if isinstance(source, HMData) else load_hm(*source)
    if data.transactions is None:
        raise ValueError("source: the H&M task needs transactions (load_hm(..., transactions_path=...))")
    histories = customer_histories(data.transactions, min_history)
    histories = histories[histories["target"].isin(set(data.articles["article_id"]))]
    limit = _check_max_samples(max_samples)
    if limit is not None:
        histories = histories.head(limit)
    pools = hm_pools(
        data, histories, pool_size=pool_size, mix=mix, seed=seed, max_item_chars=max_item_chars, negatives=negatives
    )

    articles = data.articles.set_index("article_id")
    ages = {}
    if data.customers is not None:
        ages = dict(zip(data.customers["customer_id"], data.customers["age"]))
    by_customer = histories.set_index("customer_id")
    samples = []
    for o, cid in enumerate(pools.owners):
        history = list(by_customer.at[cid, "history"])
        shown = [a for a in history if a in articles.index][-max_history:]
        lines = [
            "- " + article_text(articles.loc[a].to_dict(), history_chars).replace("\n", ". ") for a in shown
        ]
        age = ages.get(cid)
        text = render(
            template, "hm", history="\n".join(lines), num_items=len(shown),
            age="unknown" if age is None or pd.isna(age) else str(int(age)),
        )  # fmt: skip
        samples.append(
            Sample(
                id=f"hm-{cid}",
                owner=o,
                prompt=chat(text, system),
                text=text,
                query=None,
                target_ids=(str(by_customer.at[cid, "target"]),),
                info={"history": history},
            )
        )
    return _task(name, pools, samples)


def default_task(seed: int = 0, pool_size: int = 100, **kwargs) -> SearchTask:
    """The ESCI task on the default dataset shipped with the package (no download).

    200 real ESCI queries (us), one judged product each; queries whose product is judged Irrelevant are
    dropped (``require_relevant``), leaving 188. The catalogue is the 200 products, so every pool has 100
    candidates: the judged product and its 99 nearest neighbours by char n-gram TF-IDF (``negatives=
    "neighbours"``; pass ``negatives="mix"`` for the reference mix, which this small catalogue mostly fills
    with random products). ``kwargs`` go to :func:`esci_task`.
    """
    kwargs.setdefault("name", "esci-default")
    return esci_task(load_default_esci(), pool_size=pool_size, seed=seed, **kwargs)


# ----------------------------------------------------------------------------------------------------


def _esci_frame(source) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, (str, Path)):
        return load_esci_csv(source)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return load_esci(*source)
    raise ValueError(
        "source: expected a joined ESCI DataFrame, a flat ESCI CSV path, or (examples_path, products_path), "
        f"got {type(source).__name__}"
    )


def _check_max_samples(max_samples) -> Optional[int]:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples: expected a positive int or None, got {max_samples!r}")
    return max_samples


def _judged(pools: Pools, owner: int) -> Dict[str, float]:
    """product_id -> gain of an owner's judged entries, best first."""
    entries = zip(pools.pools[owner], pools.gains[owner], pools.kinds[owner])
    pairs = [(pools.item_ids[i], g) for i, g, k in entries if k == "judged"]
    return dict(sorted(pairs, key=lambda p: -p[1]))


def _task(name: str, pools: Pools, samples: List[Sample]) -> SearchTask:
    return SearchTask(
        name, pools.items, pools.item_ids, pools.pools, pools.gains, pools.kinds, samples, pools.categories
    )
