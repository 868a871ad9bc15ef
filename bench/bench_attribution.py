"""Attribution throughput with the bundled MiniLM dense-retrieval reward, side by side in one process.

    python bench/bench_attribution.py [--responses 16] [--budget 64] [--json bench/results/attribution.json]

Providers, on the same responses, candidate pool (the ESCI "iphone charger" pool, 99 products) and
number of coalitions per response:
  ospo_fast      OwenAttributor: segmentation, plans, one packed encoder forward, Owen aggregation
  loop           one coalition at a time: reward([coalition text]) per coalition (the reference code's way)
  shap           shap.PartitionExplainer over the same reward, max_evals = the coalition budget per response:
                 its first call in the process (one-time setup included), then warmed up with the reward
                 batched over each call's texts (shap's intended use) and called one text at a time
The GEMM-bound floor is the encoder's FLOPs on the kept tokens divided by a large matmul's FLOP rate
measured here (fp32 on the CPU, bf16 on CUDA); ospo_fast's share of it = floor / its time.

On CUDA (``--device cuda``) it also prints the device half of an attribution (pack, forward, pool, score,
Owen aggregation, on a layout prepared on the host) timed with CUDA events while torch's sync debug mode
raises on any host synchronisation, then where its time goes (the host's time to issue it, its kernels by
device time), then whole ``OwenAttributor`` calls (the GPU bar's measure) with ``pipeline`` 1, 2 and 4;
``bench/gpu_check.sh`` runs it at 64 responses x 64 coalitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ospo_fast as of
from ospo_fast._extension import flash_varlen
from ospo_fast.evaluate import CoalitionBatch, EncoderCoalitionEvaluator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import iphone_charger_pool  # noqa: E402  (the shipped real pool)

PHRASES = [
    "fast iphone charger", "with usb c cable", "for car", "apple mfi certified", "6 ft braided cord",
    "20w power delivery", "wall plug adapter", "for iphone 14 pro max", "magsafe compatible", "black",
    "compact travel size", "with lightning connector", "2 pack", "wireless charging pad", "for airpods",
]


def responses(n: int, seed: int = 0) -> list[str]:
    """Answers of 3 sentences of 2-4 phrases, after a short think block (as a policy writes them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = [" ".join(rng.sample(PHRASES, rng.randint(2, 4))) for _ in range(3)]
        out.append(f"<think>the user needs a charger</think><answer>{'. '.join(sentences)}</answer>")
    return out


def matmul_flops_per_second(size: int = 2048, repeats: int = 10, device="cpu", dtype=torch.float32) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def encoder_flops(model, lengths: np.ndarray) -> float:
    """Forward FLOPs of a BERT encoder on sequences of these lengths (linear layers + attention)."""
    c = model.config
    h, inner, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    tokens = float(lengths.sum())
    linear = 2 * tokens * (4 * h * h + 2 * h * inner) * layers
    attention = 2 * 2 * float((lengths.astype(np.float64) ** 2).sum()) * h * layers
    return linear + attention


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64, help="coalitions per response (method='auto')")
    parser.add_argument("--loop-responses", type=int, default=2, help="responses timed with the slow providers")
    parser.add_argument("--no-shap", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of the GPU device half")
    parser.add_argument("--json", default="bench/results/attribution.json")
    args = parser.parse_args(argv)

    texts, labels = iphone_charger_pool()
    reward = of.rewards.DenseRetrievalReward(
        items=[t[:400] for t in texts], pools=[list(range(len(texts)))],
        gains=[[of.data.esci_gain(x) for x in labels]],
        device=args.device,
    )
    batch_texts = responses(args.responses)
    owners = [0] * len(batch_texts)
    on_cuda = reward.device.type == "cuda"
    if on_cuda:  # first: the GPU bar, whatever happens below
        print_device_half(reward, batch_texts, owners, args.budget, args.repeats)
    # The default precision first (fp32 on the CPU, bf16 on CUDA); the other one second.
    dtypes = (torch.bfloat16, torch.float32) if on_cuda else (torch.float32, torch.bfloat16)
    rows = []
    for dtype in dtypes:
        attributor = of.OwenAttributor(reward, method="auto", budget=args.budget, seed=0, encoder_dtype=dtype,
                                       synchronize=True)  # wall times that include the device's work
        attributor(batch_texts[:2], owners[:2])  # warm-up
        result = attributor(batch_texts, owners)
        seconds = best_of(lambda: attributor(batch_texts, owners))
        name = "fp32" if dtype == torch.float32 else "bf16"
        label = f"ospo_fast packed {name}" + (" (default)" if dtype == dtypes[0] else " (opt-in)")
        rows.append(dict(provider=label, responses=len(batch_texts), coalitions=result.num_coalitions,
                         evaluations=result.num_evaluations, seconds=seconds,
                         coalitions_per_s=result.num_coalitions / seconds))
        if dtype == dtypes[0]:
            out, fast_seconds = result, seconds
    other_row = rows.pop()

    # The GEMM floor of exactly the sequences ospo_fast embedded.
    evaluator = EncoderCoalitionEvaluator(reward)
    seg = [a.segmentation for a in out]
    plans = [a.plan for a in out]
    cb = CoalitionBatch.build(seg, plans, owners)
    lengths = _sequence_lengths(evaluator, cb)
    rate = matmul_flops_per_second(device=reward.device, dtype=torch.bfloat16 if on_cuda else torch.float32,
                                   size=8192 if on_cuda else 2048)
    floor = encoder_flops(reward.encoder.model, lengths) / rate

    # One coalition at a time, on the first responses.
    loop_items = list(out)[: args.loop_responses]
    loop_texts = [(of.coalition_texts(a.segmentation, a.plan.masks), a.owner) for a in loop_items]
    loop_count = sum(len(t) for t, _ in loop_texts)

    def loop():
        for coalition_texts, owner in loop_texts:
            for text in coalition_texts:
                reward([text], [owner])
        if on_cuda:
            torch.cuda.synchronize()  # the time includes the device's work

    loop_seconds = best_of(loop, repeats=1)
    rows.append(dict(provider="loop (one coalition per call)", responses=len(loop_items), coalitions=loop_count,
                     evaluations=loop_count, seconds=loop_seconds, coalitions_per_s=loop_count / loop_seconds))

    if not args.no_shap:
        warmup = "usb c charger for car. 2 pack"
        rows += bench_shap(reward, loop_items, args.budget, warmup)

    rows.insert(1, other_row)
    fast_rate = rows[0]["coalitions_per_s"]
    for r in rows:
        r["ospo_fast_speedup"] = fast_rate / r["coalitions_per_s"]
    print(f"{'provider':<42} {'responses':>9} {'coalitions':>10} {'evals':>6} {'seconds':>9} {'coal/s':>8} "
          f"{'ospo_fast x':>11}")
    for r in rows:
        print(f"{r['provider']:<42} {r['responses']:>9} {r['coalitions']:>10} {r['evaluations']:>6} "
              f"{r['seconds']:>9.3f} {r['coalitions_per_s']:>8.1f} {r['ospo_fast_speedup']:>10.1f}x")
    share = floor / fast_seconds
    print(f"\nGEMM floor: {encoder_flops(reward.encoder.model, lengths) / 1e9:.2f} GFLOP on "
          f"{int(lengths.sum())} kept tokens in {len(lengths)} sequences at {rate / 1e9:.1f} GFLOP/s "
          f"({'8192^2 bf16' if on_cuda else '2048^2 fp32'} matmul here) = {floor:.4f} s; "
          f"ospo_fast {fast_seconds:.3f} s = {100 * share:.0f}% of the floor")
    print("ospo_fast x: speed-up of the default packed path (fp32 on the CPU, bf16 on CUDA) over each row")
    print("timings of one attribution (s): " + ", ".join(f"{k} {v:.4f}" for k, v in out.timings.items()))

    meta = dict(machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads())
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, gemm_floor_seconds=floor, floor_share=share,
                           matmul_flops_per_second=rate, timings=out.timings), f, indent=2)
        print(f"wrote {args.json}")


