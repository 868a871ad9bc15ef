"""H&M Personalized Fashion Recommendations (Kaggle 2022): loaders for the official CSV files.

Files (https://www.kaggle.com/competitions/h-and-m-personalized-fashion-recommendations/data):
``articles.csv`` (:data:`ARTICLE_COLUMNS` and a few numeric codes), ``customers.csv``
(:data:`CUSTOMER_COLUMNS`), ``transactions_train.csv`` (:data:`TRANSACTION_COLUMNS`). The data is governed
by the competition's rules, so none of it ships with this package.

``article_id`` is a 10-digit string with a leading zero (``"0108775015"``); files re-saved by pandas
often hold it as an int (``108775015``) and carry an extra unnamed index column. The loader undoes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import pandas as pd

from ._common import (
    check_max_chars,
    clean_text,
    compose,
    read_columns,
    read_table,
    require_columns,
    require_file,
    to_int64,
)

__all__ = [
    "ARTICLE_COLUMNS",
    "CUSTOMER_COLUMNS",
    "TRANSACTION_COLUMNS",
    "HM_URL",
    "HMData",
    "load_hm",
    "article_text",
    "normalise_article_id",
    "customer_histories",
]

HM_URL = "https://www.kaggle.com/competitions/h-and-m-personalized-fashion-recommendations/data"

#: Columns of articles.csv that the loader requires (the file also has the numeric codes of these names).
ARTICLE_COLUMNS = (
    "article_id",
    "prod_name",
    "product_type_name",
    "product_group_name",
    "graphical_appearance_name",
    "colour_group_name",
    "perceived_colour_value_name",
    "perceived_colour_master_name",
    "department_name",
    "index_name",
    "index_group_name",
    "section_name",
    "garment_group_name",
    "detail_desc",
)

#: Columns of customers.csv.
CUSTOMER_COLUMNS = ("customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age", "postal_code")

#: Columns of transactions_train.csv.
TRANSACTION_COLUMNS = ("t_dat", "customer_id", "article_id", "price", "sales_channel_id")

_ID_WIDTH = 10
# Placeholder values of the H&M attribute columns that describe nothing.
_EMPTY = frozenset({"", "unknown", "undefined", "other"})


@dataclass(frozen=True)
class HMData:
    """The loaded H&M tables.

    Attributes:
        articles: one row per article; ``article_id`` a 10-digit str (unique), text columns str.
        customers: one row per customer, or None when not loaded; ``customer_id`` str, ``age`` float.
        transactions: one row per purchased item in file order, or None; ``t_dat`` datetime64,
            ``customer_id`` and ``article_id`` str, ``price`` float64, ``sales_channel_id`` int64.
    """

    articles: pd.DataFrame
    customers: Optional[pd.DataFrame] = None
    transactions: Optional[pd.DataFrame] = None


def load_hm(articles_path, customers_path=None, transactions_path=None) -> HMData:
    """Load the H&M CSV files.

    Args:
        articles_path: ``articles.csv``.
        customers_path: ``customers.csv``, or None to skip it.
        transactions_path: ``transactions_train.csv``, or None to skip it.
    Returns:
        An :class:`HMData`. Article ids are normalised to the official 10-digit zero-padded strings in both
        articles and transactions, and a leading unnamed index column (a pandas re-save) is dropped.
    Raises:
        FileNotFoundError: a file is missing (the message says where to get it).
        ValueError: a file lacks official columns (listed), or an article id is not a number.
    """
    articles, where = _read_csv(articles_path, "H&M articles file", "articles.csv", ARTICLE_COLUMNS)
    articles["article_id"] = normalise_article_id(articles["article_id"], where)
    for col in articles.columns:
        if col.endswith(("_name", "_desc")) or col == "prod_name":
            articles[col] = articles[col].fillna("").astype(str)
    if articles["article_id"].duplicated().any():
        dup = articles.loc[articles["article_id"].duplicated(), "article_id"].tolist()[:5]
        raise ValueError(f"{where}: article_id must be unique, repeated: {dup}")
    articles = articles.reset_index(drop=True)

    customers = None
    if customers_path is not None:
        customers, _ = _read_csv(customers_path, "H&M customers file", "customers.csv", CUSTOMER_COLUMNS)
        for col in ("FN", "Active", "age"):
            customers[col] = pd.to_numeric(customers[col], errors="coerce").astype("float64")
        for col in ("club_member_status", "fashion_news_frequency", "postal_code"):
            customers[col] = customers[col].fillna("").astype(str)

    transactions = None
    if transactions_path is not None:
        transactions, where = _read_csv(
            transactions_path, "H&M transactions file", "transactions_train.csv", TRANSACTION_COLUMNS
        )
        transactions["article_id"] = normalise_article_id(transactions["article_id"], where)
        transactions["t_dat"] = _column(
            where, "t_dat", "dates YYYY-MM-DD", lambda: pd.to_datetime(transactions["t_dat"], format="%Y-%m-%d")
        )
        transactions["price"] = _column(where, "price", "numbers", lambda: transactions["price"].astype("float64"))
        channel = transactions["sales_channel_id"]
        transactions["sales_channel_id"] = to_int64(channel, f"{where}: column sales_channel_id")
    return HMData(articles, customers, transactions)


def normalise_article_id(ids: pd.Series, what: str = "article_id") -> pd.Series:
    """Article ids (str or int, with or without the leading 0) -> official 10-digit zero-padded strings."""
    s = ids.astype(str).str.strip().str.replace(r"\.0$", "", regex=True)  # a float column re-saved
    bad = s[~s.str.fullmatch(r"\d{1,10}")]
    if len(bad):
        raise ValueError(f"{what}: article_id must be a number of at most 10 digits, got {bad.tolist()[:5]}")
    return s.str.zfill(_ID_WIDTH)


def article_text(row: Mapping, max_chars: int = 400) -> str:
    """One item text from an H&M article row, one piece per line, at most ``max_chars`` characters.

    Pieces: the product name; type, colour and pattern (``"Vest top, Black, Solid"``); where it is sold
    (section, garment group, index group); the description. Placeholder values ("Unknown", "undefined")
    and repeats are left out; the text is cut at a word boundary.
    """
    check_max_chars(max_chars)

    def join(cols):
        seen, out = set(), []
        for c in cols:
            v = clean_text(row.get(c))
            if v.lower() not in _EMPTY and v.lower() not in seen:
                seen.add(v.lower())
                out.append(v)
        return ", ".join(out)

    pieces = [
        clean_text(row.get("prod_name")),
        join(("product_type_name", "colour_group_name", "graphical_appearance_name")),
        join(("section_name", "garment_group_name", "index_group_name")),
        clean_text(row.get("detail_desc")),
    ]
    return "\n".join(compose(pieces, max_chars))


def customer_histories(transactions: pd.DataFrame, min_history: int = 1) -> pd.DataFrame:
    """Each customer's purchases in order, split into a history and the next (last) item.

    Purchases are sorted by ``t_dat``; purchases of one day keep their file order (the files carry no time
    of day). Repeated rows of one article on one day (quantities) count once.

    Args:
        transactions: a transactions frame (:func:`load_hm`).
        min_history: the fewest history items a customer needs to be kept.
    Returns:
        A DataFrame with one row per kept customer, in order of first appearance: ``customer_id`` (str),
        ``history`` (list of article ids, oldest first, all purchases but the last), ``target`` (the last
        article id), ``target_date`` (datetime64).
    """
    if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 1:
        raise ValueError(f"min_history: expected an int >= 1, got {min_history!r}")
    require_columns(transactions.columns, ("t_dat", "customer_id", "article_id"), "transactions")
    tx = transactions.drop_duplicates(["t_dat", "customer_id", "article_id"])
    tx = tx.sort_values("t_dat", kind="stable")
    order = pd.unique(transactions["customer_id"])
    rows = []
    for cid, group in tx.groupby("customer_id", sort=False):
        ids = group["article_id"].tolist()
        if len(ids) > min_history:
            rows.append((cid, ids[:-1], ids[-1], group["t_dat"].iloc[-1]))
    out = pd.DataFrame(rows, columns=["customer_id", "history", "target", "target_date"])
    rank = {c: i for i, c in enumerate(order)}
    out = out.sort_values("customer_id", key=lambda s: s.map(rank), kind="stable")
    return out.reset_index(drop=True)


def _read_csv(path, what: str, name: str, required) -> tuple[pd.DataFrame, str]:
    """The frame of one H&M CSV file, and the file's name for later errors (``what`` and its path)."""
    p = require_file(path, what, f"Get {name} from {HM_URL} (Kaggle competition data).")
    columns = read_columns(p, what)
    # A re-saved frame starts with an unnamed index column ("" in the header, "Unnamed: 0" once read).
    extra = [c for c in columns if c == "" or c.startswith("Unnamed:")]
    require_columns(columns, required, f"{what} {p}")
    ids = {c: str for c in ("article_id", "customer_id", "postal_code", "t_dat") if c in columns}
    frame = read_table(p, what, lambda: pd.read_csv(p, dtype=ids))
    frame = frame.drop(columns=[c for c in frame.columns if c in extra or str(c).startswith("Unnamed:")])
    return frame, f"{what} {p}"


def _column(where: str, col: str, expected: str, convert):
    """``convert()`` of one column, with a value it cannot take reported by file and column."""
    try:
        return convert()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: column {col}: expected {expected} ({exc})") from exc
