"""Triton kernel for Owen aggregation (the same contract as csrc/owen_aggregate.h).

Each program takes ``BLOCK_ROWS`` output rows and walks their term lists side by side for
``max_terms`` steps, masking rows whose list is shorter. Rows of one game sit next to each other and
share their values row, so the gathers of a program stay within a few cache lines.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _owen_aggregate_kernel(
    values,
    row_value_base,
    row_term_begin,
    row_term_end,
    term_plus,
    term_minus,
    term_weight,
    out,
    num_rows,
    max_terms,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < num_rows
    base = tl.load(row_value_base + rows, mask=live, other=0)
    begin = tl.load(row_term_begin + rows, mask=live, other=0)
    end = tl.load(row_term_end + rows, mask=live, other=0)
    acc = tl.zeros([BLOCK_ROWS], dtype=out.dtype.element_ty)
    for step in range(0, max_terms):
        t = begin + step
        take = live & (t < end)
        plus = tl.load(term_plus + t, mask=take, other=0)
        minus = tl.load(term_minus + t, mask=take, other=0)
        w = tl.load(term_weight + t, mask=take, other=0.0)
        gain = tl.load(values + base + plus, mask=take, other=0.0) - tl.load(values + base + minus, mask=take, other=0.0)
        acc += w * gain
    tl.store(out + rows, acc, mask=live)


def owen_aggregate(
    values: torch.Tensor,
    row_value_base: torch.Tensor,
    row_term_begin: torch.Tensor,
    row_term_end: torch.Tensor,
    term_plus: torch.Tensor,
    term_minus: torch.Tensor,
    term_weight: torch.Tensor,
    max_terms: int,
    block_rows: int = 128,
) -> torch.Tensor:
    """``out[r] = sum_t weight[t] * (values[base[r] + plus[t]] - values[base[r] + minus[t]])``.

    values, term_weight: float32/float64 ``[V]``, ``[T]``; row tensors int64 ``[R]``; term tensors int64 ``[T]``.
    ``max_terms``: the longest row's term count (a host-side number, so no device sync is needed).
    """
    num_rows = row_value_base.numel()
    out = torch.empty(num_rows, dtype=values.dtype, device=values.device)
    if num_rows:
        grid = (triton.cdiv(num_rows, block_rows),)
        _owen_aggregate_kernel[grid](
            values, row_value_base, row_term_begin, row_term_end, term_plus, term_minus, term_weight, out,
            num_rows, max_terms, BLOCK_ROWS=block_rows,
        )
    return out
