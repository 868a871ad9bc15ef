"""Rebuild the default ESCI dataset shipped in ospo_fast/data/default/ from the shared extract.

    python scripts/build_default_data.py [--source ../shared/data/esci/underspec_esci_200.csv]

Reads the flat ESCI CSV (200 queries, one judged product each), keeps the official columns, trims each
product's text fields to what ``product_text(row, max_chars=600)`` uses (so the shipped rows give the same
item texts as the full ones), and writes ``esci_underspec_200.csv``. Deterministic: rerunning it on the same
source gives the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ospo_fast.data.esci import DEFAULT_FILE, ESCI_COLUMNS, load_esci_csv, product_text_parts

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "esci" / "underspec_esci_200.csv"
OUT = ROOT / "ospo_fast" / "data" / "default" / DEFAULT_FILE
MAX_CHARS = 600


def build(source: Path, out: Path, max_chars: int = MAX_CHARS) -> None:
    frame = load_esci_csv(source)
    parts = [product_text_parts(row, max_chars) for _, row in frame.iterrows()]
    for col in parts[0]:
        frame[col] = [p[col] for p in parts]
    frame = frame[[c for c in ESCI_COLUMNS if c in frame.columns]]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, lineterminator="\n")
    print(f"wrote {out} ({len(frame)} rows, {out.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help="flat ESCI CSV (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="output CSV (default: %(default)s)")
    ap.add_argument("--max-chars", type=int, default=MAX_CHARS, help="item text length (default: %(default)s)")
    args = ap.parse_args()
    build(args.source, args.out, args.max_chars)


if __name__ == "__main__":
    main()
