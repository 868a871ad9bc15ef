"""ospo_fast.data: ESCI and H&M loaders, candidate pools, prompts, tasks, the shipped default dataset.

Fixtures under tests/data/fixtures are made-up rows in the official layouts (see their SOURCE.txt). The
real extracts beside the repository (../shared/data) are tested when that folder is there.
"""

from __future__ import annotations

import collections
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ospo_fast.data import (
    ARTICLE_COLUMNS,
    ESCI_COLUMNS,
    ESCI_SYSTEM,
    ESCI_TEMPLATE,
    ESCI_WORKED_EXAMPLES,
    HM_TEMPLATE,
    KINDS,
    Pools,
    article_text,
    build_pools,
    char_ngram_vectors,
    check_template,
    customer_histories,
    default_esci_path,
    default_task,
    esci_pools,
    esci_task,
    extract_answer,
    follows_format,
    held_out_items,
    hm_pools,
    hm_task,
    load_default_esci,
    load_esci,
    load_esci_csv,
    load_hm,
    ngram_neighbours,
    pool_mix,
    product_text,
    product_text_parts,
    render,
    three_way_split,
    title_category,
    train_eval_split,
)
from ospo_fast.data.negatives import quotas_of
from ospo_fast.data.ngrams import char_ngrams, ngram_similarity
from ospo_fast.rewards import BM25Reward

FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

ESCI_EXAMPLES = FIXTURES / "esci_examples.csv"
ESCI_PRODUCTS = FIXTURES / "esci_products.csv"
HM_FILES = (FIXTURES / "hm_articles.csv", FIXTURES / "hm_customers.csv", FIXTURES / "hm_transactions_train.csv")


