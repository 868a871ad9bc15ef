"""Amazon Shopping Queries Dataset (ESCI): loaders for the official files and the flat CSV layout.

The official release (https://github.com/amazon-science/esci-data, Apache-2.0) has two parquet files:

- ``shopping_queries_dataset_examples.parquet``: one row per judged (query, product) pair, columns
  :data:`EXAMPLE_COLUMNS`; ``esci_label`` is E (exact), S (substitute), C (complement) or I (irrelevant);
  ``small_version`` / ``large_version`` (0/1) mark the reduced and full task 1 sets; ``split`` is
  ``"train"`` or ``"test"``.
- ``shopping_queries_dataset_products.parquet``: one row per (product, locale), columns
  :data:`PRODUCT_COLUMNS`.

:func:`load_esci` joins them on ``(product_id, product_locale)``; :func:`load_esci_csv` reads the flat
layout (examples and product columns in one CSV, labels possibly spelled out) of the shared extracts and of
the default dataset shipped with the package (:func:`load_default_esci`).
"""

from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path
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
    "EXAMPLE_COLUMNS",
    "PRODUCT_COLUMNS",
    "ESCI_COLUMNS",
    "ESCI_URL",
    "load_esci",
    "load_esci_csv",
    "load_default_esci",
    "default_esci_path",
    "product_text",
    "product_text_parts",
    "title_category",
]

ESCI_URL = "https://github.com/amazon-science/esci-data"

#: Columns of shopping_queries_dataset_examples.parquet.
EXAMPLE_COLUMNS = (
    "example_id",
    "query",
    "query_id",
    "product_id",
    "product_locale",
    "esci_label",
    "small_version",
    "large_version",
    "split",
)

#: Columns of shopping_queries_dataset_products.parquet.
PRODUCT_COLUMNS = (
    "product_id",
    "product_title",
    "product_description",
    "product_bullet_point",
    "product_brand",
    "product_color",
    "product_locale",
)

#: Columns of a joined frame, in order (``split`` is absent from flat CSVs that lack it).
ESCI_COLUMNS = EXAMPLE_COLUMNS + tuple(c for c in PRODUCT_COLUMNS if c not in EXAMPLE_COLUMNS)

_TEXT_COLUMNS = ("product_title", "product_description", "product_bullet_point", "product_brand", "product_color")
_INT_COLUMNS = ("example_id", "query_id", "small_version", "large_version")
_LABEL_WORDS = {"exact": "E", "substitute": "S", "complement": "C", "irrelevant": "I"}
_WHERE = (
    f"Get shopping_queries_dataset/{{name}} from {ESCI_URL} "
    "(git lfs pull, or the file's raw download link)."
)

DEFAULT_FILE = "esci_underspec_200.csv"

# The fields of an item text, in the order they are joined.
_PART_FIELDS = ("product_title", "product_brand", "product_color", "product_bullet_point", "product_description")


def load_esci(
    examples_path,
    products_path,
    split: Optional[str] = "train",
    version: Optional[str] = "small",
    locale: Optional[str] = "us",
) -> pd.DataFrame:
    """Load the official ESCI files and join examples with products.

    Args:
        examples_path: ``shopping_queries_dataset_examples.parquet`` (a ``.csv`` with the same columns works).
        products_path: ``shopping_queries_dataset_products.parquet`` (or ``.csv``).
        split: ``"train"``, ``"test"`` or None (both).
        version: ``"small"`` (``small_version == 1``, the reduced task 1 set), ``"large"``
            (``large_version == 1``) or None (every example).
        locale: ``"us"``, ``"es"``, ``"jp"`` or None (every locale).
    Returns:
        A DataFrame with the columns :data:`ESCI_COLUMNS`, one row per example whose product is in the
        products file (examples without one are dropped with a warning). Labels are the letters E/S/C/I;
        product text columns are str with ``""`` for missing values; ids and version flags are int64.
    Raises:
        FileNotFoundError: a file is missing (the message says where to get it).
        ValueError: a file lacks official columns (listed), or an argument or a label is invalid.
    """
    _check_choice("split", split, ("train", "test"))
    _check_choice("version", version, ("small", "large"))
    if locale is not None and not isinstance(locale, str):
        raise ValueError(f"locale: expected a locale string such as 'us', or None, got {locale!r}")
    ex_path = require_file(
        examples_path, "ESCI examples file", _WHERE.format(name="shopping_queries_dataset_examples.parquet")
    )
    pr_path = require_file(
        products_path, "ESCI products file", _WHERE.format(name="shopping_queries_dataset_products.parquet")
    )
    ex_what, pr_what = f"ESCI examples file {ex_path}", f"ESCI products file {pr_path}"
    require_columns(read_columns(ex_path, "ESCI examples file"), EXAMPLE_COLUMNS, ex_what)
    require_columns(read_columns(pr_path, "ESCI products file"), PRODUCT_COLUMNS, pr_what)

    # Filters are pushed into the parquet reader: the full files hold 2.6M examples and 1.8M products.
    ex_filters = []
    if split is not None:
        ex_filters.append(("split", "==", split))
    if version is not None:
        ex_filters.append((f"{version}_version", "==", 1))
    if locale is not None:
        ex_filters.append(("product_locale", "==", locale))
    examples = _read(
        ex_path, "ESCI examples file", EXAMPLE_COLUMNS, ex_filters, dtype={"product_id": str, "query": str}
    )

    # Only the products of the kept examples are read.
    ids = sorted(set(examples["product_id"].astype(str)))
    if ids:
        pr_filters = [("product_id", "in", ids)]
        if locale is not None:
            pr_filters.append(("product_locale", "==", locale))
        products = _read(
            pr_path, "ESCI products file", PRODUCT_COLUMNS, pr_filters, dtype={c: str for c in PRODUCT_COLUMNS}
        )
        products = products.drop_duplicates(["product_id", "product_locale"])
    else:
        products = pd.DataFrame({c: pd.Series(dtype=str) for c in PRODUCT_COLUMNS})

    # A left join with an indicator rather than an inner join, to report what was dropped.
    frame = examples.merge(products, on=["product_id", "product_locale"], how="left", validate="m:1", indicator=True)
    orphan = frame.pop("_merge") == "left_only"
    if orphan.any():
        warnings.warn(f"ESCI: {int(orphan.sum())} example(s) have no row in {pr_path}; dropped", stacklevel=2)
        frame = frame[~orphan]
    frame = _normalise(frame, ex_what)  # ids, flags and labels all come from the examples
    return _finish(frame, ESCI_COLUMNS)


