"""Triton kernel: sentence embeddings of packed sequences, pooled and L2-normalised in one pass.

One program per sequence: it sums its own rows of the packed hidden states (or takes its first, for CLS
pooling), divides by its length and normalises, writing straight into the caller's output rows. No
atomics, so the result is the same on every run; one kernel instead of torch's cumsum, index_add_,
division and normalisation.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_sequences_kernel(
    hidden,
    cu_seqlens,
    out,
    n_cols,
    MEAN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens + s).to(tl.int64)
    end = tl.load(cu_seqlens + s + 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_COLS)
    live_cols = cols < n_cols
    if MEAN:
        acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for first in range(start, end, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            live = (rows < end)[:, None] & live_cols[None, :]
            acc += tl.load(hidden + rows[:, None] * n_cols + cols[None, :], mask=live, other=0.0).to(tl.float32)
        pooled = tl.sum(acc, axis=0) / (end - start).to(tl.float32)
    else:
        pooled = tl.load(hidden + start * n_cols + cols, mask=live_cols, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(pooled * pooled, axis=0))
    tl.store(out + s * n_cols + cols, pooled / tl.maximum(norm, 1e-12), mask=live_cols)


def pool_sequences(hidden: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor, mean: bool) -> torch.Tensor:
    """``out[s]`` (float32 ``[S, D]``, rows contiguous) = the L2-normalised mean (``mean``) or first row of
    sequence s of ``hidden`` (``[total, D]``, contiguous, any float dtype); ``cu_seqlens``: int ``[S + 1]``
    on the same device. Returns ``out``. Callers check shapes (see ``ospo_fast.evaluate.pool_packed``)."""
    num_sequences, cols = out.shape
    if num_sequences:
        _pool_sequences_kernel[(num_sequences,)](
            hidden, cu_seqlens, out, cols, MEAN=mean, BLOCK_ROWS=8, BLOCK_COLS=triton.next_power_of_2(cols),
        )
    return out