def shared(*parts: str) -> Path:
    """A file of the real extracts; skips the test when the shared data folder is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"the real data extracts are not at {SHARED}")
    return SHARED.joinpath(*parts)


def customer(n: int) -> str:
    import hashlib

    return hashlib.sha256(f"fixture-customer-{n}".encode()).hexdigest()


@pytest.fixture(scope="module")
def esci_parquet(tmp_path_factory):
    """The ESCI fixtures written as parquet, the official file format."""
    d = tmp_path_factory.mktemp("esci")
    ex, pr = d / "shopping_queries_dataset_examples.parquet", d / "shopping_queries_dataset_products.parquet"
    pd.read_csv(ESCI_EXAMPLES, dtype={"product_id": str}).to_parquet(ex)
    pd.read_csv(ESCI_PRODUCTS, dtype=str).to_parquet(pr)
    return ex, pr


@pytest.fixture(scope="module")
def hm_data():
    return load_hm(*HM_FILES)


@pytest.fixture(scope="module")
def task():
    return default_task()


# ----------------------------------------------------------------------------------------------------
# ESCI loaders


def test_load_esci_has_official_columns_and_filters(esci_parquet):
    frame = load_esci(*esci_parquet)  # defaults: train, small, us
    assert tuple(frame.columns) == ESCI_COLUMNS
    assert frame["example_id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert set(frame["esci_label"]) <= set("ESCI")
    assert frame["example_id"].dtype == np.int64 and frame["small_version"].dtype == np.int64


@pytest.mark.parametrize(
    "split, version, locale, expected",
    [
        ("test", "small", "us", [9, 10, 11]),
        ("test", "small", "es", []),
        ("test", "large", "us", [9, 10, 11, 12, 13]),
        ("train", None, "es", [14, 15, 16]),
        (None, None, None, list(range(1, 17))),
    ],
)
def test_load_esci_split_version_locale(esci_parquet, split, version, locale, expected):
    frame = load_esci(*esci_parquet, split=split, version=version, locale=locale)
    assert sorted(frame["example_id"]) == expected


def test_load_esci_joins_on_product_id_and_locale(esci_parquet):
    frame = load_esci(*esci_parquet, split=None, version=None, locale=None).set_index("example_id")
    # B0FXMOUSE1 is sold in us and es with different titles.
    assert frame.loc[1, "product_title"].startswith("Quietclick Wireless Mouse")
    assert frame.loc[16, "product_title"].startswith("Ratón inalámbrico")


def test_load_esci_reads_csv_like_parquet(esci_parquet):
    pd.testing.assert_frame_equal(load_esci(ESCI_EXAMPLES, ESCI_PRODUCTS), load_esci(*esci_parquet))


def test_load_esci_missing_file_names_path_and_source(tmp_path):
    missing = tmp_path / "shopping_queries_dataset_examples.parquet"
    with pytest.raises(FileNotFoundError, match="esci-data") as e:
        load_esci(missing, ESCI_PRODUCTS)
    assert str(missing) in str(e.value)


def test_load_esci_missing_columns_are_listed(tmp_path):
    bad = tmp_path / "examples.csv"
    pd.read_csv(ESCI_EXAMPLES).drop(columns=["split", "esci_label"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['esci_label', 'split'\]"):
        load_esci(bad, ESCI_PRODUCTS)


def test_load_esci_drops_examples_without_a_product_with_a_warning(tmp_path):
    products = tmp_path / "products.csv"
    pd.read_csv(ESCI_PRODUCTS).query("product_id != 'B0FXMOUSE2'").to_csv(products, index=False)
    with pytest.warns(UserWarning, match="1 example"):
        frame = load_esci(ESCI_EXAMPLES, products)
    assert 2 not in set(frame["example_id"])


@pytest.mark.parametrize("kwargs", [{"split": "dev"}, {"version": "medium"}, {"locale": 3}])
def test_load_esci_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_esci(ESCI_EXAMPLES, ESCI_PRODUCTS, **kwargs)


def test_load_esci_csv_real_extract():
    frame = load_esci_csv(shared("esci", "underspec_esci_200.csv"))
    assert tuple(frame.columns) == tuple(c for c in ESCI_COLUMNS if c != "split")
    assert len(frame) == 200 and frame["query_id"].nunique() == 200
    assert frame["esci_label"].value_counts().to_dict() == {"E": 138, "S": 49, "I": 12, "C": 1}


def test_load_esci_csv_rejects_unknown_labels(tmp_path):
    bad = tmp_path / "flat.csv"
    frame = load_default_esci()
    frame.loc[0, "esci_label"] = "Maybe"
    frame.to_csv(bad, index=False)
    with pytest.raises(ValueError, match="Maybe"):
        load_esci_csv(bad)


def test_product_text_strips_html_and_fits_max_chars():
    row = {
        "product_title": "Acme Kettle",
        "product_brand": "Acme",  # already in the title: left out
        "product_color": "Red",
        "product_bullet_point": "Boils fast\n1.7 litres",
        "product_description": "<b>Great</b> &amp; " + "very " * 200 + "good",
    }
    text = product_text(row, max_chars=80)
    assert text.startswith("Acme Kettle\nRed\nBoils fast\n1.7 litres\nGreat & very")
    assert len(text) <= 80 and "<b>" not in text and "Acme\n" not in text
    assert not text.endswith(" ")


def test_product_text_of_trimmed_parts_is_unchanged():
    for _, row in load_default_esci().head(50).iterrows():
        assert product_text(product_text_parts(row, 200), 200) == product_text(row, 200)


@pytest.mark.parametrize(
    "title, kind",
    [
        ("Mama Koala One Size Baby Washable Reusable Pocket Cloth Diapers, 6 Pack with 6 Inserts", "diaper"),
        ("Ilyapa Window Frame Wall Decor 2 Pack - Rustic White", "decor"),
        ("YATHON Vintage Party Dresses for Women", "dress"),
        ("Stainless Steel Flour Sifter for Baking", "sifter"),
        ("12", ""),
    ],
)
def test_title_category(title, kind):
    assert title_category(title) == kind


# ----------------------------------------------------------------------------------------------------
# The shipped default dataset


def test_default_data_is_small_and_attributed():
    path = default_esci_path()
    assert path.stat().st_size < 1_000_000
    notice = (path.parent / "NOTICE").read_text(encoding="utf-8")
    assert "Apache" in notice and "github.com/amazon-science/esci-data" in notice


def test_default_data_gives_the_extract_item_texts():
    full = load_esci_csv(shared("esci", "underspec_esci_200.csv"))
    shipped = load_default_esci()
    pd.testing.assert_frame_equal(
        shipped[["example_id", "query", "query_id", "product_id", "esci_label"]],
        full[["example_id", "query", "query_id", "product_id", "esci_label"]],
    )
    assert [product_text(r) for _, r in shipped.iterrows()] == [product_text(r) for _, r in full.iterrows()]


# ----------------------------------------------------------------------------------------------------
# H&M loaders


def test_load_hm_official_columns(hm_data):
    assert set(ARTICLE_COLUMNS) <= set(hm_data.articles.columns)
    assert hm_data.articles["article_id"].iloc[0] == "0900000001"
    tx = hm_data.transactions
    assert list(tx.columns) == ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]
    assert str(tx["t_dat"].dtype).startswith("datetime64")
    assert list(hm_data.customers.columns) == [
        "customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age", "postal_code",
    ]  # fmt: skip


def test_load_hm_normalises_resaved_files(tmp_path, hm_data):
    # A pandas re-save: a leading unnamed index column, article ids as ints without the leading 0.
    articles = pd.read_csv(HM_FILES[0], dtype={"article_id": str})
    articles["article_id"] = articles["article_id"].astype(int)
    articles.to_csv(tmp_path / "articles.csv")
    tx = pd.read_csv(HM_FILES[2], dtype={"article_id": str})
    tx["article_id"] = tx["article_id"].astype(int)
    tx.to_csv(tmp_path / "transactions.csv", index=False)
    resaved = load_hm(tmp_path / "articles.csv", transactions_path=tmp_path / "transactions.csv")
    pd.testing.assert_frame_equal(resaved.articles, hm_data.articles)
    pd.testing.assert_frame_equal(resaved.transactions, hm_data.transactions)
    assert resaved.customers is None


def test_load_hm_real_extract():
    data = load_hm(shared("hm", "articles.csv"), shared("hm", "customers.csv"), shared("hm", "transactions_train.csv"))
    assert len(data.articles) == 4903 and "Unnamed: 0" not in data.articles.columns
    assert data.articles["article_id"].str.fullmatch(r"0\d{9}").all()
    assert data.transactions["article_id"].isin(set(data.articles["article_id"])).all()
    assert len(data.transactions) == 10_000 and len(data.customers) == 10_000


def test_load_hm_missing_file_names_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="kaggle") as e:
        load_hm(tmp_path / "articles.csv")
    assert "articles.csv" in str(e.value)


def test_load_hm_missing_columns_are_listed(tmp_path):
    bad = tmp_path / "articles.csv"
    pd.read_csv(HM_FILES[0]).drop(columns=["prod_name", "detail_desc"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"\['prod_name', 'detail_desc'\]"):
        load_hm(bad)


def test_customer_histories_sorted_by_date_last_is_target(hm_data):
    h = customer_histories(hm_data.transactions).set_index("customer_id")
    assert list(h.index) == [customer(2), customer(1), customer(4)]  # order of first appearance; 3 has one item
    # Customer 1 bought 0900000011 twice on one day: a quantity, counted once.
    assert h.loc[customer(1), "history"] == ["0900000001", "0900000011"]
    assert h.loc[customer(1), "target"] == "0900000031"
    # Same-day purchases keep their file order.
    assert h.loc[customer(2), "history"] == ["0900000012", "0900000021", "0900000041"]
    assert h.loc[customer(2), "target"] == "0900000022"


def test_article_text_skips_placeholders_and_fits():
    row = {"prod_name": "Strap top", "product_type_name": "Vest top", "colour_group_name": "Unknown",
           "graphical_appearance_name": "Solid", "section_name": "Womens Basics", "garment_group_name": "Jersey",
           "index_group_name": "Ladieswear", "detail_desc": "Jersey top with narrow shoulder straps."}  # fmt: skip
    assert article_text(row) == (
        "Strap top\nVest top, Solid\nWomens Basics, Jersey, Ladieswear\nJersey top with narrow shoulder straps."
    )
    assert len(article_text(row, max_chars=30)) <= 30


# ----------------------------------------------------------------------------------------------------
# Pools


def _synthetic_pools(seed=0, owners=("q0", "q1", "q2"), pool_size=100, **kwargs):
    n = 2000
    codes = np.arange(n) % 20
    judged = {"q0": [3], "q1": [10, 11, 12, 13], "q2": [500, 7]}
    gains = {"q0": [1.0], "q1": [1.0, 0.1, 0.01, 0.0], "q2": [1.0, 0.1]}
    related = {o: np.random.default_rng(i).permutation(n) for i, o in enumerate(judged)}
    return build_pools(
        [judged[o] for o in owners], [gains[o] for o in owners], n, category_keys=[codes],
        related=[related[o] for o in owners], owner_keys=list(owners), pool_size=pool_size, seed=seed, **kwargs,
    )  # fmt: skip


def test_pools_have_pool_size_and_hold_judged_items_with_their_gains():
    pools, gains, kinds = _synthetic_pools()
    expected = {3: 1.0, 10: 1.0, 11: 0.1, 12: 0.01, 13: 0.0, 500: 1.0, 7: 0.1}
    for pool, gain, kind in zip(pools, gains, kinds):
        assert len(pool) == len(set(pool)) == 100
        judged = {i: g for i, g, k in zip(pool, gain, kind) if k == "judged"}
        assert all(judged[i] == expected[i] for i in judged)
        assert all(g == 0.0 for g, k in zip(gain, kind) if k != "judged")
    assert {i for i, k in zip(pools[1], kinds[1]) if k == "judged"} == {10, 11, 12, 13}


@pytest.mark.parametrize("n, expected", [(99, [49, 30, 20]), (96, [48, 29, 19]), (100, [50, 30, 20]), (1, [1, 0, 0])])
def test_quotas_split_negatives_by_the_mix(n, expected):
    assert quotas_of(n, (0.5, 0.3, 0.2)) == expected


def test_pools_follow_the_mix():
    _, _, kinds = _synthetic_pools()
    assert collections.Counter(kinds[0]) == {"judged": 1, "category": 49, "related": 30, "random": 20}
    assert collections.Counter(kinds[1]) == {"judged": 4, "category": 48, "related": 29, "random": 19}


def test_category_negatives_share_a_judged_items_category():
    pools, _, kinds = _synthetic_pools()
    for pool, kind, judged in zip(pools, kinds, ([3], [10, 11, 12, 13], [500, 7])):
        own = {j % 20 for j in judged}
        assert all(i % 20 in own for i, k in zip(pool, kind) if k == "category")


def test_pools_are_seeded_and_per_owner():
    a, b = _synthetic_pools(seed=1), _synthetic_pools(seed=1)
    assert a == b
    assert _synthetic_pools(seed=2)[0] != a[0]
    # An owner's pool does not depend on the other owners built alongside it.
    alone = _synthetic_pools(seed=1, owners=("q2",))
    assert alone[0][0] == a[0][2] and alone[2][0] == a[2][2]


def test_pools_are_the_same_on_every_machine():
    # A golden value: numpy's PCG64 stream is fixed, so these exact pools must come out everywhere.
    pools, gains, kinds = build_pools(
        [[0], [5, 6]], [[1.0], [1.0, 0.1]], 30, category_keys=[np.arange(30) % 3],
        related=[np.arange(29, 0, -1), np.arange(30)], owner_keys=["a", "b"], pool_size=8, seed=7,
    )  # fmt: skip
    assert pools == [[21, 12, 29, 0, 28, 5, 24, 6], [0, 24, 11, 20, 6, 5, 27, 1]]
    assert kinds[0] == ["category", "category", "related", "judged", "related", "random", "category", "category"]


def test_pools_are_shuffled():
    # Judged items at fixed positions would let a query that ties every item (ranked in pool order) score.
    _, _, kinds = build_pools([[i] for i in range(50)], [[1.0]] * 50, 1000, pool_size=100)
    positions = [kind.index("judged") for kind in kinds]
    assert len(set(positions)) > 25


def test_negatives_are_never_judged_or_excluded():
    pools, _, kinds = _synthetic_pools(exclude=[[4, 5], [], [8]])
    banned = [{3, 4, 5}, {10, 11, 12, 13}, {500, 7, 8}]
    for pool, kind, ban in zip(pools, kinds, banned):
        assert not {i for i, k in zip(pool, kind) if k != "judged"} & ban


def test_short_kinds_pass_their_share_on():
    # No category keys: category's share goes to related; no related list: everything left is random.
    _, _, kinds = build_pools([[0]], [[1.0]], 500, related=[np.arange(1, 41)], pool_size=100)
    assert collections.Counter(kinds[0]) == {"judged": 1, "related": 40, "random": 59}


def test_small_catalogue_gives_smaller_pools_with_a_warning():
    with pytest.warns(UserWarning, match="smaller than pool_size=100"):
        pools, _, _ = build_pools([[0], [1]], [[1.0], [1.0]], 30, pool_size=100)
    assert sorted(pools[0]) == list(range(30))


@pytest.mark.parametrize("mix", [(0.5, 0.5), (0.6, 0.3, 0.2), (-0.1, 0.6, 0.5)])
def test_bad_mix_is_rejected(mix):
    with pytest.raises(ValueError, match="mix"):
        build_pools([[0]], [[1.0]], 10, mix=mix)


def test_esci_pools_on_fixture_use_esci_gains_and_unjudged_negatives():
    frame = load_esci(ESCI_EXAMPLES, ESCI_PRODUCTS, split=None, version=None)
    p = esci_pools(frame, pool_size=10, seed=0)
    assert all(len(pool) == 10 for pool in p.pools)
    assert p.owners == ["101", "102", "103", "104"]
    judged_by_query = frame.groupby("query_id")["product_id"].apply(set)
    for owner, pool, gain, kind in zip(p.owners, p.pools, p.gains, p.kinds):
        judged = {p.item_ids[i]: g for i, g, k in zip(pool, gain, kind) if k == "judged"}
        assert set(judged) == judged_by_query[int(owner)]
        negatives = {p.item_ids[i] for i, k in zip(pool, kind) if k != "judged"}
        assert not negatives & judged_by_query[int(owner)]
    wm = dict(zip((p.item_ids[i] for i in p.pools[0]), p.gains[0]))
    assert (wm["B0FXMOUSE1"], wm["B0FXMOUSE2"], wm["B0FXPAD001"], wm["B0FXMOUSE3"]) == (1.0, 0.1, 0.01, 0.0)


def test_esci_related_negatives_are_lexical_neighbours():
    frame = load_esci(ESCI_EXAMPLES, ESCI_PRODUCTS, split=None, version=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = esci_pools(frame, pool_size=8, mix=(0.0, 1.0, 0.0), max_owners=1)
    related = {p.item_ids[i] for i, k in zip(p.pools[0], p.kinds[0]) if k == "related"}
    assert related <= {"B0FXMOUSE4", "B0FXMOUSE5"}  # the unjudged items that say "mouse"


def test_hm_pools_real_extract_target_and_categories():
    data = load_hm(shared("hm", "articles.csv"), transactions_path=shared("hm", "transactions_train.csv"))
    histories = customer_histories(data.transactions).head(30)
    p = hm_pools(data, histories, seed=0, negatives="mix")
    types = dict(zip(data.articles["article_id"], data.articles["product_type_name"]))
    groups = dict(zip(data.articles["article_id"], data.articles["garment_group_name"]))
    for pool, gain, kind, (_, h) in zip(p.pools, p.gains, p.kinds, histories.iterrows()):
        ids = [p.item_ids[i] for i in pool]
        assert len(set(ids)) == 100 and sorted(gain)[-1] == 1.0 and sum(gain) == 1.0
        assert ids[gain.index(1.0)] == h["target"]
        assert not set(ids) & (set(h["history"]) - {h["target"]})
        for a, k in zip(ids, kind):
            if k == "category":
                assert types[a] == types[h["target"]] or groups[a] == groups[h["target"]]


# ----------------------------------------------------------------------------------------------------
# Hard negatives: char n-gram neighbours


def test_char_ngrams_stay_within_words():
    assert char_ngrams("Tea", (3, 4)) == [" te", "tea", "ea ", " tea", "tea "]
    grams = char_ngrams("ab, CD!")
    assert " ab " in grams and " cd " in grams and not any("b c" in g or "," in g for g in grams)
    assert char_ngrams("...") == []


def test_char_ngram_vectors_are_unit_rows_and_zero_for_empty_texts():
    x = char_ngram_vectors(["red shoes", "red shoe", "", "blue hat"])
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms, [1, 1, 0, 1])
    sims = (x @ x.T).toarray()
    assert sims[0, 1] > sims[0, 3] and sims[0, 3] == 0


# Target 4; items 0..8 share 0, 1, 4, 2, -, 3, 4 (a duplicate of the target's text), 2, 2 of its words.
NEIGHBOUR_TEXTS = [
    "lima mike november oscar",
    "alpha india juliet kilo",
    "alpha bravo charlie delta echo",
    "alpha bravo golf hotel",
    "alpha bravo charlie delta",
    "alpha bravo charlie foxtrot",
    "alpha bravo charlie delta",
    "alpha bravo golf hotel",
    "alpha bravo golf hotel",
]


def test_ngram_neighbours_come_best_first():
    x = char_ngram_vectors(NEIGHBOUR_TEXTS)
    # Best first; equal scores (3, 7, 8 are one text) by index; the target, its duplicate and item 0 (nothing
    # in common) left out.
    assert ngram_neighbours(x, [[4]], depth=10, texts=NEIGHBOUR_TEXTS)[0].tolist() == [2, 5, 3, 7, 8, 1]
    assert ngram_neighbours(x, [[4]], depth=3, texts=NEIGHBOUR_TEXTS)[0].tolist() == [2, 5, 3]
    assert ngram_neighbours(x, [[4]], depth=10, skip=[[2, 7]], texts=NEIGHBOUR_TEXTS)[0].tolist() == [5, 3, 8, 1]
    # Without texts the duplicate (cosine 1) comes first.
    assert ngram_neighbours(x, [[4]], depth=2)[0].tolist() == [6, 2]
    # Several targets: an item's score is its best cosine to any of them.
    both = ngram_neighbours(x, [[4, 0]], depth=10, texts=NEIGHBOUR_TEXTS)[0].tolist()
    assert both[:2] == [2, 5] and set(both) == {1, 2, 3, 5, 7, 8}


def test_default_task_negatives_are_the_targets_nearest_items(task):
    x = char_ngram_vectors(task.items)
    for pool, gain, kind in list(zip(task.pools, task.gains, task.kinds))[:40]:
        assert set(kind) == {"judged", "neighbour"}
        target = [i for i, g in zip(pool, gain) if g > 0]
        negatives = [i for i, k in zip(pool, kind) if k != "judged"]
        outside = sorted(set(range(len(task.items))) - set(pool))
        # Every negative is at least as close to the target as every catalogue item left out of the pool.
        assert ngram_similarity(x, target, negatives).min() >= ngram_similarity(x, target, outside).max() - 1e-9
        ranked = ngram_neighbours(x, [target], depth=len(negatives), texts=task.items)[0]
        assert set(ranked.tolist()) == set(negatives)
        scores = ngram_similarity(x, target, ranked)
        assert (np.diff(scores) <= 1e-9).all()  # best first


def test_neighbour_pools_skip_judged_and_excluded_items_and_fill_up_at_random():
    ranked = [np.array([0, 5, 9, 1, 2, 3, 4]), np.array([7])]
    pools, gains, kinds = build_pools(
        [[0], [1]], [[1.0], [1.0]], 50, neighbours=ranked, exclude=[[9], []], owner_keys=["a", "b"], pool_size=4,
    )  # fmt: skip
    assert {i for i, k in zip(pools[0], kinds[0]) if k == "neighbour"} == {5, 1, 2}  # the first free ones
    assert collections.Counter(kinds[1]) == {"judged": 1, "neighbour": 1, "random": 2}
    assert 1 not in [i for i, k in zip(pools[1], kinds[1]) if k != "judged"]
    with pytest.warns(UserWarning, match="smaller than pool_size=100"):
        pools, _, kinds = build_pools([[0]], [[1.0]], 30, neighbours=[np.arange(29, 0, -1)], pool_size=100)
    assert sorted(pools[0]) == list(range(30)) and kinds[0].count("neighbour") == 29


def test_neighbour_pools_are_the_same_on_every_machine():
    pools, gains, kinds = build_pools(
        [[0], [3, 4]], [[1.0], [1.0, 0.1]], 20, neighbours=[np.arange(19, -1, -1), np.arange(20)],
        owner_keys=["a", "b"], pool_size=6, seed=7,
    )  # fmt: skip
    assert pools == [[19, 18, 15, 0, 17, 16], [3, 2, 5, 0, 1, 4]]
    assert kinds[1] == ["judged", "neighbour", "neighbour", "neighbour", "neighbour", "judged"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"negatives": "nearest"}, "negatives"),
        ({"negatives": "neighbours"}, "neighbours"),
        ({"negatives": "neighbours", "neighbours": [np.arange(5)], "mix": (0.5, 0.3, 0.2)}, "mix"),
        ({"negatives": "neighbours", "neighbours": [np.arange(5)], "related": [np.arange(5)]}, "related"),
        ({"negatives": "mix", "neighbours": [np.arange(5)]}, "neighbours"),
        ({"neighbours": [np.arange(5), np.arange(5)]}, "neighbours"),
    ],
)
def test_bad_negative_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pools([[0]], [[1.0]], 10, **kwargs)


def test_task_negatives_argument():
    near = esci_task(default_esci_path(), max_samples=3)
    assert {k for kinds in near.kinds for k in kinds} == {"judged", "neighbour"}
    mixed = esci_task(default_esci_path(), max_samples=3, negatives="mix")
    assert "neighbour" not in {k for kinds in mixed.kinds for k in kinds}
    # mix= alone keeps its old meaning.
    assert esci_task(default_esci_path(), max_samples=3, mix=(0.5, 0.3, 0.2)).pools == mixed.pools
    with pytest.raises(ValueError, match="mix"):
        esci_task(default_esci_path(), max_samples=3, negatives="neighbours", mix=(0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="negatives"):
        default_task(negatives="hard")


def test_default_task_pools_are_deterministic(task):
    again = default_task()
    assert again.pools == task.pools and again.kinds == task.kinds
    other = default_task(seed=1)
    assert [sorted(p) for p in other.pools] == [sorted(p) for p in task.pools]  # the neighbours do not depend on it
    assert other.pools != task.pools  # the order (shuffle) does


def test_default_task_pools_are_harder_than_the_mix(task):
    mixed = default_task(negatives="mix")
    near, old = pool_mix(task), pool_mix(mixed)
    assert near["neighbour"] == 1.0 and old["neighbour"] == 0.0
    assert near["similarity_negatives"] > old["similarity_negatives"] > 0
    assert near["similarity_negatives"] > 1.1 * near["similarity_random"]
    assert near["same_category"] > near["same_category_random"]

    # A measure of its own, over words rather than char n-grams: the mean Jaccard overlap of word sets.
    def word_overlap(t):
        words = [set(re.findall(r"\w+", text.lower())) for text in t.items]
        values = []
        for pool, kind in zip(t.pools, t.kinds):
            j = next(i for i, k in zip(pool, kind) if k == "judged")
            values += [len(words[i] & words[j]) / len(words[i] | words[j]) for i, k in zip(pool, kind) if k != "judged"]
        return np.mean(values)

    assert word_overlap(task) > word_overlap(mixed)


def test_hm_neighbour_pools_real_extract():
    data = load_hm(shared("hm", "articles.csv"), transactions_path=shared("hm", "transactions_train.csv"))
    histories = customer_histories(data.transactions).head(30)
    p = hm_pools(data, histories, seed=0)
    for pool, gain, kind, (_, h) in zip(p.pools, p.gains, p.kinds, histories.iterrows()):
        ids = [p.item_ids[i] for i in pool]
        assert len(set(ids)) == 100 and ids[gain.index(1.0)] == h["target"]
        assert not set(ids) & (set(h["history"]) - {h["target"]})
        assert set(kind) == {"judged", "neighbour"}
    near, old = pool_mix(p), pool_mix(hm_pools(data, histories, seed=0, negatives="mix"))
    assert near["similarity_negatives"] > old["similarity_negatives"]
    assert near["same_category"] > near["same_category_random"]


def test_pool_mix_by_hand():
    # Items 0 and 1 share their text; 0, 2 and 3 share no n-gram.
    items = ["alpha", "alpha", "bravo", "charlie"]
    pools = Pools(
        items=items,
        item_ids=["i0", "i1", "i2", "i3"],
        owners=["a", "b"],
        pools=[[2, 0, 1, 3], [0, 3, 1, 2]],
        gains=[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
        kinds=[["random", "judged", "neighbour", "random"], ["category", "judged", "related", "judged"]],
        categories=["x", "x", "y", ""],
    )
    # Pool a: target 0 (x); negatives 2 (random, y, cos 0), 1 (neighbour, x, cos 1), 3 (random, none, cos 0).
    # Pool b: target 2 (3 is judged with gain 0); negatives 0 (category, x), 1 (related, x), both cos 0.
    # Each pool's negatives are all its unjudged items, so the random sample is the same items.
    mix = pool_mix(pools)
    assert mix == pytest.approx(
        {
            "pools": 2, "negatives": 5, "neighbour": 0.2, "category": 0.2, "related": 0.2, "random": 0.4,
            "same_category": 0.2, "same_category_random": 0.2, "similarity_negatives": 0.2, "similarity_random": 0.2,
        }
    )  # fmt: skip
    assert sum(mix[k] for k in KINDS if k != "judged") == pytest.approx(1.0)
    unknown = pool_mix(Pools(items, pools.item_ids, pools.owners, pools.pools, pools.gains, pools.kinds))
    assert unknown["same_category"] is None and unknown["similarity_negatives"] == pytest.approx(0.2)


def test_pool_mix_of_a_task_is_json_and_deterministic(task):
    mix = pool_mix(task)
    assert json.loads(json.dumps(mix)) == mix
    assert pool_mix(task) == mix
    assert mix["pools"] == len(task.pools) and mix["negatives"] == sum(len(p) - 1 for p in task.pools)
    assert pool_mix(task, seed=1)["similarity_negatives"] == mix["similarity_negatives"]
    assert task.categories is not None and len(task.categories) == len(task.items)
    assert task.categories[task.item_ids.index("B01LVWQY6K")] == "diaper"


# ----------------------------------------------------------------------------------------------------
# Prompts


def test_default_templates_render():
    text = render(ESCI_TEMPLATE, "esci", request="mama koala")
    assert text == "mama koala"  # the instructions are in the system message, a worked example before
    prompt = default_task().samples[0].prompt
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[0]["content"] == ESCI_SYSTEM and "commas" in ESCI_SYSTEM
    assert (prompt[1]["content"], prompt[2]["content"]) == ESCI_WORKED_EXAMPLES[0] and "," in ESCI_WORKED_EXAMPLES[0][1]
    text = render(HM_TEMPLATE, "hm", history="- Strap top", num_items=1, age="31")
    assert "- Strap top" in text and "commas" in text


def test_template_override_is_used():
    t = esci_task(default_esci_path(), max_samples=2, template="Query for: {request}", system="Be brief.")
    assert t.samples[0].text == f"Query for: {t.samples[0].query}"
    assert t.samples[0].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": t.samples[0].text},
    ]


@pytest.mark.parametrize(
    "template, task, message",
    [
        ("Find {request} for {shopper} in {store}", "esci", r"\['shopper', 'store'\]"),
        ("{history} {request}", "hm", r"\['request'\]"),
        ("Find {}", "esci", "positional"),
        ("Find {request", "esci", "format string"),
    ],
)
def test_bad_template_is_rejected_naming_the_fields(template, task, message):
    with pytest.raises(ValueError, match=message):
        check_template(template, task)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<think>they want shoes</think><answer> red running shoes </answer>", "red running shoes"),
        ("<think>hmm</think> red running shoes", "red running shoes"),
        ("red running shoes", "red running shoes"),
        ("<ANSWER>a</ANSWER> <answer>b</answer>", "a"),
        ("<think>maybe <answer>x</answer>?</think><answer>y</answer>", "y"),
        ("<think>cut off while thinking", ""),
        ("<answer>no closing tag", "no closing tag"),
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    "completion, follows",
    [
        ("<think>they want shoes</think><answer> red running shoes </answer>", True),
        ("<answer>a</answer> trailing words", True),
        ("<ANSWER>a</ANSWER>", True),
        ("<think>hmm</think> red running shoes", False),  # no answer tag
        ("<answer>waluminum waluminum waluminum", False),  # never closed
        ("<answer>  </answer>", False),  # empty
        ("</answer><answer>", False),
        # Without tags the whole completion is the answer: one non-empty line of at most 32 words.
        ("red running shoes, women, size 8", True),
        ("  red running shoes \n", True),
        ("red running shoes\n\nI hope this helps!", False),
        ("   ", False),
        (" ".join(["shoes"] * 32), True),
        (" ".join(["shoes"] * 33), False),
    ],
)
def test_follows_format(completion, follows):
    assert follows_format(completion) is follows


# ----------------------------------------------------------------------------------------------------
# Tasks


def test_default_task_loads_offline_with_full_pools(task):
    assert task.name == "esci-default"
    assert len(task) == 188  # 200 queries less the 12 whose only judged product is Irrelevant
    assert all(len(p) == 100 for p in task.pools) and len(task.pools) == len(task)
    assert [s.owner for s in task.samples] == list(range(len(task)))
    s = task.samples[0]
    assert s.query == "mama koala" and s.target_ids == ("B01LVWQY6K",) and "mama koala" in s.text


def test_default_task_works_with_bm25_reward(task):
    samples = task.samples[:8]
    reward = BM25Reward(task.items, task.pools, task.gains)
    owners = torch.tensor([s.owner for s in samples])
    titles = [task.items[task.item_ids.index(s.target_ids[0])].split("\n")[0] for s in samples]
    assert reward(titles, owners).min() > 0.9  # the judged product's own title finds it
    unrelated = reward(["zzz qqq"] * len(samples), owners)
    assert (reward(titles, owners) > unrelated).all()
    torch.testing.assert_close(task.reward("bm25")(titles, owners), reward(titles, owners))


def test_esci_task_from_official_files(esci_parquet):
    with pytest.warns(UserWarning, match="smaller than pool_size"):
        t = esci_task(esci_parquet, pool_size=20)
    assert [s.id for s in t.samples] == ["esci-101", "esci-102"]  # train, small, us
    assert t.samples[0].target_ids == ("B0FXMOUSE1", "B0FXMOUSE2", "B0FXPAD001")  # best first, gain > 0
    assert t.samples[0].info["judged"]["B0FXMOUSE3"] == 0.0


def test_hm_task_on_fixture(hm_data):
    t = hm_task(hm_data, pool_size=6, template="Age {age}, {num_items} items:\n{history}")
    assert [s.id for s in t.samples] == [f"hm-{customer(2)}", f"hm-{customer(1)}"]  # customer 4's target is unknown
    s = t.samples[1]
    assert s.target_ids == ("0900000031",) and s.query is None
    assert s.text.startswith("Age 31, 2 items:\n- Fixture strap top")
    pool_ids = [t.item_ids[i] for i in t.pools[s.owner]]
    assert "0900000031" in pool_ids and "0900000001" not in pool_ids  # history is never a negative


def test_hm_task_real_extract():
    t = hm_task(
        (shared("hm", "articles.csv"), shared("hm", "customers.csv"), shared("hm", "transactions_train.csv")),
        max_samples=20,
    )
    assert len(t) == 20 and all(len(p) == 100 for p in t.pools)
    assert all(s.text.count("\n- ") >= 1 for s in t.samples)


def test_train_eval_split_is_seeded_and_disjoint(task):
    train, evaluation = train_eval_split(task, eval_fraction=0.25, seed=3)
    ids = [s.id for s in task.samples]
    assert len(evaluation) == round(0.25 * len(task))
    assert sorted(s.id for s in train.samples + evaluation.samples) == sorted(ids)
    assert [s.id for s in task.split(0.25, seed=3)[1].samples] == [s.id for s in evaluation.samples]
    assert [s.id for s in task.split(0.25, seed=4)[1].samples] != [s.id for s in evaluation.samples]
    assert train.pools is task.pools  # owners stay valid: one reward serves both halves


def test_three_way_split_is_seeded_disjoint_and_covers(task):
    train, val, test = three_way_split(task, val_fraction=0.1, test_fraction=0.2, seed=3)
    n = len(task)
    assert (len(val), len(test), len(train)) == (round(0.1 * n), round(0.2 * n), n - round(0.1 * n) - round(0.2 * n))
    ids = [s.id for s in task.samples]
    parts = [[s.id for s in part.samples] for part in (train, val, test)]
    assert sorted(sum(parts, [])) == sorted(ids) and len(set(sum(parts, []))) == n
    for part in parts:
        assert part == [i for i in ids if i in set(part)]  # original order
    again = task.three_way_split(0.1, 0.2, seed=3)
    assert [[s.id for s in p.samples] for p in again] == parts
    assert [s.id for s in task.three_way_split(0.1, 0.2, seed=4)[2].samples] != parts[2]
    assert train.pools is task.pools and test.pools is task.pools
    # With no validation part, the test part is train_eval_split's eval part.
    t2, v2, e2 = task.three_way_split(0.0, 0.25, seed=3)
    assert len(v2) == 0
    assert [s.id for s in e2.samples] == [s.id for s in train_eval_split(task, 0.25, seed=3)[1].samples]
    assert [s.id for s in t2.samples] == [s.id for s in train_eval_split(task, 0.25, seed=3)[0].samples]


@pytest.mark.parametrize(
    "n, val, test, sizes",
    [(3, 0.1, 0.1, (1, 1, 1)), (5, 0.01, 0.2, (3, 1, 1)), (5, 0.01, 0.3, (2, 1, 2)), (2, 0.3, 0.3, (1, 0, 1)),
     (1, 0.4, 0.4, (1, 0, 0)), (10, 0.0, 0.0, (10, 0, 0)), (4, 0.45, 0.45, (1, 1, 2))],
)  # fmt: skip
def test_three_way_split_gives_each_nonzero_part_a_sample(task, n, val, test, sizes):
    small = task.select(range(n))
    train, v, t = small.three_way_split(val, test)
    assert (len(train), len(v), len(t)) == sizes


@pytest.mark.parametrize(
    "val, test, name",
    [(1.0, 0.0, "val_fraction"), (-0.1, 0.2, "val_fraction"), (0.1, 1, "test_fraction"), (0.1, "0.2", "test_fraction"),
     (True, 0.2, "val_fraction"), (0.5, 0.5, "val_fraction, test_fraction")],
)  # fmt: skip
def test_three_way_split_rejects_bad_fractions(task, val, test, name):
    with pytest.raises(ValueError, match=f"^{re.escape(name)}:"):
        task.three_way_split(val, test)


def test_held_out_items_are_the_targets_of_held_out_samples(task):
    train, val, test = task.three_way_split(0.1, 0.2, seed=0)
    held = train.held_out_items(val, test)
    expected = {task.item_ids.index(pid) for s in val.samples + test.samples for pid in s.target_ids}
    assert held == sorted(expected) and len(held) == len(val) + len(test)  # one target per query here
    assert held_out_items(val, test) == held
    assert train.held_out_items() == []
    # The shipped queries judge distinct products: no training target is held out.
    assert not {task.item_ids.index(s.target_ids[0]) for s in train.samples} & set(held)


def test_held_out_items_skip_zero_gain_judgements_and_other_catalogues():
    frame = load_esci(ESCI_EXAMPLES, ESCI_PRODUCTS, split=None, version=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = esci_task(frame, pool_size=10)
    first = t.select([0])
    held = {t.item_ids[i] for i in t.held_out_items(first)}
    assert held == {"B0FXMOUSE1", "B0FXMOUSE2", "B0FXPAD001"}  # B0FXMOUSE3 is judged Irrelevant (gain 0)
    with pytest.raises(ValueError, match="catalogue"):
        t.held_out_items(default_task().select([0]))
    with pytest.raises(ValueError, match="SearchTask"):
        t.held_out_items([0])