def load_esci_csv(path) -> pd.DataFrame:
    """Load ESCI examples with their product text from one flat CSV.

    The layout of ``underspec_esci_200.csv`` and of the shipped default data: the example columns (``split``
    optional) and the product columns (:data:`PRODUCT_COLUMNS`) side by side; labels may be spelled out
    (Exact/Substitute/Complement/Irrelevant). Other columns are dropped.

    Returns:
        A DataFrame like :func:`load_esci`'s (columns :data:`ESCI_COLUMNS`, ``split`` only when present).
    Raises:
        FileNotFoundError: the file is missing. ValueError: columns missing (listed) or an unknown label.
    """
    p = require_file(path, "ESCI CSV file", f"(ESCI rows in the flat layout; the official files are at {ESCI_URL}.)")
    required = [c for c in ESCI_COLUMNS if c != "split"]
    columns = read_columns(p, "ESCI CSV file")
    require_columns(columns, required, f"ESCI CSV file {p}")
    keep = [c for c in ESCI_COLUMNS if c in columns]
    dtype = {c: str for c in keep if c not in _INT_COLUMNS}
    frame = read_table(p, "ESCI CSV file", lambda: pd.read_csv(p, usecols=keep, dtype=dtype, keep_default_na=False))
    return _finish(_normalise(frame, f"ESCI CSV file {p}"), keep)


def default_esci_path() -> Path:
    """Path of the default ESCI dataset shipped inside the package (200 queries; see default/NOTICE)."""
    return Path(str(resources.files("ospo_fast.data").joinpath("default", DEFAULT_FILE)))


def load_default_esci() -> pd.DataFrame:
    """The shipped default dataset: 200 real ESCI queries (us), one judged product each, product text trimmed.

    No download. Same columns as :func:`load_esci_csv`; attribution in ``ospo_fast/data/default/NOTICE``.
    """
    return load_esci_csv(default_esci_path())


# ----------------------------------------------------------------------------------------------------
# Item text


def product_text_parts(row: Mapping, max_chars: int = 600) -> dict:
    """The fields :func:`product_text` keeps, trimmed: title, brand, colour, bullets, description.

    Args:
        row: a mapping (a DataFrame row, a dict) with any of the product columns; missing or NaN fields
            count as empty.
        max_chars: the most characters of the joined text.
    Returns:
        ``{"product_title": str, "product_brand": str, "product_color": str, "product_bullet_point": str
        (kept bullets, one per line), "product_description": str}``; fields that were dropped are ``""``.
    """
    check_max_chars(max_chars)
    title = clean_text(row.get("product_title"))
    brand = clean_text(row.get("product_brand"))
    color = clean_text(row.get("product_color"))
    # Brand and colour usually repeat words of the title: add them only when they say something new.
    if brand and brand.lower() in title.lower():
        brand = ""
    if color and color.lower() in title.lower():
        color = ""
    raw_bullets = row.get("product_bullet_point")
    bullets = [clean_text(b) for b in str(raw_bullets).splitlines()] if isinstance(raw_bullets, str) else []
    bullets = [b for b in bullets if b]
    description = clean_text(row.get("product_description"))
    labelled = [
        (key, text)
        for key, text in [("product_title", title), ("product_brand", brand), ("product_color", color)]
        + [("product_bullet_point", b) for b in bullets]
        + [("product_description", description)]
        if text
    ]
    # compose keeps a prefix of the pieces (the last one maybe cut): map it back onto the fields.
    kept = compose([text for _, text in labelled], max_chars)
    out = dict.fromkeys(_PART_FIELDS, "")
    kept_bullets = []
    for (key, _), text in zip(labelled, kept):
        if key == "product_bullet_point":
            kept_bullets.append(text)
        else:
            out[key] = text
    out["product_bullet_point"] = "\n".join(kept_bullets)
    return out


