"""Owen engine throughput: plan building and aggregation, every backend beside the dense matmul.

    python bench/bench_owen.py [--games 4096] [--json bench/results/owen.json]

Workloads (a batch of games sharing one structure, as in a GRPO batch of short responses):
  exact   3 unions x 4 players  (176 coalitions per game)
  sampled 4 unions x 4 players, K=64 Owen-consistent orders (antithetic)
  mixed   every game its own random structure (1-3 sentences of 1-4 phrases), as in a real GRPO batch
Rows: plan building (cold: caches cleared; warm: cached), PlanBatch building for mixed structures, an
attribution call's plans for 64 responses (fresh draws, batched and one by one; a seed's cached plans), and
aggregation with each backend available and with ``values @ W`` (the dense Owen weight matrix) — the
obvious alternative; for mixed structures, one dense matmul per distinct plan. Ratios are measured side by
side in this one process. Where the bundled MiniLM reward is installed, the aggregation time is also set
beside the encoder time of the same coalitions (one short coalition text per value), to show its share of
an attribution step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils import benchmark

import ospo_fast as of
from ospo_fast import _extension
from ospo_fast import plans as plans_module


def median_seconds(fn, min_run_time: float = 0.5) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def cuda_synced(fn):
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def backends_to_time(device: torch.device) -> list[str]:
    names = ["torch"]
    if device.type == "cpu" and _extension.has_cpp():
        names.append("cpp")
    if device.type == "cuda" and _extension.has_cuda_kernels():
        names.append("cuda")
    if device.type == "cuda" and _extension.has_triton():
        names.append("triton")  # the CPU interpreter is for tests, not timings
    return names


def interleaved_medians(fns: dict, min_run_time: float = 1.0) -> dict:
    """Median seconds per call of each function, timed in alternation (a, b, c, b, c, a, c, a, b, ...): every
    provider sees the same machine load, so their ratio holds on a shared, noisy machine. The order rotates
    each round, because a call right after another provider's pays for the state it leaves (here, about
    8 us after MKL's matmul at 4096 games)."""
    for fn in fns.values():
        fn()
    per_block = {name: max(1, int(2e-3 / median_seconds(fn, 0.05))) for name, fn in fns.items()}  # ~2 ms blocks
    samples = {name: [] for name in fns}
    names = list(fns)
    deadline = time.perf_counter() + min_run_time * len(fns)
    rounds = 0
    while time.perf_counter() < deadline or rounds < 10 * len(names):
        shift = rounds % len(names)
        rounds += 1
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(per_block[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / per_block[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_workload(name, plan, games, device, dtype, rows):
    values = torch.randn(games, plan.num_coalitions, device=device, dtype=dtype)
    W = plan.weight_matrix(dtype).to(device)
    base = dict(workload=name, step="aggregate", device=device.type, dtype=str(dtype).replace("torch.", ""),
                games=games, coalitions=plan.num_coalitions)
    reference = of.owen_from_values(plan, values.double(), backend="torch")
    fns = {"dense values @ W": cuda_synced(lambda: values @ W)}
    errors = {}
    for backend in backends_to_time(device):
        if backend == "torch":  # the float64 reference: slow by design, timed alone below
            continue
        out = of.owen_from_values(plan, values, backend=backend)  # warm-up: builds the cached PlanBatch
        errors[f"ospo_fast {backend}"] = (out.double() - reference).abs().max().item()
        fns[f"ospo_fast {backend}"] = cuda_synced(lambda b=backend: of.owen_from_values(plan, values, backend=b))
    if "ospo_fast cpp" in fns or "ospo_fast cuda" in fns:
        # The registered operator alone, on arguments built once: what owen_from_values adds is Python.
        batch = of.PlanBatch.repeat(plan, games)
        args = (values.reshape(-1), *batch.kernel_args(values.device, values.dtype), batch.num_rows)
        fns["ospo_fast op (bare torch.ops call)"] = cuda_synced(lambda: torch.ops.ospo_fast.owen_aggregate(*args))
    times = interleaved_medians(fns)
    dense = times["dense values @ W"]
    for provider, seconds in times.items():
        rows.append(dict(base, provider=provider, seconds=seconds, vs_dense=dense / seconds,
                         **({"max_abs_err": errors[provider]} if provider in errors else {})))
    seconds = median_seconds(cuda_synced(lambda: of.owen_from_values(plan, values, backend="torch")))
    rows.append(dict(base, provider="ospo_fast torch", seconds=seconds, vs_dense=dense / seconds))


def bench_mixed(plans, device, dtype, rows):
    """A GRPO batch where every response has its own segmentation: one PlanBatch, one launch, against the
    obvious dense alternative (group the games by plan, one ``values @ W`` per group)."""
    batch = of.PlanBatch(plans)
    values = torch.randn(batch.num_values, device=device, dtype=dtype)
    groups: dict[int, list[int]] = {}
    for g, plan in enumerate(plans):
        groups.setdefault(id(plan), []).append(g)
    offsets = torch.as_tensor(batch.value_offsets[:-1], device=device)
    dense_groups = []
    for members in groups.values():
        plan = plans[members[0]]
        index = offsets[members][:, None] + torch.arange(plan.num_coalitions, device=device)
        dense_groups.append((index, plan.weight_matrix(dtype).to(device)))

    def dense():
        return [values[index] @ W for index, W in dense_groups]

    name = f"mixed ({len(groups)} plans)"
    base = dict(workload=name, step="aggregate", device=device.type, dtype=str(dtype).replace("torch.", ""),
                games=len(plans), coalitions=batch.num_values // len(plans))
    fns = {"dense per-plan matmuls": cuda_synced(dense)}
    for backend in backends_to_time(device):
        if backend == "torch":
            continue  # the reference is timed on the uniform workloads; it is slow by design
        fns[f"ospo_fast {backend}"] = cuda_synced(lambda b=backend: of.owen_from_values(batch, values, backend=b))
    times = interleaved_medians(fns)
    for provider, seconds in times.items():
        rows.append(dict(base, provider=provider, seconds=seconds, vs_dense=times["dense per-plan matmuls"] / seconds))


def mixed_plans(games: int, seed: int = 0) -> list:
    """Plans of random short responses: 1-3 sentences of 1-4 phrases, exact when <= 64 coalitions."""
    g = torch.Generator().manual_seed(seed)
    plans = []
    for _ in range(games):
        sizes = torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        plans.append(of.make_plan(of.CoalitionStructure.from_sizes(sizes), "auto", budget=64))
    return plans


def bench_plans(rows, games):
    def cold(build):
        def run():
            plans_module.plan_cache.clear()
            return build()

        return run

    s_exact = of.CoalitionStructure.from_sizes([4, 4, 4])
    s_sampled = of.CoalitionStructure.from_sizes([4, 4, 4, 4])
    for label, build in [
        ("exact 3x4", lambda: of.exact_plan(s_exact)),
        ("sampled 4x4 K=64", lambda: of.sampled_plan(s_sampled, 64, seed=0)),
    ]:
        rows.append(dict(workload=label, step="plan (cold)", provider="ospo_fast", device="cpu",
                         seconds=median_seconds(cold(build), 0.3)))
        build()
        rows.append(dict(workload=label, step="plan (cached)", provider="ospo_fast", device="cpu",
                         seconds=median_seconds(build, 0.2)))
    plans = mixed_plans(games)
    rows.append(dict(workload=f"{games} mixed structures", step="PlanBatch", provider="ospo_fast", device="cpu",
                     games=games, seconds=median_seconds(lambda: of.PlanBatch(plans), 0.3)))
    # An attribution call's plan stage: 64 responses of 8-16 players in 2-4 unions, budget 64 (sampled).
    # Training draws fresh orders every call (make_plans with the attributor's generator); a fixed seed's
    # cached plans are shown for scale (their estimates repeat the same error every step).
    structures, rng = response_structures(64), np.random.default_rng(0)
    for step, build in [
        ("seed, cached", lambda: [of.make_plan(s, "auto", budget=64) for s in structures]),
        ("fresh, batched", lambda: plans_module.make_plans(structures, "auto", budget=64, rng=rng)),
        ("fresh, 1 by 1", lambda: [of.make_plan(s, "auto", budget=64, rng=rng) for s in structures]),
    ]:
        build()
        rows.append(dict(workload="64 resp. 8-16 players", step=step, provider="ospo_fast", device="cpu", games=64,
                         seconds=median_seconds(build, 0.3)))


def response_structures(count: int, seed: int = 0) -> list:
    """Structures of ``count`` responses: 8-16 players in 2-4 unions (the default Segmenter's
    ``max_players=16``), sampled under a budget of 64 coalitions."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        m, n = int(g.integers(2, 5)), int(g.integers(8, 17))
        cuts = np.sort(g.choice(np.arange(1, n), m - 1, replace=False))
        out.append(of.CoalitionStructure.from_sizes(np.diff(np.concatenate([[0], cuts, [n]])).tolist()))
    return out


def encoder_seconds_per_coalition() -> float | None:
    """Seconds MiniLM takes per short coalition text on this machine (batched), or None when not installed."""
    try:
        from ospo_fast.rewards.encoder import SentenceEncoder
    except ImportError:
        return None
    try:
        encoder = SentenceEncoder()
    except (ImportError, OSError):
        return None
    texts = [f"soft cotton tee for summer number {i} navy blue slim fit" for i in range(256)]
    encoder.encode(texts[:32])
    start = time.perf_counter()
    encoder.encode(texts)
    return (time.perf_counter() - start) / len(texts)


def print_table(rows):
    print(f"{'workload':<24} {'step':<14} {'provider':<36} {'device':<6} {'dtype':<8} {'median':>11} {'vs dense':>9}")
    for r in rows:
        vs = f"{r['vs_dense']:.2f}x" if "vs_dense" in r else ""
        print(f"{r['workload']:<24} {r['step']:<14} {r['provider']:<36} {r['device']:<6} {r.get('dtype', ''):<8} "
              f"{r['seconds'] * 1e3:>9.3f}ms {vs:>9}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", type=int, default=4096)
    parser.add_argument("--json", default="bench/results/owen.json")
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder-share row")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    bench_plans(rows, args.games)
    workloads = [
        ("exact 3x4", of.exact_plan(of.CoalitionStructure.from_sizes([4, 4, 4]))),
        ("sampled 4x4 K=64", of.sampled_plan(of.CoalitionStructure.from_sizes([4, 4, 4, 4]), 64, seed=0)),
    ]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            for name, plan in workloads:
                bench_workload(name, plan, args.games, device, dtype, rows)
            bench_mixed(mixed_plans(args.games), device, dtype, rows)
    print_table(rows)

    summary = {}
    per_coalition = None if args.no_encoder else encoder_seconds_per_coalition()
    if per_coalition is not None:
        plan = workloads[0][1]
        agg = min(r["seconds"] for r in rows if r["workload"] == "exact 3x4" and r["provider"].startswith("ospo_fast")
                  and r.get("device") == "cpu" and r.get("dtype") == "float32")
        encode = per_coalition * plan.num_coalitions * args.games
        summary = dict(encoder_seconds_per_coalition=per_coalition,
                       aggregation_share_of_attribution=agg / (agg + encode))
        print(f"\nMiniLM: {per_coalition * 1e3:.3f} ms per coalition text here; evaluating {args.games} games x "
              f"{plan.num_coalitions} coalitions would take {encode:.1f} s, aggregation {agg * 1e3:.2f} ms "
              f"= {100 * summary['aggregation_share_of_attribution']:.1e}% of the step.")

    meta = dict(machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(), python=sys.version.split()[0],
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
