"""The packed forward's row kernels against their torch definitions: the C++ varlen attention, row LayerNorm
and bias-GELU (with opcheck), and the Triton residual and embedding LayerNorms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from ospo_fast import _extension


def _attention_reference(q, k, v, lengths):
    """Per-sequence float64 softmax attention: the plain definition."""
    out, start = torch.empty(q.shape, dtype=torch.float64), 0
    for length in lengths:
        qs, ks, vs = (x[start : start + length].transpose(0, 1).double() for x in (q, k, v))
        p = torch.softmax(qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        out[start : start + length] = (p @ vs).transpose(0, 1)
        start += length
    return out


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_varlen_attention_kernel_matches_softmax_attention(seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    heads = [1, 3, 12, 2][seed]
    head_dim = [8, 24, 32, 48][seed]  # 8, 24 and 48 take the kernel's tail path (not a multiple of 16)
    lengths = [1, 15, 16, 17, 33] + torch.randint(1, 70, (int(torch.randint(1, 9, (1,), generator=g)),),
                                                  generator=g).tolist()
    total = sum(lengths)
    # q, k and v as strided views into one fused activation, as the packed forward passes them.
    qkv = 3 * torch.randn(total, 3, heads, head_dim, generator=g)
    q, k, v = qkv.unbind(1)
    bias = torch.randn(3, heads, head_dim, generator=g) if with_bias else None
    cu_seqlens = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    out = torch.full((total, heads, head_dim), float("nan"))
    torch.ops.ospo_fast.varlen_attention(
        q, k, v, cu_seqlens, max(lengths), head_dim**-0.5, out, None if bias is None else bias.reshape(-1)
    )
    if bias is not None:  # the reference sees q, k and v with the bias added
        q, k, v = (x + b for x, b in zip((q, k, v), bias))
    reference = _attention_reference(q, k, v, lengths)
    # As accurate as PyTorch's own float32 attention on the same inputs (large logits cost both some bits).
    sdpa, start = torch.empty_like(out), 0
    for length in lengths:
        sdpa[start : start + length] = torch.nn.functional.scaled_dot_product_attention(
            *(x[start : start + length].transpose(0, 1) for x in (q, k, v))
        ).transpose(0, 1)
        start += length
    sdpa_error = (sdpa.double() - reference).abs().max().item()
    assert (out.double() - reference).abs().max().item() <= 2 * sdpa_error + 1e-6
    assert_close(out.double(), reference, rtol=1e-4, atol=1e-4, what="varlen attention")


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_varlen_attention():
    qkv = torch.randn(20, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    cu_seqlens = torch.tensor([0, 3, 4, 20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.ospo_fast.varlen_attention.default,
                          (q, k, v, cu_seqlens, 16, 0.25, torch.empty(20, 2, 16)))
    torch.library.opcheck(
        torch.ops.ospo_fast.varlen_attention.default,
        (q, k, v, cu_seqlens, 16, 0.25, torch.empty(20, 2, 16), torch.randn(96)),
    )


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("cols", [1, 15, 16, 37, 384])
def test_layer_norm_rows_kernel_matches_layer_norm(cols):
    g = torch.Generator().manual_seed(cols)
    x = 3 * torch.randn(203, cols, generator=g) + 5  # an offset mean tests the two-pass variance
    weight, bias = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    out = torch.full_like(x, float("nan"))
    torch.ops.ospo_fast.layer_norm_rows(x, weight, bias, 1e-12, out)
    reference = torch.nn.functional.layer_norm(x.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(x, (cols,), weight, bias, 1e-12)  # as accurate as ATen's float32
    assert (out.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("cols", [1, 15, 16, 37, 1536])
def test_bias_gelu_kernel_matches_gelu_of_the_sum(cols):
    g = torch.Generator().manual_seed(cols)
    x = 4 * torch.randn(211, cols, generator=g)
    x[0, 0], x[-1, -1] = 30.0, -30.0  # past erf's clamp: gelu(x) = x and 0
    bias = torch.randn(cols, generator=g)
    out = x.clone()
    torch.ops.ospo_fast.bias_gelu_(out, bias)
    reference = torch.nn.functional.gelu((x + bias).double())
    aten = torch.nn.functional.gelu(x + bias)
    assert (out.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_bias_gelu():
    torch.library.opcheck(torch.ops.ospo_fast.bias_gelu_.default, (torch.randn(7, 24), torch.randn(24)))


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_layer_norm_rows():
    x = torch.randn(7, 24)
    torch.library.opcheck(torch.ops.ospo_fast.layer_norm_rows.default,
                          (x, torch.randn(24), torch.randn(24), 1e-5, torch.empty(7, 24)))


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 5, 37, 384])
def test_triton_residual_layer_norm_matches_add_layer_norm_cast(cols, low_dtype):
    """The fused residual step (add, LayerNorm, cast) against its three torch ops: the float32 stream as
    accurate as ATen's LayerNorm against float64, the low copy the cast of the kernel's stream (on CUDA
    exactly, rounded to nearest)."""
    from ospo_fast.kernels.residual_layer_norm import residual_layer_norm_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(cols)
    rows = 67
    stream = (3 * torch.randn(rows, cols, generator=g) + 5).to(device)  # an offset mean tests the variance
    delta = torch.randn(rows, cols, generator=g).to(device, low_dtype)
    weight, bias = torch.randn(cols, generator=g).to(device), torch.randn(cols, generator=g).to(device)
    summed = stream + delta
    reference = torch.nn.functional.layer_norm(summed.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(summed, (cols,), weight, bias, 1e-12)
    low = torch.full((rows, cols), float("nan"), dtype=low_dtype, device=device)
    out = residual_layer_norm_(stream, delta, weight, bias, 1e-12, low)
    assert out is stream
    assert (stream.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6
    if stream.is_cuda:
        assert torch.equal(low, stream.to(low_dtype))
    else:  # the interpreter truncates float casts instead of rounding them: within one unit in the last place
        assert ((low.float() - stream).abs() <= torch.finfo(low_dtype).eps * stream.abs()).all()


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("cols", [1, 37, 384])
def test_triton_embedding_layer_norm_matches_gathers_add_layer_norm(cols):
    from ospo_fast.kernels.residual_layer_norm import embed_layer_norm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(cols)
    word, position = torch.randn(50, cols, generator=g).to(device), torch.randn(20, cols, generator=g).to(device)
    token_type, weight, bias = (torch.randn(cols, generator=g).to(device) for _ in range(3))
    ids, positions = (torch.randint(0, 50, (71,), generator=g).to(device),
                      torch.randint(0, 20, (71,), generator=g).to(device))
    summed = word[ids] + position[positions] + token_type
    reference = torch.nn.functional.layer_norm(summed.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(summed, (cols,), weight, bias, 1e-12)
    stream, low = embed_layer_norm(ids, positions, word, position, token_type, weight, bias, 1e-12, torch.bfloat16)
    assert stream.dtype == torch.float32 and low.dtype == torch.bfloat16 and stream.shape == (71, cols)
    assert (stream.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6
    assert ((low.float() - stream).abs() <= torch.finfo(torch.bfloat16).eps * stream.abs()).all()
