"""Triton kernels for the LayerNorm steps of a BERT forward in reduced precision, each one pass per row:

    residual_layer_norm_:  stream <- LayerNorm(stream + delta)   (float32, in place)
    embed_layer_norm:      stream <- LayerNorm(word[id] + position[pos] + token_type)
    and both:              low    <- stream, cast to bf16/fp16   (the next matmul's input)

The packed forward keeps the residual stream in float32, as autocast does, and feeds its matmuls a
bf16/fp16 copy. In torch the residual step is an add, a layer_norm and a cast: three kernels and three
passes over the stream, twice per layer; the embeddings are two gathers and two adds more. One program
per row; the row is held in registers.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _normalise_row(x, live, weight, bias, cols, n_cols, eps, stream, low, at):
    """LayerNorm of one float32 row held in registers; stores it to ``stream`` and its cast to ``low``."""
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(live, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    gamma = tl.load(weight + cols, mask=live, other=0.0).to(tl.float32)
    beta = tl.load(bias + cols, mask=live, other=0.0).to(tl.float32)
    y = centred * rstd * gamma + beta
    tl.store(stream + at, y, mask=live)
    tl.store(low + at, y.to(low.dtype.element_ty), mask=live)


@triton.jit
def _residual_layer_norm_kernel(
    stream,
    delta,
    weight,
    bias,
    low,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    at = row * n_cols + cols
    x = tl.load(stream + at, mask=live, other=0.0).to(tl.float32)
    x += tl.load(delta + at, mask=live, other=0.0).to(tl.float32)
    _normalise_row(x, live, weight, bias, cols, n_cols, eps, stream, low, at)


@triton.jit
def _embed_layer_norm_kernel(
    ids,
    positions,
    word,
    position,
    token_type,
    weight,
    bias,
    stream,
    low,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    token = tl.load(ids + row).to(tl.int64)
    place = tl.load(positions + row).to(tl.int64)
    x = tl.load(word + token * n_cols + cols, mask=live, other=0.0).to(tl.float32)
    x += tl.load(position + place * n_cols + cols, mask=live, other=0.0).to(tl.float32)
    x += tl.load(token_type + cols, mask=live, other=0.0).to(tl.float32)
    _normalise_row(x, live, weight, bias, cols, n_cols, eps, stream, low, row * n_cols + cols)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)  # as Triton's LayerNorm tutorial


def residual_layer_norm_(
    stream: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    low: torch.Tensor,
) -> torch.Tensor:
    """``stream`` (float32 ``[rows, cols]``, contiguous) becomes ``LayerNorm(stream + delta)`` in place, and
    ``low`` (``[rows, cols]``, bf16 or fp16) its cast; ``delta``: ``[rows, cols]`` of any float dtype.
    Returns ``stream``. Callers check shapes and devices (see ``ospo_fast.evaluate``)."""
    rows, cols = stream.shape
    block = triton.next_power_of_2(cols)
    if rows:
        _residual_layer_norm_kernel[(rows,)](
            stream, delta, weight, bias, low, cols, eps, BLOCK=block, num_warps=_num_warps(block),
        )
    return stream


def embed_layer_norm(
    ids: torch.Tensor,
    positions: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    low_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding step: float32 ``LayerNorm(word[ids] + position[positions] + token_type)`` ``[N, D]`` and
    its cast to ``low_dtype``. ``ids``, ``positions``: int ``[N]``; ``word``, ``position``: contiguous
    tables ``[*, D]``; ``token_type``: ``[D]``. Callers check shapes and ranges."""
    rows, cols = ids.shape[0], word.shape[1]
    stream = torch.empty(rows, cols, dtype=torch.float32, device=ids.device)
    low = torch.empty(rows, cols, dtype=low_dtype, device=ids.device)
    block = triton.next_power_of_2(cols)
    if rows:
        _embed_layer_norm_kernel[(rows,)](
            ids, positions, word, position, token_type, weight, bias, stream, low, cols, eps,
            BLOCK=block, num_warps=_num_warps(block),
        )
    return stream, low
