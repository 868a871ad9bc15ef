"""Helpers shared by the ESCI and H&M loaders: file and column checks, item-text composition."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import pandas as pd

T = TypeVar("T")

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


def require_file(path, what: str, where: str) -> Path:
    """``path`` as a Path; ``FileNotFoundError`` naming it and where to get the data when it is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}. {where}")
    return p


def read_columns(path: Path, what: str) -> list[str]:
    """The column names of a .parquet or .csv file, without reading its rows (``what`` names the file in
    errors)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs the package pyarrow: pip install pyarrow") from e

        return read_table(path, what, lambda: list(pq.read_schema(path).names))
    return read_table(path, what, lambda: list(pd.read_csv(path, nrows=0).columns))


def read_table(path: Path, what: str, read: Callable[[], T]) -> T:
    """``read()``, a pandas or pyarrow read of ``path``. A file the reader cannot parse (truncated, not the
    format its suffix says, undecodable bytes, malformed rows, values of the wrong type) raises a ValueError
    that names the file and the format expected, with the reader's message, instead of the reader's error."""
    if path.suffix != ".parquet":
        check_csv_complete(path, what)
    try:
        return read()
    except _reader_errors() as exc:
        expected = (
            "a complete Parquet file (a truncated download fails this way: fetch it again)"
            if path.suffix == ".parquet"
            else "a UTF-8 CSV file with a header row of column names"
        )
        raise ValueError(f"{what} {path}: cannot be read as {expected} ({type(exc).__name__}: {exc})") from exc


def check_csv_complete(path: Path, what: str, tail_bytes: int = 1 << 20) -> None:
    """Refuses a CSV file cut off in the middle of its last row (an interrupted download or copy), which pandas
    would read as a row with its last fields missing. Only a file that does not end with a newline is
    checked: its last record (parsed from the last ``tail_bytes``) must have as many fields as the header."""
    import csv
    import io

    with open(path, "rb") as f:
        header = f.readline()
        size = f.seek(0, io.SEEK_END)
        if size == 0 or size <= len(header):
            return
        f.seek(size - 1)
        if f.read(1) in (b"\n", b"\r"):
            return
        start = max(len(header), size - tail_bytes)
        f.seek(start)
        tail = f.read()
    if start > len(header):  # begin at a line boundary
        tail = tail[tail.find(b"\n") + 1:]
    try:
        fields = len(next(csv.reader([header.decode("utf-8-sig")])))
        records = list(csv.reader(io.StringIO(tail.decode("utf-8", errors="replace"))))
    except (csv.Error, UnicodeDecodeError):
        return  # unparseable here; the reader reports it, naming the file
    if records and len(records[-1]) < fields:
        raise ValueError(
            f"{what} {path}: its last row has {len(records[-1])} of the header's {fields} fields and the file does "
            "not end with a newline: it was cut off mid-row (an interrupted download or copy?); fetch it again"
        )


def _reader_errors() -> tuple[type[BaseException], ...]:
    # pandas' ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors, pyarrow's errors derive
    # from ArrowException (some also from ValueError or OSError); FileNotFoundError is checked before.
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    try:
        import pyarrow
    except ImportError:
        return errors
    return errors + (pyarrow.ArrowException,)


def to_int64(column: pd.Series, what: str) -> pd.Series:
    """An integer column as int64; ValueError naming ``what`` (the file and column) and the first bad values."""
    numbers = pd.to_numeric(column, errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        raise ValueError(f"{what}: expected integers, got {column[bad].tolist()[:5]}")
    return numbers.astype("int64")


def require_columns(columns: Iterable[str], required: Sequence[str], what: str) -> None:
    """``ValueError`` listing the ``required`` columns that ``columns`` lacks."""
    have = set(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; the official layout has {list(required)}")


def clean_text(value) -> str:
    """A field as one line of plain text: '' for NaN/None, HTML tags and entities removed, spaces collapsed."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    text = str(value)
    if "<" in text or "&" in text:
        text = _TAG.sub(" ", html.unescape(text))
    return _SPACE.sub(" ", text).strip()


def _cut_words(text: str, room: int) -> str:
    """The longest prefix of ``text`` of at most ``room`` characters that ends at a word boundary."""
    if room <= 0:
        return ""
    if len(text) <= room:
        return text
    cut = text.rfind(" ", 0, room + 1)
    head = text[:cut] if cut > 0 else text[:room]  # one long word: cut it hard
    return head.rstrip(" ,;:-–—/|")


def compose(pieces: Iterable[str], max_chars: int, sep: str = "\n", min_cut: int = 24) -> list[str]:
    """The pieces that fit in ``max_chars`` characters once joined by ``sep``.

    Pieces are taken in order; the first one that does not fit whole is cut at a word boundary (kept only if
    at least ``min_cut`` characters remain: a brand or colour is never cut to a stub) and the rest are
    dropped. Empty pieces are skipped. Composing the result again returns it unchanged, so a text trimmed
    once (the shipped default data) gives the same item text as the untrimmed row.
    """
    out: list[str] = []
    used = 0
    for piece in pieces:
        if not piece:
            continue
        room = max_chars - used - (len(sep) if out else 0)
        if len(piece) <= room:
            out.append(piece)
            used += len(piece) + (len(sep) if len(out) > 1 else 0)
            continue
        head = _cut_words(piece, room)
        if len(head) >= min(min_cut, max_chars):
            out.append(head)
        break
    return out


def check_max_chars(max_chars) -> int:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars: expected a positive int, got {max_chars!r}")
    return max_chars