def product_text(row: Mapping, max_chars: int = 600) -> str:
    """One item text from an ESCI product row: title, brand, colour, bullets, description, one per line.

    HTML is removed, brand and colour are left out when the title already names them, and the text is cut
    at a word boundary to at most ``max_chars`` characters (bullets before the description). Applying it to
    a row trimmed by :func:`product_text_parts` gives the same text as the full row.
    """
    parts = product_text_parts(row, max_chars)
    return "\n".join(v for v in parts.values() if v)


# The part of a title before these is the product ("Pocket Cloth Diapers, 6 Pack with Inserts" -> "...Diapers").
_TITLE_CUT = re.compile(r",|\s[-–—|]\s|\||\(|\[|:|;|\s(?:with|for|by|in|from|to|of|w/|fits?|compatible)\s", re.I)
# Words that end a title's product part without naming a kind of product.
_NOT_A_KIND = frozenset(
    {
        "pack", "packs", "set", "sets", "piece", "pieces", "pcs", "pc", "pair", "pairs", "count", "size", "sizes",
        "inch", "inches", "feet", "foot", "large", "small", "medium", "mini", "new", "edition", "version",
        "compatible", "easy", "fit", "black", "white", "grey", "gray", "blue", "red", "green", "pink", "gold",
        "silver", "brown", "purple", "yellow", "orange", "beige", "clear", "men", "mens", "women", "womens",
        "kids", "girls", "boys", "baby", "adult", "adults", "unisex", "plus", "pro", "max", "ultra",
    }
)  # fmt: skip


def title_category(title: str) -> str:
    """A product kind from an ESCI title: the head noun of its first phrase, singular, lower case.

    ESCI has no category column, so pools use this as the "same category" key. It takes the part of the
    title before the first comma, dash, bracket or joining word ("with", "for", ...), and returns its last
    word of 3+ letters that is not a size, count, colour or audience word (:data:`_NOT_A_KIND`), with a
    plural ending removed: ``"Mama Koala ... Pocket Cloth Diapers, 6 Pack"`` -> ``"diaper"``,
    ``"Ilyapa Window Frame Wall Decor 2 Pack"`` -> ``"decor"``. A heuristic: brand-first titles such as
    ``"Apple iPhone 12"`` give the model word. Returns ``""`` when no word qualifies.
    """
    head = _TITLE_CUT.split(clean_text(title), maxsplit=1)[0]
    words = [w for w in re.findall(r"[a-z]+", head.lower()) if len(w) > 2 and w not in _NOT_A_KIND]
    return _singular(words[-1]) if words else ""


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "ches", "shes", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


# ----------------------------------------------------------------------------------------------------
# Internals


def _check_choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)} or None, got {value!r}")


def _read(path: Path, what: str, columns, filters, dtype) -> pd.DataFrame:
    """Read ``columns`` of a parquet or CSV file, keeping the rows that pass every ``(col, op, value)``."""
    if path.suffix == ".parquet":
        return read_table(path, what, lambda: pd.read_parquet(path, columns=list(columns), filters=filters or None))
    dtype = {k: v for k, v in dtype.items() if k in columns}
    frame = read_table(path, what, lambda: pd.read_csv(path, usecols=list(columns), dtype=dtype))
    for col, op, value in filters:
        frame = frame[frame[col].isin(value) if op == "in" else frame[col] == value]
    return frame


def _normalise(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """Official dtypes: E/S/C/I labels, str ids and text ('' for missing), int64 ids and flags. ``what``
    names the file in errors."""
    frame = frame.copy()
    for col in _INT_COLUMNS:
        if col in frame:
            frame[col] = to_int64(frame[col], f"{what}: column {col}")
    for col in ("query", "product_id", "product_locale", "split") + _TEXT_COLUMNS:
        if col in frame:
            frame[col] = frame[col].fillna("").astype(str)
    if "esci_label" in frame:
        labels = frame["esci_label"].astype(str).str.strip()
        letters = labels.str.lower().map(_LABEL_WORDS).fillna(labels.str.upper())
        bad = sorted(set(labels[~letters.isin(["E", "S", "C", "I"])]))
        if bad:
            raise ValueError(
                f"{what}: esci_label: unknown label(s) {bad[:10]}; expected E/S/C/I or Exact/Substitute/..."
            )
        frame["esci_label"] = letters
    return frame


def _finish(frame: pd.DataFrame, columns) -> pd.DataFrame:
    return frame[[c for c in columns if c in frame.columns]].reset_index(drop=True)
