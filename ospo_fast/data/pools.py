"""Candidate pools: the judged items of each owner (query or customer) plus seeded negatives.

A pool holds an owner's judged items with their gains, then negatives (gain 0) up to ``pool_size``. Two ways
to draw the negatives (``negatives=``):

- ``"neighbours"`` (the default of :func:`esci_pools`, :func:`hm_pools` and the tasks): the hardest the
  catalogue allows, the items **nearest to the owner's targets** (its judged items with a positive gain; all
  of them when none has), best first, by the cosine of character 3-5-gram TF-IDF vectors of the item texts
  (:mod:`ospo_fast.data.ngrams`). That retriever is neither the training one (MiniLM) nor an evaluation one
  (BM25 and LSA over words), so no table is biased by how its pools were built. Items whose text equals a
  target's (unlabelled duplicates) are left out. Entry kind ``"neighbour"``;
- ``"mix"``: a fixed mix of three kinds, as in the OSPO reference setup (``mix``, default 50 / 30 / 20):

  - **category**: items of the same kind as a judged item. The kind is given by category keys tried in order
    (ESCI: the head noun of the title, then the brand; H&M: ``product_type_name``, then
    ``garment_group_name``); drawn at random among the matches;
  - **related**: the items lexically nearest to the owner's query text by BM25 over the whole catalogue, best
    first;
  - **random**: uniform over the rest of the catalogue.

  A kind that runs short passes its share on (category -> related -> random). Passing ``mix=`` alone selects
  this way, so callers written before ``negatives=`` keep their meaning.

When the neighbours run short (items sharing no n-gram with the targets) the rest are random. When the
catalogue itself runs short the pool is smaller, with a warning. Negatives are never an owner's judged items,
nor items in its ``exclude`` set (a customer's earlier purchases). Each owner draws from its own ``numpy``
PCG64 generator seeded by ``(seed, owner key)``: the same seed gives the same pools on any machine and
whatever other owners are built alongside. The pool is shuffled last, so an uninformative query (one that
ties every item, which the rewards rank in pool order) gets a chance-level score, not the judged items' top
spots.

:func:`pool_mix` measures what a set of pools holds: the share of negatives of each kind, and, whatever way
they were drawn, how many share a category with their pool's target and how similar to it they are compared
with random catalogue items.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .._checks import check_int
from ._common import require_columns
from .esci import product_text, title_category
from .gains import esci_gain
from .hm import HMData, article_text
from .negatives import (
    category_groups,
    category_text,
    draw_uniform,
    first_free,
    quotas_of,
    resolve_negatives,
    target_neighbours,
)
from .ngrams import char_ngram_vectors, ngram_similarity

__all__ = [
    "KINDS",
    "Pools",
    "build_pools",
    "bm25_ranked",
    "category_codes",
    "owner_rng",
    "esci_pools",
    "hm_pools",
    "pool_mix",
]

#: Kinds of pool entries.
KINDS = ("judged", "neighbour", "category", "related", "random")



_ESCI_NEEDED = ("query_id", "query", "product_id", "product_locale", "esci_label", "product_title", "product_brand")


@dataclass(frozen=True)
class Pools:
    """Candidate pools over a catalogue of items.

    Attributes:
        items: ``[I]`` item texts (the catalogue the pools index).
        item_ids: ``[I]`` the items' dataset ids (ESCI ``product_id``, H&M ``article_id``).
        owners: ``[O]`` owner keys (ESCI ``query_id`` as str, H&M ``customer_id``).
        pools: ``pools[o]``: indices into ``items``, shuffled.
        gains: ``gains[o]``: float gains aligned with ``pools[o]`` (0 for negatives).
        kinds: ``kinds[o]``: the kind of each entry, one of :data:`KINDS`.
        categories: ``[I]`` each item's category key (ESCI: :func:`~ospo_fast.data.title_category`; H&M:
            ``product_type_name``; ``""``: none), whatever way the negatives were drawn; None: unknown.
    """

    items: List[str]
    item_ids: List[str]
    owners: List[str]
    pools: List[List[int]]
    gains: List[List[float]]
    kinds: List[List[str]]
    categories: Optional[List[str]] = None

    def compact(self) -> "Pools":
        """The same pools over only the items they use (catalogue order kept), so rewards index less."""
        used = sorted({i for pool in self.pools for i in pool})
        remap = {old: new for new, old in enumerate(used)}
        return Pools(
            items=[self.items[i] for i in used],
            item_ids=[self.item_ids[i] for i in used],
            owners=list(self.owners),
            pools=[[remap[i] for i in pool] for pool in self.pools],
            gains=[list(g) for g in self.gains],
            kinds=[list(k) for k in self.kinds],
            categories=None if self.categories is None else [self.categories[i] for i in used],
        )

    def subset(self, owners: Sequence[int]) -> "Pools":
        """The pools of the given owner positions, in that order (items unchanged)."""
        owners = list(owners)
        return Pools(
            self.items,
            self.item_ids,
            [self.owners[o] for o in owners],
            [self.pools[o] for o in owners],
            [self.gains[o] for o in owners],
            [self.kinds[o] for o in owners],
            self.categories,
        )


def owner_rng(seed: int, key) -> np.random.Generator:
    """The PCG64 generator of one owner: seeded by ``seed`` and a stable hash (CRC-32) of ``str(key)``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), zlib.crc32(str(key).encode())])))


