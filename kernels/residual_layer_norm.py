"""Triton kernel for the post-LN residual step of a BERT layer in reduced precision, in one pass per row:

    stream <- LayerNorm(stream + delta)      (float32, in place; ``delta`` optional)
    low    <- stream, cast to bf16/fp16      (the next matmul's input)

The packed forward keeps the residual stream in float32, as autocast does, and feeds its matmuls a
bf16/fp16 copy. In torch that step is an add, a layer_norm and a cast: three kernels and three passes
over the stream, twice per layer. One program per row; the row is held in registers.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _residual_layer_norm_kernel(
    stream,
    delta,
    weight,
    bias,
    low,
    n_cols,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    at = row * n_cols + cols
    x = tl.load(stream + at, mask=live, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(delta + at, mask=live, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(live, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    gamma = tl.load(weight + cols, mask=live, other=0.0).to(tl.float32)
    beta = tl.load(bias + cols, mask=live, other=0.0).to(tl.float32)
    y = centred * rstd * gamma + beta
    tl.store(stream + at, y, mask=live)
    tl.store(low + at, y.to(low.dtype.element_ty), mask=live)


def residual_layer_norm_(
    stream: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    low: torch.Tensor,
) -> torch.Tensor:
    """``stream`` (float32 ``[rows, cols]``, contiguous) becomes ``LayerNorm(stream + delta)`` in place, and
    ``low`` (``[rows, cols]``, bf16 or fp16) its cast; ``delta``: ``[rows, cols]`` of any float dtype, or
    None. Returns ``stream``. Callers check shapes and devices (see ``ospo_fast.evaluate``)."""
    rows, cols = stream.shape
    block = triton.next_power_of_2(cols)
    if rows:
        _residual_layer_norm_kernel[(rows,)](
            stream, delta if delta is not None else stream, weight, bias, low, cols, eps,
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),  # Triton's LayerNorm tutorial
        )
    return stream