def print_device_half(reward, texts, owners, budget: int, repeats: int) -> None:
    """GPU rows: the device half of an attribution (pack, encoder forward, pool, score, NDCG, Owen
    aggregation) on a layout prepared on the host, timed with CUDA events (median of ``repeats``) while
    torch's sync debug mode raises on any stream synchronisation."""
    segmenter = of.Segmenter()
    seg = [segmenter(t) for t in texts]
    plans = [of.make_plan(sg.structure, "auto", budget=budget, seed=0) for sg in seg]
    coalitions = CoalitionBatch.build(seg, plans, owners)
    print(f"\nGPU device half ({torch.cuda.get_device_name()}), {len(seg)} responses, "
          f"{coalitions.batch.num_values} coalitions:")
    print(f"{'encoder path':<52} {'evals':>6} {'tokens':>7} {'median ms':>10} {'min ms':>8} {'host sync':>9}")
    first = None  # the default path's evaluator and layout, profiled below
    for label, kwargs, fused in (
        (f"bf16, varlen attention ({getattr(flash_varlen(), '__module__', 'none')})",
         dict(dtype=torch.bfloat16), True),
        ("the same, LayerNorm steps in torch ops (A/B)", dict(dtype=torch.bfloat16), False),
        ("bf16, SDPA per length", dict(dtype=torch.bfloat16, attention="sdpa"), True),
        ("fp32, SDPA per length", dict(dtype=torch.float32, attention="sdpa"), True),
    ):
        try:
            evaluator = EncoderCoalitionEvaluator(reward, **kwargs)
            if not fused:  # the A/B row: the Triton embedding and residual LayerNorm steps switched off
                evaluator.forward._fused_norm = lambda device: False
            layout = evaluator.layout(coalitions)
            for _ in range(3):  # warm-up: Triton compiles, cuBLAS picks kernels, the caching allocator fills
                of.owen_from_values(coalitions.batch, evaluator.values(layout))
            torch.cuda.synchronize()
            times, synced = [], "none"
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                try:
                    with syncs_raise(reward.device):
                        start.record()
                        of.owen_from_values(coalitions.batch, evaluator.values(layout))
                        end.record()
                except RuntimeError as exc:
                    synced = f"yes: {exc}"[:60]
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            tokens = int(layout.lengths.sum())
            print(f"{label:<52} {layout.num_sequences:>6} {tokens:>7} {np.median(times):>10.2f} "
                  f"{min(times):>8.2f} {synced:>9}")
            if first is None:
                first = (evaluator, layout)
        except Exception as exc:  # one failing path must not hide the others' numbers
            print(f"{label:<52} failed: {type(exc).__name__}: {str(exc)[:200]}")
    if first is not None:
        try:
            print_device_half_profile(*first, coalitions.batch, repeats)
        except Exception as exc:  # a diagnostic: it must not stop the rows below
            print(f"device half profile failed: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        print_whole_call(reward, texts, owners, budget, repeats)
    except Exception as exc:
        print(f"whole call rows failed: {type(exc).__name__}: {str(exc)[:200]}")


@contextlib.contextmanager
def syncs_raise(device: torch.device):
    """On CUDA, torch's sync debug mode set to raise on any host synchronisation inside the block."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def print_whole_call(reward, texts, owners, budget: int, repeats: int) -> None:
    """The GPU bar's own measure: a whole ``OwenAttributor`` call, host text work included, from the texts to
    Owen values on the device, with one synchronisation at its end only to stop the clock (the call itself
    runs under sync debug mode "error" until then). One row per ``pipeline`` setting: in k groups, the
    host's work on a group overlaps the GPU's work on the one before."""
    sync = torch.cuda.synchronize if reward.device.type == "cuda" else (lambda: None)
    print(f"\nwhole OwenAttributor call, {len(texts)} responses, budget {budget}, median of {repeats}:")
    print(f"{'pipeline':>8} {'ms':>8} {'min ms':>8}  host stages of the last call (ms)")
    for groups in (1, 2, 4):
        attributor = of.OwenAttributor(reward, method="auto", budget=budget, seed=0, pipeline=groups)
        for _ in range(3):
            attributor(texts, owners)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with syncs_raise(reward.device):
                out = attributor(texts, owners)
            sync()
            times.append(time.perf_counter() - start)
        stages = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in out.timings.items())
        print(f"{groups:>8} {1e3 * np.median(times):>8.2f} {1e3 * min(times):>8.2f}  {stages}")


def print_device_half_profile(evaluator, layout, batch, repeats: int, row_limit: int = 12) -> None:
    """Where the device half's time goes: the host's time to issue it (no sync: if it is close to the
    device time, the GPU waits on Python and launches, not on its kernels), then its kernels by device time."""
    device = evaluator.reward.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    issue = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        of.owen_from_values(batch, evaluator.values(layout))
        issue.append(time.perf_counter() - start)
    sync()
    print(f"host time to issue the device half: median {1e3 * np.median(issue):.2f} ms")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        of.owen_from_values(batch, evaluator.values(layout))
        sync()
    if device.type == "cuda":
        sort_by, what = "self_device_time_total", "GPU kernels"
        count = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    else:
        sort_by, what = "self_cpu_time_total", "top-level operators"
        count = sum(e.cpu_parent is None for e in prof.events())
    print(f"{what} in one device half: {count}; the top {row_limit} by {sort_by}:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=48))


def _sequence_lengths(evaluator: EncoderCoalitionEvaluator, coalitions: CoalitionBatch) -> np.ndarray:
    """Lengths of the sequences the packed forward embeds (recomputed the way the evaluator lays them out)."""
    lengths = []
    original = evaluator.forward.hidden_states

    def spy(packed):
        lengths.append(packed.lengths.copy())
        return original(packed)

    evaluator.forward.hidden_states = spy
    try:
        evaluator.embed(coalitions)
    finally:
        evaluator.forward.hidden_states = original
    return np.concatenate(lengths)


def bench_shap(reward, items, budget: int, warmup_text: str) -> list[dict]:
    """shap.PartitionExplainer on the same reward with max_evals = the coalition budget per response.

    Three rows: shap's first call in the process (it pays a one-time setup of about 3 s here), then warmed
    up, with the reward batched over each call's texts and called one text at a time."""
    try:
        import shap
    except ImportError:
        print("shap is not installed (pip install shap): its rows are left out")
        return []
    owner = items[0].owner
    calls = [0]

    def batched(texts):
        calls[0] += len(texts)
        return reward([str(t) for t in texts], [owner] * len(texts)).cpu().numpy()

    def one_at_a_time(texts):
        calls[0] += len(texts)
        return np.array([float(reward([str(t)], [owner])[0]) for t in texts])

    segmenter = of.Segmenter()
    answers = [a.text[slice(*segmenter.answer_span(a.text))] for a in items]  # shap sees only the answer
    rows = []
    for label, f, warm in (
        ("shap PartitionExplainer, first call", batched, False),
        ("shap PartitionExplainer, warm", batched, True),
        ("shap PartitionExplainer, warm, 1 text/call", one_at_a_time, True),
    ):
        explainer = shap.explainers.Partition(f, shap.maskers.Text(r"\W+"))
        if warm:
            explainer([warmup_text], max_evals=budget, silent=True)
        calls[0] = 0
        start = time.perf_counter()
        explainer(answers, max_evals=budget, silent=True)
        seconds = time.perf_counter() - start
        rows.append(dict(provider=label, responses=len(answers), coalitions=calls[0], evaluations=calls[0],
                         seconds=seconds, coalitions_per_s=calls[0] / seconds))
    return rows


if __name__ == "__main__":
    main()