def category_codes(values: Sequence[str]) -> np.ndarray:
    """int64 ``[I]`` codes of category values; ``""`` and None get -1 (no category)."""
    codes, uniques = pd.factorize(pd.Series(list(values), dtype=object).fillna("").astype(str), sort=True)
    codes = codes.astype(np.int64)
    if len(uniques) and "" in set(uniques):
        codes[codes == list(uniques).index("")] = -1
    return codes


def bm25_ranked(queries: Sequence[str], items: Sequence[str], depth: int) -> List[np.ndarray]:
    """For each query, the items with a positive BM25 score, best first (ties by item index), at most ``depth``.

    Tokenisation is that of :class:`ospo_fast.rewards.BM25Reward` (``bm25s``: lower case, English stopwords
    removed). Ties are broken by score value and index only, so the order is the same on any machine.

    Returns:
        ``len(queries)`` int64 arrays of item indices.
    """
    from ..rewards.bm25 import BM25Reward, bm25_index

    retriever = bm25_index(items)
    out = []
    for tokens in BM25Reward.tokenize(queries):
        scores = retriever.get_scores(tokens) if tokens else np.zeros(len(items))
        hit = np.flatnonzero(scores > 0)
        if hit.size > depth:
            # Keep everything scoring at least the depth-th best value (ties included), then sort exactly.
            floor = np.partition(scores[hit], hit.size - depth)[hit.size - depth]
            hit = hit[scores[hit] >= floor]
        order = np.lexsort((hit, -scores[hit]))
        out.append(hit[order][:depth].astype(np.int64))
    return out


