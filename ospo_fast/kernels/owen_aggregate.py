"""Triton kernel for Owen aggregation (the contract is stated in csrc/owen_aggregate.h).

Each program takes ``BLOCK_ROWS`` output rows (players), finds each row's game by a binary search over
``row_offsets``, and walks the rows' term lists side by side for ``max_terms`` steps, masking rows whose
list is shorter. Rows of one game sit next to each other and share their values, so a program's
gathers stay within a few cache lines.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _owen_aggregate_kernel(
    values,
    value_offsets,
    row_offsets,
    game_ptr_base,
    player_ptr,
    term_plus,
    term_minus,
    term_weight,
    out,
    num_rows,
    num_games,
    max_terms,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < num_rows
    # game = the last g with row_offsets[g] <= row
    lo = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
    hi = tl.zeros([BLOCK_ROWS], dtype=tl.int64) + num_games - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(row_offsets + mid, mask=live, other=0) <= rows
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    game = lo
    base = tl.load(value_offsets + game, mask=live, other=0)
    ptr = tl.load(game_ptr_base + game, mask=live, other=0) + rows - tl.load(row_offsets + game, mask=live, other=0)
    begin = tl.load(player_ptr + ptr, mask=live, other=0)
    end = tl.load(player_ptr + ptr + 1, mask=live, other=0)
    acc = tl.zeros([BLOCK_ROWS], dtype=out.dtype.element_ty)
    for step in range(0, max_terms):
        t = begin + step
        take = live & (t < end)
        plus = tl.load(term_plus + t, mask=take, other=0)
        minus = tl.load(term_minus + t, mask=take, other=0)
        w = tl.load(term_weight + t, mask=take, other=0.0)
        with_player = tl.load(values + base + plus, mask=take, other=0.0)
        without_player = tl.load(values + base + minus, mask=take, other=0.0)
        acc += w * (with_player - without_player)
    tl.store(out + rows, acc, mask=live)


def owen_aggregate(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    game_ptr_base: torch.Tensor,
    player_ptr: torch.Tensor,
    term_plus: torch.Tensor,
    term_minus: torch.Tensor,
    term_weight: torch.Tensor,
    num_rows: int,
    max_terms: int,
    block_rows: int = 128,
) -> torch.Tensor:
    """Triton launch of the aggregation; arguments as ``ospo_fast.owen_aggregate_reference``.

    ``max_terms``: the longest row's term count, known on the host, so no device sync is needed.
    """
    out = torch.empty(num_rows, dtype=values.dtype, device=values.device)
    num_games = game_ptr_base.numel()
    if num_rows:
        grid = (triton.cdiv(num_rows, block_rows),)
        _owen_aggregate_kernel[grid](
            values, value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, term_weight, out,
            num_rows, num_games, max_terms,
            SEARCH_STEPS=max(1, int(num_games).bit_length()), BLOCK_ROWS=block_rows,
        )
    return out
