"""The credit benchmark's attribution check, no training: how often exact Owen values, sampled Owen values
(budget 64) and leave-one-out give the hints of an answer the right sign, on the real MiniLM reward.

    python scripts/credit_check.py [--task default|hm] [--out docs/results/credit_check.json]

``--task hm`` uses the H&M extract in ../shared/data/hm (a larger catalogue; its rows stay out of the package).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ospo_fast.data as data
from ospo_fast.app.credit import attribution_check, credit_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="default", choices=["default", "hm"])
    parser.add_argument("--hm-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hm"))
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/credit_check.json")
    args = parser.parse_args()
    if args.task == "default":
        base = data.default_task(seed=args.seed)
    else:
        root = Path(args.hm_dir)
        hm = data.load_hm(root / "articles.csv", root / "customers.csv", root / "transactions_train.csv")
        base = data.hm_task(hm, seed=args.seed)
    task = credit_task(base, seed=args.seed)
    start = time.perf_counter()
    result = attribution_check(task, base.reward("dense"), budget=args.budget, seed=args.seed)
    result.update(task=args.task, budget=args.budget, seed=args.seed, seconds=round(time.perf_counter() - start, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['num_answers']} answers, {result['num_segments']} hint segments ({args.task})")
    print(f"{'method':<14} {'right sign':>10} {'true hints':>10} {'decoys':>8} {'valued 0':>9}")
    for method in ("exact", "sampled", "leave_one_out"):
        r = result[method]
        print(f"{method:<14} {r['right_sign']:>10.3f} {r['true']:>10.3f} {r['decoy']:>8.3f} {r['zero']:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