def build_pools(
    judged: Sequence[Sequence[int]],
    judged_gains: Sequence[Sequence[float]],
    num_items: int,
    *,
    negatives: Optional[str] = None,
    neighbours: Optional[Sequence[np.ndarray]] = None,
    category_keys: Sequence[np.ndarray] = (),
    related: Optional[Sequence[np.ndarray]] = None,
    exclude: Optional[Sequence[Sequence[int]]] = None,
    owner_keys: Optional[Sequence] = None,
    pool_size: int = 100,
    mix: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> tuple[List[List[int]], List[List[float]], List[List[str]]]:
    """Pools of judged items plus negatives (see the module docstring for the rules).

    Args:
        judged: ``[O]`` lists of item indices judged for each owner (distinct within an owner).
        judged_gains: ``[O]`` lists of their gains.
        num_items: the catalogue size ``I``.
        negatives: ``"neighbours"`` or ``"mix"`` (:data:`NEGATIVES`); None: ``"neighbours"`` when
            ``neighbours`` is given and ``mix`` is not, else ``"mix"``.
        neighbours: ``[O]`` arrays of item indices, nearest first (:func:`~ospo_fast.data.ngrams.ngram_neighbours`):
            the negatives of ``negatives="neighbours"``, taken in order (judged and excluded items skipped);
            random items fill what they leave short.
        category_keys: ``negatives="mix"``: int64 ``[I]`` arrays of category codes (-1: none), tried in order.
        related: ``negatives="mix"``: ``[O]`` arrays of item indices, most related first (:func:`bm25_ranked`);
            None: no related negatives (their share goes to random).
        exclude: ``[O]`` item indices that must not be negatives.
        owner_keys: ``[O]`` keys seeding each owner's generator (:func:`owner_rng`); default: the position.
        pool_size: the target pool size (judged + negatives).
        mix: ``negatives="mix"``: shares of the negatives ``(category, related, random)``, non-negative, summing
            to 1; None: :data:`DEFAULT_MIX`.
        seed: the base seed.
    Returns:
        ``(pools, gains, kinds)``, each ``[O]`` lists aligned entry by entry.
    """
    if negatives is None:
        negatives = "neighbours" if neighbours is not None and mix is None else "mix"
    check_int(pool_size, "pool_size", 1, expected="a positive int (candidates per owner)")
    check_int(seed, "seed", 0)
    negatives, mix = resolve_negatives(negatives, mix)
    if negatives == "neighbours":
        if neighbours is None:
            raise ValueError("neighbours: negatives='neighbours' needs each owner's ranked neighbours")
        if related is not None or len(category_keys):
            raise ValueError("related, category_keys: only used with negatives='mix'")
    elif neighbours is not None:
        raise ValueError("neighbours: only used with negatives='neighbours'")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"pool_size: expected a positive int, got {pool_size!r}")
    n_owners = len(judged)
    if len(judged_gains) != n_owners:
        raise ValueError(f"judged_gains: has {len(judged_gains)} rows for {n_owners} owners (judged)")
    lists = (("related", related), ("neighbours", neighbours), ("exclude", exclude), ("owner_keys", owner_keys))
    for name, rows in lists:
        if rows is not None and len(rows) != n_owners:
            raise ValueError(f"{name}: has {len(rows)} entries for {n_owners} owners (judged)")
    groups = [category_groups(codes, num_items) for codes in category_keys]

    pools, gains, kinds = [], [], []
    short = []
    for o in range(n_owners):
        rng = owner_rng(seed, owner_keys[o] if owner_keys is not None else o)
        pool = [int(i) for i in judged[o]]
        gain = [float(g) for g in judged_gains[o]]
        kind = ["judged"] * len(pool)
        if len(set(pool)) != len(pool):
            raise ValueError(f"judged: owner {o} lists an item twice")
        taken = set(pool) | (set(int(i) for i in exclude[o]) if exclude is not None else set())
        size = max(0, pool_size - len(pool))

        def add(new, name):
            pool.extend(new)
            gain.extend([0.0] * len(new))
            kind.extend([name] * len(new))
            taken.update(new)

        if negatives == "neighbours":
            add(first_free(neighbours[o], size, taken, num_items), "neighbour")
            need = size - (len(pool) - len(judged[o]))
        else:
            quotas = quotas_of(size, mix)
            # category: random picks among the items sharing a judged item's code, key by key.
            need = quotas[0]
            for codes, members in zip(category_keys, groups):
                if need <= 0:
                    break
                own = {int(codes[i]) for i in judged[o] if codes[i] >= 0}
                if not own:
                    continue
                cand = np.concatenate([members[c] for c in sorted(own)])
                cand = np.array([i for i in np.unique(cand) if i not in taken], dtype=np.int64)
                picked = rng.permutation(cand)[:need].tolist()
                add(picked, "category")
                need -= len(picked)
            # related: the best-ranked items not yet taken; category's shortfall passes on.
            need += quotas[1]
            if related is not None and need > 0:
                picked = first_free(related[o], need, taken, num_items)
                add(picked, "related")
                need -= len(picked)
            need += quotas[2]
        add(draw_uniform(rng, num_items, need, taken), "random")

        order = rng.permutation(len(pool))
        pools.append([pool[j] for j in order])
        gains.append([gain[j] for j in order])
        kinds.append([kind[j] for j in order])
        if len(pool) < pool_size:
            short.append(len(pool))
    if short:
        warnings.warn(
            f"{len(short)} of {n_owners} pool(s) are smaller than pool_size={pool_size} (smallest {min(short)}): "
            f"the catalogue has only {num_items} items",
            stacklevel=2,
        )
    return pools, gains, kinds


