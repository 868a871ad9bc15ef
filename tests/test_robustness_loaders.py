"""Corrupt data files: every loader names the file and what it expected, never a bare reader traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from ospo_fast.data import load_esci, load_esci_csv, load_hm

FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
ESCI_EXAMPLES, ESCI_PRODUCTS = FIXTURES / "esci_examples.csv", FIXTURES / "esci_products.csv"
HM_ARTICLES, HM_TRANSACTIONS = FIXTURES / "hm_articles.csv", FIXTURES / "hm_transactions_train.csv"
GARBAGE = b"\xff\xfe\x00\x81garbage\x9c\n" + bytes(range(256)) * 8  # not UTF-8 from the first byte


def _parquet(tmp_path: Path) -> tuple[Path, Path]:
    ex, pr = tmp_path / "examples.parquet", tmp_path / "products.parquet"
    pd.read_csv(ESCI_EXAMPLES, dtype={"product_id": str}).to_parquet(ex)
    pd.read_csv(ESCI_PRODUCTS, dtype=str).to_parquet(pr)
    return ex, pr


def _raises_naming(path: Path, expected: str):
    return pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{expected}")


def test_truncated_parquet_names_the_file(tmp_path):
    ex, pr = _parquet(tmp_path)
    assert len(load_esci(ex, pr)) > 0  # the intact files load
    data = ex.read_bytes()
    for name, cut in (("head.parquet", data[: len(data) // 2]), ("tail.parquet", data[:64] + data[-len(data) // 2 :])):
        bad = tmp_path / name
        bad.write_bytes(cut)
        with _raises_naming(bad, "ESCI examples file|complete Parquet file"):
            load_esci(bad, pr)
        with _raises_naming(bad, "complete Parquet file"):
            load_esci(ex, bad)


def test_garbage_csv_names_the_file(tmp_path):
    bad = tmp_path / "garbage.csv"
    bad.write_bytes(GARBAGE)
    for load in (lambda: load_esci_csv(bad), lambda: load_esci(bad, ESCI_PRODUCTS), lambda: load_hm(bad)):
        with _raises_naming(bad, "UTF-8 CSV file with a header row"):
            load()
    with _raises_naming(bad, "UTF-8 CSV"):
        load_hm(HM_ARTICLES, transactions_path=bad)


def test_malformed_csv_rows_name_the_file(tmp_path):
    bad = tmp_path / "examples.csv"
    bad.write_text(ESCI_EXAMPLES.read_text() + '9,"an unterminated quote\n')
    with _raises_naming(bad, "UTF-8 CSV file"):
        load_esci(bad, ESCI_PRODUCTS)


def test_non_integer_ids_name_the_file_and_column(tmp_path):
    bad = tmp_path / "examples.csv"
    frame = pd.read_csv(ESCI_EXAMPLES, dtype=str)
    frame.loc[0, "query_id"] = "q-seven"
    frame.to_csv(bad, index=False)
    with _raises_naming(bad, r"column query_id: expected integers, got \['q-seven'\]"):
        load_esci(bad, ESCI_PRODUCTS, split=None, version=None, locale=None)
    transactions = tmp_path / "transactions.csv"
    frame = pd.read_csv(HM_TRANSACTIONS, dtype=str)
    frame.loc[0, "t_dat"], frame.loc[1, "sales_channel_id"] = "yesterday", "web"
    frame.to_csv(transactions, index=False)
    with _raises_naming(transactions, "column t_dat: expected dates"):
        load_hm(HM_ARTICLES, transactions_path=transactions)
    frame.loc[0, "t_dat"] = "2020-09-01"
    frame.to_csv(transactions, index=False)
    with _raises_naming(transactions, r"column sales_channel_id: expected integers, got \['web'\]"):
        load_hm(HM_ARTICLES, transactions_path=transactions)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    ex, pr = _parquet(tmp_path)
    pd.read_parquet(pr).drop(columns=["product_title"]).to_parquet(pr)
    with _raises_naming(pr, r"missing column\(s\) \['product_title'\]"):
        load_esci(ex, pr)
    articles = tmp_path / "articles.csv"
    pd.read_csv(HM_ARTICLES, dtype=str).drop(columns=["prod_name"]).to_csv(articles, index=False)
    with _raises_naming(articles, r"missing column\(s\) \['prod_name'\]"):
        load_hm(articles)
