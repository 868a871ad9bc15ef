"""The packed encoder forward (PackedBertForward) and the pooling of its hidden states: its paths (the C++
kernels, SDPA, the fused Triton steps, bf16) against each other and against the unmodified model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import assert_close
from evaluation_inputs import coalition_batch, dense_reward, random_response

from ospo_fast import _extension
from ospo_fast.evaluate import EncoderCoalitionEvaluator, PackedSequences, pool_packed


@pytest.fixture(scope="module")
def reward():
    """On the CPU even where a GPU is present: the float32 path compares to fp32 tolerance (on CUDA the packed
    forward defaults to bf16; a GPU test builds its own reward)."""
    return dense_reward()


def test_bf16_packed_forward_matches_the_loop_to_bf16_tolerance(reward):
    rng = random.Random(9)
    texts = [random_response(rng) for _ in range(5)]
    coalitions = coalition_batch(texts, [0] * 5)
    embeddings, seq_index = EncoderCoalitionEvaluator(reward, dtype=torch.bfloat16).embed(coalitions)
    reference, reference_index = EncoderCoalitionEvaluator(reward, dtype=torch.float32).embed(coalitions)
    got, expected = embeddings[torch.from_numpy(seq_index)], reference[torch.from_numpy(reference_index)]
    assert_close(got, expected, rtol=0.0, atol=4e-2, what="bf16 embeddings")
    assert (got * expected).sum(1).min() > 0.99  # cosine similarity of unit vectors


def test_fused_residual_steps_give_the_unfused_reduced_precision_forward(reward, monkeypatch):
    """The bf16 forward with the fused Triton embedding and residual steps (the CUDA path; without a GPU, on
    the CPU in the interpreter) against the same forward with torch's gathers, adds, layer_norm and cast."""
    if not _extension.has_triton():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        reward = dense_reward("cuda")
    rng = random.Random(13)
    coalitions = coalition_batch([random_response(rng) for _ in range(2)], [0] * 2,
                        budget=12)  # the interpreter: a program per token
    embeddings, calls = {}, []
    for fused in (False, True):
        evaluator = EncoderCoalitionEvaluator(reward, dtype=torch.bfloat16)
        monkeypatch.setattr(evaluator.forward, "_fused_norm", lambda device, fused=fused: calls.append(fused) or fused)
        got, index = evaluator.embed(coalitions)
        embeddings[fused] = got[torch.from_numpy(index)].float().cpu()
    assert calls.count(True) == 13  # fused: the embeddings and two residual steps per layer
    assert_close(embeddings[True], embeddings[False], rtol=0.0, atol=1e-2, what="fused vs unfused bf16 embeddings")
    assert (embeddings[True] * embeddings[False]).sum(1).min() > 0.999


def test_packed_forward_kernel_path_equals_the_sdpa_path_and_its_buffers_do_not_leak(reward):
    """The default CPU attention (the C++ kernel where built) against the per-length SDPA path, on batches
    of growing and shrinking size: the reused activation buffers never change a returned result."""
    rng = random.Random(11)
    fast = EncoderCoalitionEvaluator(reward)
    sdpa = EncoderCoalitionEvaluator(reward, attention="sdpa")
    kept = []
    for n in (6, 2, 9):
        coalitions = coalition_batch([random_response(rng) for _ in range(n)], [0] * n)
        got, index = fast.embed(coalitions)
        expected, expected_index = sdpa.embed(coalitions)
        assert_close(got[torch.from_numpy(index)], expected[torch.from_numpy(expected_index)], rtol=1e-5, atol=2e-5,
                     what=f"kernel vs SDPA, {n} responses")
        kept.append((got, got.clone()))
    for got, snapshot in kept:  # earlier results are untouched by later calls
        assert torch.equal(got, snapshot)
    fast.forward.release_buffers()
    again, _ = fast.embed(coalitions)
    assert torch.equal(again, kept[-1][1])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("method", ["segments", "triton"])
@pytest.mark.parametrize("cols,dtype", [(24, torch.float32), (37, torch.bfloat16)])
def test_gpu_poolings_equal_pooling_by_runs(pooling, method, cols, dtype):
    """The GPU poolings (segment sums by sequence id; the Triton kernel, a program per sequence) against the
    CPU one (views per run of equal lengths), on odd lengths and widths, runs of one, sequences longer than
    the kernel's row block; written into a slice of a larger output, whose other rows stay untouched."""
    if method == "triton" and not _extension.has_triton():
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(5 + cols)
    lengths = np.sort(np.concatenate([torch.randint(1, 19, (37,), generator=g).numpy(), [40, 41]]))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    device = "cuda" if method == "triton" and torch.cuda.is_available() else "cpu"
    packed = PackedSequences(
        input_ids=torch.zeros(int(cu[-1]), dtype=torch.long, device=device),
        position_ids=torch.from_numpy(positions).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device, torch.int32),
        lengths=lengths,
    )
    hidden = torch.randn(int(cu[-1]), cols, generator=g).to(device, dtype)
    by_runs = pool_packed(hidden.cpu().float(), packed, pooling, method="runs")
    frame = torch.full((len(lengths) + 3, cols), 7.0, device=device)
    got = pool_packed(hidden, packed, pooling, method=method, out=frame[2:-1])
    assert got.data_ptr() == frame[2:-1].data_ptr()
    assert_close(got.cpu(), by_runs, rtol=1e-5, atol=1e-6, what=f"{method} pooling")
    assert bool((frame[:2] == 7).all() and (frame[-1] == 7).all())


def test_pooling_method_is_checked():
    packed = PackedSequences(torch.zeros(2, dtype=torch.long), torch.arange(2), torch.tensor([0, 2], dtype=torch.int32),
                             np.array([2]))
    with pytest.raises(ValueError, match="method: expected one of"):
        pool_packed(torch.zeros(2, 4), packed, "mean", method="atomic")


def test_attention_choice_is_checked(reward):
    with pytest.raises(ValueError, match=r"attention: expected one of \('auto', 'flash', 'sdpa'\)"):
        EncoderCoalitionEvaluator(reward, attention="flex")
    # flash attention needs CUDA and reduced precision; on the CPU in float32 it is refused with the reason,
    # at construction rather than at the first forward.
    with pytest.raises(ValueError, match="attention='flash' needs"):
        EncoderCoalitionEvaluator(reward, attention="flash", dtype=torch.float32)