def esci_pools(
    frame: pd.DataFrame,
    pool_size: int = 100,
    mix: Optional[Sequence[float]] = None,
    seed: int = 0,
    max_item_chars: int = 600,
    require_relevant: bool = True,
    max_owners: Optional[int] = None,
    *,
    negatives: Optional[str] = None,
) -> Pools:
    """Pools for ESCI queries: each query's judged products (ESCI gains) plus negatives.

    The catalogue is every distinct ``(product_id, product_locale)`` of ``frame``. Neighbours: the char
    n-gram nearest products to the query's judged products of positive gain. Mix: category keys are the head
    noun of the title (:func:`~ospo_fast.data.esci.title_category`), then the brand; related is BM25 of the
    query text over the catalogue's item texts.

    Args:
        frame: a joined ESCI frame (:func:`~ospo_fast.data.load_esci`, :func:`~ospo_fast.data.load_esci_csv`).
        pool_size, seed: see :func:`build_pools`.
        mix: the shares with ``negatives="mix"``; given alone, it selects ``"mix"``.
        max_item_chars: item text length (:func:`~ospo_fast.data.product_text`).
        require_relevant: drop queries none of whose judged products has a positive gain (their reward would
            be 0 whatever the query).
        max_owners: keep at most this many queries (the first ones, in order of appearance).
        negatives: ``"neighbours"`` (default) or ``"mix"``; see the module docstring.
    Returns:
        :class:`Pools` over the items they use; ``owners`` are the ``query_id``\\ s as str; ``categories`` the
        titles' head nouns.
    """
    check_int(pool_size, "pool_size", 1, expected="a positive int (candidates per owner)")
    check_int(seed, "seed", 0)
    negatives, mix = resolve_negatives(negatives, mix)
    require_columns(frame.columns, _ESCI_NEEDED, "frame")
    products = frame.drop_duplicates(["product_id", "product_locale"]).reset_index(drop=True)
    index = {key: i for i, key in enumerate(zip(products["product_id"], products["product_locale"]))}
    items = [product_text(row, max_item_chars) for row in products.to_dict("records")]

    owners, queries, judged, gains = [], [], [], []
    for qid, group in frame.groupby("query_id", sort=False):
        pairs: Dict[int, float] = {}
        for pid, loc, label in zip(group["product_id"], group["product_locale"], group["esci_label"]):
            pairs.setdefault(index[(pid, loc)], esci_gain(label))
        if require_relevant and max(pairs.values()) <= 0:
            continue
        owners.append(str(qid))
        queries.append(str(group["query"].iloc[0]))
        judged.append(list(pairs))
        gains.append(list(pairs.values()))
        if max_owners is not None and len(owners) >= max_owners:
            break

    categories = [title_category(t) for t in products["product_title"]]
    common = dict(owner_keys=owners, pool_size=pool_size, seed=seed)
    if negatives == "neighbours":
        near = target_neighbours(items, judged, gains, None, pool_size)
        pools, pool_gains, kinds = build_pools(
            judged, gains, len(items), negatives="neighbours", neighbours=near, **common
        )
    else:
        keys = [
            category_codes(categories),
            category_codes([b.strip().lower() for b in products["product_brand"]]),
        ]
        related = bm25_ranked(queries, items, depth=pool_size + max((len(j) for j in judged), default=0))
        pools, pool_gains, kinds = build_pools(
            judged, gains, len(items), negatives="mix", category_keys=keys, related=related, mix=mix, **common
        )
    return Pools(items, products["product_id"].tolist(), owners, pools, pool_gains, kinds, categories).compact()


def hm_pools(
    data: HMData,
    histories: pd.DataFrame,
    pool_size: int = 100,
    mix: Optional[Sequence[float]] = None,
    seed: int = 0,
    max_item_chars: int = 400,
    *,
    negatives: Optional[str] = None,
) -> Pools:
    """Pools for H&M customers: the next bought article (gain 1) plus negatives.

    The catalogue is ``data.articles``. Neighbours: the char n-gram nearest articles to the target. Mix:
    category keys are ``product_type_name``, then ``garment_group_name``; related is BM25 of the target
    article's text over the catalogue (look-alike articles). The customer's earlier purchases are never
    negatives. Customers whose target is not in the catalogue are dropped.

    Args:
        data: :func:`~ospo_fast.data.load_hm` output (articles needed).
        histories: :func:`~ospo_fast.data.customer_histories` output.
        pool_size, seed: see :func:`build_pools`.
        mix: the shares with ``negatives="mix"``; given alone, it selects ``"mix"``.
        max_item_chars: item text length (:func:`~ospo_fast.data.article_text`).
        negatives: ``"neighbours"`` (default) or ``"mix"``; see the module docstring.
    Returns:
        :class:`Pools` over the items they use; ``owners`` are the ``customer_id``\\ s; ``categories`` the
        ``product_type_name``\\ s.
    """
    check_int(pool_size, "pool_size", 1, expected="a positive int (candidates per owner)")
    check_int(seed, "seed", 0)
    negatives, mix = resolve_negatives(negatives, mix)
    articles = data.articles
    index = {a: i for i, a in enumerate(articles["article_id"])}
    items = [article_text(row, max_item_chars) for row in articles.to_dict("records")]
    rows = histories[histories["target"].isin(index)]
    judged = [[index[t]] for t in rows["target"]]
    exclude = [[index[a] for a in h if a in index] for h in rows["history"]]
    owners = rows["customer_id"].tolist()
    categories = [category_text(v) for v in articles["product_type_name"]]
    common = dict(exclude=exclude, owner_keys=owners, pool_size=pool_size, seed=seed)
    if negatives == "neighbours":
        near = target_neighbours(items, judged, [[1.0]] * len(judged), exclude, pool_size)
        pools, gains, kinds = build_pools(
            judged, [[1.0]] * len(judged), len(items), negatives="neighbours", neighbours=near, **common
        )
    else:
        keys = [category_codes(articles["product_type_name"]), category_codes(articles["garment_group_name"])]
        related = bm25_ranked(
            [items[j[0]] for j in judged], items, depth=pool_size + max(map(len, exclude), default=0)
        )
        pools, gains, kinds = build_pools(
            judged, [[1.0]] * len(judged), len(items), negatives="mix", category_keys=keys, related=related,
            mix=mix, **common,
        )  # fmt: skip
    return Pools(items, articles["article_id"].tolist(), owners, pools, gains, kinds, categories).compact()


