"""Shared setup of the kernel micro-benchmarks (pytest-benchmark); see bench/micro/README.md.

Every benchmark module calls ``pytest.importorskip("pytest_benchmark")`` itself, so without the plugin the
folder is skipped cleanly; nothing here imports it.

Timing: each row is timed with ``benchmark.pedantic``, calibrated from the plugin's own options, so the
whole folder stays short on a small machine:

* ``--benchmark-max-time`` (default 1.0 s): the time budget of one row;
* ``--benchmark-min-rounds`` (default 5): rounds at least, whatever the budget (at most 200);
* one warm-up call (after the test's correctness check) before the timed rounds; each round runs enough
  iterations to last about 2 ms, so microsecond kernels are not timer noise;
* ``--benchmark-disable`` and Triton rows on the CPU (the interpreter, ``TRITON_INTERPRET=1``): a single
  call, untimed in any useful sense: those runs check correctness only.

Each row records ``extra_info["impl"]`` (``reference`` or the fast path's name); a short table of
``fast / reference`` median ratios per group is printed after pytest-benchmark's own table.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import pytest
import torch

from ospo_fast import _extension

ROUND_SECONDS = 2e-3  # iterations per round: enough for ~2 ms, so timer resolution does not matter
MAX_ROUNDS = 200


def skip_reason(device: str, impl: str) -> str | None:
    """Why row ``impl`` (``reference``, ``cpp``, ``cuda``, ``triton`` or a torch variant) cannot run on
    ``device`` here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if impl == "cpp" and not _extension.has_cpp():
        return f"ospo_fast._C is not built ({_extension.extension_error()})"
    if impl == "cuda" and not _extension.has_cuda_kernels():
        return "ospo_fast._C has no CUDA kernels (rebuild with a CUDA torch and nvcc)"
    if impl == "triton":
        if not _extension.has_triton():
            return "triton is not installed (pip install triton)"
        if device == "cpu" and not _extension.triton_interpreted():
            return (
                "triton runs on CPU tensors only in its interpreter: rerun with TRITON_INTERPRET=1 "
                "(a correctness check; interpreter times are not kernel times)"
            )
    return None


@pytest.fixture
def require():
    """``require(device, impl)``: skip the test, with the reason, when that row cannot run here."""

    def check(device: str, impl: str) -> None:
        reason = skip_reason(device, impl)
        if reason:
            pytest.skip(reason)

    return check


@pytest.fixture
def timed(benchmark, request):
    """``timed(fn, group=..., impl=..., device=...)``: time ``fn()`` (already checked by the caller) as one
    row of ``group``; CUDA work is synchronised at the end of every call."""

    def run(fn, *, group: str, impl: str, device: str = "cpu"):
        interpreted = impl == "triton" and device == "cpu"
        benchmark.group = group
        benchmark.extra_info.update(
            impl=impl, device=device, torch_threads=torch.get_num_threads(), triton_interpreter=interpreted,
        )
        sync = torch.cuda.synchronize if device == "cuda" else None

        def call():
            out = fn()
            if sync is not None:
                sync()
            return out

        if benchmark.disabled or interpreted:
            # --benchmark-disable: one plain call. The interpreter: its time says nothing about the kernel
            # and one call takes seconds; the caller's correctness check already warmed it up.
            return benchmark.pedantic(call, rounds=1, iterations=1)
        call()  # warm-up: caches, lazy compilation, allocator
        start = time.perf_counter()
        call()
        once = max(time.perf_counter() - start, 1e-7)
        options = request.config.option
        budget = float(getattr(options, "benchmark_max_time", 1.0) or 1.0)
        min_rounds = int(getattr(options, "benchmark_min_rounds", 5) or 1)
        iterations = max(1, math.ceil(ROUND_SECONDS / once))
        rounds = min(MAX_ROUNDS, max(min_rounds, int(budget / (once * iterations))))
        return benchmark.pedantic(call, rounds=rounds, iterations=iterations)

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """Median time of each fast path over its group's reference, after pytest-benchmark's table."""
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl") if bench else None
        if impl is not None:
            if bench.extra_info.get("triton_interpreter"):
                impl += " (interpreter)"
            groups[bench.group][impl] = bench.stats.median
    rows = [
        (group, impl, median, medians["reference"])
        for group, medians in groups.items()
        if "reference" in medians
        for impl, median in medians.items()
        if impl != "reference"
    ]
    if not rows:
        return
    width = max(len(group) for group, *_ in rows)
    impl_width = max(len(impl) for _, impl, *_ in rows)
    terminalreporter.write_sep("-", "fast path / reference (median)")
    terminalreporter.write_line(
        f"{'group':<{width}}  {'impl':<{impl_width}} {'median':>14} {'reference':>14} {'fast/ref':>9} {'speed-up':>9}"
    )
    for group, impl, median, reference in rows:
        ratio = (
            f"{'correctness only':>19}" if impl.endswith("(interpreter)")
            else f"{median / reference:>9.4f} {reference / median:>8.3g}x"
        )
        terminalreporter.write_line(f"{group:<{width}}  {impl:<{impl_width}} {_us(median):>14} "
                                    f"{_us(reference):>14} {ratio}")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"
