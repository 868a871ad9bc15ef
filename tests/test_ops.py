"""The registered operator: built where CI expects it, and sound under torch.library.opcheck."""

from __future__ import annotations

import os

import pytest
import torch

import ospo_fast as of
from ospo_fast import _extension

needs_cpp = pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")


def test_extension_is_built_when_required():
    # CI sets OSPO_FAST_REQUIRE_EXTENSION=1 so that a broken build fails instead of falling back to torch.
    if os.environ.get("OSPO_FAST_REQUIRE_EXTENSION") == "1":
        assert _extension.has_cpp(), _extension.extension_error()
    assert of.resolve_backend("auto", torch.device("cpu")) == ("cpp" if _extension.has_cpp() else "torch")


def _op_args(device: str, dtype: torch.dtype):
    plan = of.sampled_plan(of.CoalitionStructure([[0, 1, 2], [3, 4]]), 5, seed=0)
    batch = of.PlanBatch([plan, of.exact_plan(plan.structure), plan])
    values = torch.randn(batch.num_values, dtype=dtype, device=device)
    return (values, *batch.kernel_args(torch.device(device), dtype), batch.num_rows)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_owen_aggregate_cpu(dtype):
    torch.library.opcheck(torch.ops.ospo_fast.owen_aggregate.default, _op_args("cpu", dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_owen_aggregate_cuda(dtype):
    if not _extension.has_cuda_kernels():
        pytest.fail("a CUDA device is present but ospo_fast._C has no CUDA kernels: rebuild with nvcc")
    torch.library.opcheck(torch.ops.ospo_fast.owen_aggregate.default, _op_args("cuda", dtype))


@needs_cpp
def test_op_works_under_torch_compile():
    args = _op_args("cpu", torch.float64)
    compiled = torch.compile(torch.ops.ospo_fast.owen_aggregate.default, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), of.owen_aggregate_reference(*args))