def pool_mix(task_or_pools, seed: int = 0) -> Dict[str, Optional[float]]:
    """The achieved composition of the negatives over all pools of a task (or :class:`Pools`).

    An owner's targets are its judged entries with a positive gain (all its judged entries when none has).
    The baseline "random" sample of a pool: as many catalogue items as the pool has negatives, drawn
    uniformly without replacement among the items that are not its judged entries (all of them when fewer
    remain; ``seed`` and the pool's position seed it, so the result is the same on every machine). The
    catalogue is ``items`` (for compacted pools, the items some pool uses). Similarities are the cosines of
    char n-gram TF-IDF vectors fitted on that catalogue (:mod:`ospo_fast.data.ngrams`), an item's highest
    cosine to any of its pool's targets.

    Returns:
        A flat, JSON-serialisable dict:

        - ``"pools"``: the number of pools; ``"negatives"``: of negatives (entries whose kind is not judged);
        - ``"neighbour"``, ``"category"``, ``"related"``, ``"random"``: each kind's share of the negatives
          (how they were drawn; they sum to 1 when there are negatives);
        - ``"same_category"``: the share of negatives whose category key (``categories``, non-empty) is one of
          their pool's targets' keys, measured whatever way they were drawn; ``"same_category_random"``: the
          same share for the random sample. None when the categories are unknown;
        - ``"similarity_negatives"``: the mean similarity of negatives to their pool's targets;
          ``"similarity_random"``: that of the random sample.

        Shares and means are 0.0 when there is nothing to average.
    """
    items, pools, gains, kinds = task_or_pools.items, task_or_pools.pools, task_or_pools.gains, task_or_pools.kinds
    categories = getattr(task_or_pools, "categories", None)
    if categories is not None and len(categories) != len(items):
        raise ValueError(f"categories: has {len(categories)} entries for {len(items)} items")
    vectors = char_ngram_vectors(items)
    counts = {k: 0 for k in KINDS if k != "judged"}
    n_neg = n_rand = same = same_rand = 0
    sim_neg = sim_rand = 0.0
    for o, (pool, gain, kind) in enumerate(zip(pools, gains, kinds)):
        judged = [int(i) for i, k in zip(pool, kind) if k == "judged"]
        targets = [int(i) for i, g, k in zip(pool, gain, kind) if k == "judged" and g > 0] or judged
        negs = [int(i) for i, k in zip(pool, kind) if k != "judged"]
        for k in kind:
            if k != "judged":
                counts[k] = counts.get(k, 0) + 1
        sample = draw_uniform(owner_rng(seed, f"pool_mix/{o}"), len(items), len(negs), set(judged))
        n_neg += len(negs)
        n_rand += len(sample)
        sim_neg += float(ngram_similarity(vectors, targets, negs).sum())
        sim_rand += float(ngram_similarity(vectors, targets, sample).sum())
        if categories is not None:
            own = {categories[t] for t in targets} - {""}
            same += sum(categories[i] in own for i in negs)
            same_rand += sum(categories[i] in own for i in sample)

    def share(x, n):
        return float(x) / n if n else 0.0

    out: Dict[str, Optional[float]] = {"pools": len(pools), "negatives": n_neg}
    out.update({k: share(v, n_neg) for k, v in counts.items()})
    out["same_category"] = share(same, n_neg) if categories is not None else None
    out["same_category_random"] = share(same_rand, n_rand) if categories is not None else None
    out["similarity_negatives"] = share(sim_neg, n_neg)
    out["similarity_random"] = share(sim_rand, n_rand)
    return out
