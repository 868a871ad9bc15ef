"""An OSPO training step against a GRPO step at the same batch, side by side in one process.

    python bench/bench_step.py [--prompts 4] [--group 8] [--steps 4] [--json bench/results/step.json]

Both runs use the same tiny policy (built from a config, tokenizer trained locally), the same prompts from
the shipped default ESCI task, the bundled MiniLM dense-retrieval reward and the same seeds; they differ only
in ``mode``. OSPO's extra work is the attribution (segmentation, plans, one packed evaluation of every
coalition, Owen aggregation) and the redistribution; the bar is an OSPO step at most 1.3x a GRPO step.

The policy is not warm-started by default (``--warm-start-steps 0``): its completions then run to the token
limit without answer tags, so every completion is segmented whole into up to 16 segments and attributed
with the full coalition budget: the heaviest attribution load per token a step can have. A tiny CPU policy
is also far cheaper than a real LLM, so the ratio here is a pessimistic bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile

import torch

import ospo_fast as of
from ospo_fast.app.tiny import build_tokenizer, tiny_causal_lm
from ospo_fast.app.warm_start import supervised_warm_start
from ospo_fast.trainer import OSPOConfig, OSPOTrainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=64, help="coalitions per response")
    parser.add_argument("--hidden", type=int, default=256, help="policy width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warm-start-steps", type=int, default=0)
    parser.add_argument("--attribution-dtype", default=None, help="e.g. bfloat16 (AMX on recent x86 CPUs)")
    parser.add_argument("--json", default="bench/results/step.json")
    args = parser.parse_args(argv)

    task = of.data.default_task()
    samples = task.samples[:32]
    tokenizer = build_tokenizer(task.items + [s.query for s in task.samples], vocab_size=2048)
    reward = task.reward("dense")
    base = tiny_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers)
    targets = [f"<think>{s.query}</think><answer>{s.query}</answer>" for s in samples]
    if args.warm_start_steps:
        supervised_warm_start(base, tokenizer, [s.prompt for s in samples], targets, steps=args.warm_start_steps,
                              progress=False)
    weights = {k: v.clone() for k, v in base.state_dict().items()}

    results = {}
    for mode in ("grpo", "ospo", "grpo", "ospo"):  # interleaved, so drift on a shared machine hits both
        model = tiny_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers)
        model.load_state_dict(weights)
        with tempfile.TemporaryDirectory() as out:
            config = OSPOConfig(output_dir=out, mode=mode, prompts_per_step=args.prompts, group_size=args.group,
                                max_steps=args.steps + 1, max_new_tokens=args.max_new_tokens,
                                attribution_budget=args.budget, attribution_dtype=args.attribution_dtype,
                                save_steps=10**6, progress=False)
            trainer = OSPOTrainer(model, tokenizer, reward, [s.prompt for s in samples], [s.owner for s in samples],
                                  config)
            history = trainer.train()[1:]  # the first step warms caches up
        results.setdefault(mode, []).extend(history)

    rows = []
    for mode, history in results.items():
        rows.append(dict(
            mode=mode,
            step_seconds=statistics.median(h["step_seconds"] for h in history),
            attribution_seconds=statistics.median(h["attribution_seconds"] for h in history),
            evaluations=statistics.median(h["num_evaluations"] for h in history),
            completion_length=statistics.mean(h["completion_length"] for h in history),
        ))
    grpo, ospo = (next(r for r in rows if r["mode"] == m) for m in ("grpo", "ospo"))
    ratio = ospo["step_seconds"] / grpo["step_seconds"]
    print(f"batch: {args.prompts} prompts x {args.group} completions, <= {args.max_new_tokens} new tokens, "
          f"policy {args.layers}x{args.hidden}, MiniLM reward over pools of {len(task.pools[0])} items")
    print(f"{'mode':<6} {'step (s)':>9} {'reward+attribution (s)':>23} {'evaluations':>12} {'completion len':>15}")
    for r in rows:
        print(f"{r['mode']:<6} {r['step_seconds']:>9.3f} {r['attribution_seconds']:>23.3f} {r['evaluations']:>12.0f} "
              f"{r['completion_length']:>15.1f}")
    print(f"OSPO step / GRPO step = {ratio:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=dict(machine=platform.machine(), torch=torch.__version__,
                                     threads=torch.get_num_threads(), cuda=torch.cuda.is_available()),
                           args=vars(args), rows=rows, ratio=ratio), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
