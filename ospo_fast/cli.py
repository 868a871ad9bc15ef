"""The ``ospo-fast`` command.

    ospo-fast demo [TEXT] [--query Q] [--permutations K] [--seed S]

``demo`` walks one response through the data flow: segmentation into phrases grouped in sentences, the
exact Owen plan, one batched call of a text reward on every coalition, and the Owen values of the
segments (exact, and sampled for comparison), with the efficiency check sum(phi) = v(N) - v(empty).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from .owen import owen_from_values
from .plans import exact_plan, sampled_plan
from .segment import Segmenter, coalition_texts

DEMO_TEXT = (
    "<think>the user wants a charger for an iphone</think><answer>fast iphone charger with usb c cable for car. "
    "6 ft braided cord, apple mfi certified. black and white</answer>"
)
DEMO_QUERY = "iphone 14 fast charger usb c cable apple certified"


def term_coverage_reward(query: str):
    """A text reward for the demo: the square root of the share of the query's words that the text contains
    (diminishing returns, as retrieval metrics have, so segments interact)."""
    words = set(re.findall(r"\w+", query.lower()))

    def reward(texts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [len(words & set(re.findall(r"\w+", t.lower()))) / max(len(words), 1) for t in texts], dtype=torch.float64
        ).sqrt()

    return reward


def demo(args) -> int:
    seg = Segmenter()(args.text)
    if seg.num_players == 0:
        print("the answer has no segments to attribute")
        return 0
    reward = term_coverage_reward(args.query)
    start = time.perf_counter()
    plan = exact_plan(seg.structure)
    values = reward(coalition_texts(seg, plan.masks))  # one call for every coalition
    phi = owen_from_values(plan, values)
    exact_seconds = time.perf_counter() - start
    sampled = sampled_plan(seg.structure, args.permutations, seed=args.seed)
    phi_sampled = owen_from_values(sampled, reward(coalition_texts(seg, sampled.masks)))

    print(f"response: {args.text}")
    print(f"query:    {args.query}")
    print(f"structure: {seg.num_players} segments in {seg.structure.num_unions} sentences {list(seg.structure.unions)}")
    print(f"exact plan: {plan.num_coalitions} coalitions, one reward call, {exact_seconds * 1e3:.1f} ms")
    print(f"sampled plan: K={args.permutations} orders, {sampled.num_coalitions} coalitions\n")
    print(f"{'union':>5}  {'segment':<32} {'Owen (exact)':>12} {'Owen (sampled)':>15}")
    for i, text in enumerate(seg.segments):
        print(f"{seg.structure.union_of[i]:>5}  {text[:32]:<32} {phi[i].item():>12.4f} {phi_sampled[i].item():>15.4f}")
    gap = values[plan.full_index] - values[plan.empty_index]
    print(f"\nsum of Owen values {phi.sum().item():.4f} = v(N) - v(empty) = {gap.item():.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ospo-fast", description="Owen-Shapley Policy Optimization, fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="attribute one response's reward to its segments with Owen values")
    p.add_argument("text", nargs="?", default=DEMO_TEXT, help="the response (default: a worked example)")
    p.add_argument("--query", default=DEMO_QUERY, help="the query whose words the demo reward counts")
    p.add_argument("--permutations", type=int, default=64, help="orders for the sampled estimate")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
