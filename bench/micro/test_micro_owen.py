"""Owen aggregation: every backend beside the float64 torch reference, on three workloads.

Workloads (float64 values, as the attribution uses them):
  exact    B games sharing the exact plan of 3 unions x 4 players (176 coalitions per game)
  single   one game of that plan, values [C]: a call's fixed cost (Python, dispatch) more than the kernel
  sampled  B games sharing a sampled plan of 4 unions x 4 players, K = 64 antithetic orders
  mixed    a PlanBatch of B games, each its own random structure (1-3 unions of 1-4 players), plans
           from make_plans(method="auto", budget=64), as in a real GRPO batch
Rows per device: ``reference`` (backend="torch"), then ``cpp`` (CPU) or ``cuda`` (GPU), and ``triton``
(GPU, or the CPU under TRITON_INTERPRET=1). All through ``owen_from_values``, so the rows differ only in
the aggregation itself.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the project's `bench` extra)")

import ospo_fast as of  # noqa: E402

WORKLOADS = {
    "exact": 1024,  # games
    "single": 1,
    "sampled": 128,
    "mixed": 512,
}
ROWS = [
    ("cpu", "reference"), ("cpu", "cpp"), ("cpu", "triton"),
    ("cuda", "reference"), ("cuda", "cuda"), ("cuda", "triton"),
]


@functools.cache
def _workload(name: str):
    """(plan or PlanBatch, float64 CPU values, a short description), fixed seeds."""
    games = WORKLOADS[name]
    g = torch.Generator().manual_seed(0)
    if name in ("exact", "single"):
        plan = of.exact_plan(of.CoalitionStructure([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]))
        shape = (plan.num_coalitions,) if name == "single" else (games, plan.num_coalitions)
        values = torch.randn(shape, dtype=torch.float64, generator=g)
        return plan, values, f"3x4 players, {plan.num_coalitions} coalitions, B={games}"
    if name == "sampled":
        structure = of.CoalitionStructure([list(range(4 * u, 4 * u + 4)) for u in range(4)])
        plan = of.sampled_plan(structure, 64, seed=0)
        values = torch.randn(games, plan.num_coalitions, dtype=torch.float64, generator=g)
        return plan, values, f"4x4 players, K=64, {plan.num_coalitions} coalitions, B={games}"
    rng = np.random.default_rng(0)
    structures = []
    for _ in range(games):
        sizes = rng.integers(1, 5, size=int(rng.integers(1, 4)))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        structures.append(of.CoalitionStructure([list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]))
    batch = of.PlanBatch(of.make_plans(structures, "auto", budget=64, rng=np.random.default_rng(1)))
    values = torch.randn(batch.num_values, dtype=torch.float64, generator=g)
    return batch, values, f"random structures, {batch.num_values} values, B={games}"


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("device,impl", ROWS, ids=[f"{d}-{i}" for d, i in ROWS])
def test_owen_aggregate(timed, require, workload, device, impl):
    require(device, impl)
    plan, values, what = _workload(workload)
    values = values.to(device)
    backend = "torch" if impl == "reference" else impl
    expected = of.owen_from_values(plan, values, backend="torch")
    got = of.owen_from_values(plan, values, backend=backend)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    timed(
        lambda: of.owen_from_values(plan, values, backend=backend),
        group=f"owen_aggregate[{device}] {workload}: {what}", impl=impl, device=device,
    )
