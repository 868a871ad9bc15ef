"""The fused GRPO loss and token log-probabilities (``ospo_fast.loss``) beside their torch reference.

Inputs as a causal LM gives them: logits ``full[:, :-1]`` of ``[N, T + 1, V]`` float32 (read in place,
strided), N = 8 completions of T = 128 tokens, V = 4096 (a small vocabulary, so the reference's fp32
log-softmax fits a 2-core budget; the fused kernel's advantage grows with V), per-token advantages, a
ragged completion mask, old and reference log-probs ~0.5 nats off (so some ratios are clipped), beta = 0.04.

grpo_loss       forward + backward (``loss.backward()`` to the logits), loss_type "grpo".
token_logprobs  forward only.
Rows: ``reference`` (backend="torch": log_softmax on an fp32 copy, autograd) and ``triton`` (GPU, or the
CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the project's `bench` extra)")

from ospo_fast.loss import grpo_loss, token_logprobs, token_logprobs_reference  # noqa: E402

N, T, V = 8, 128, 4096
ROWS = [(d, i) for d in ("cpu", "cuda") for i in ("reference", "triton")]
IDS = [f"{d}-{i}" for d, i in ROWS]
SHAPE = f"N={N} T={T} V={V} f32"


@functools.cache
def _inputs():
    """(full logits [N, T + 1, V], ids, advantages, mask, old, ref) on the CPU, fixed seed."""
    g = torch.Generator().manual_seed(0)
    full = 2 * torch.randn(N, T + 1, V, generator=g)
    ids = torch.randint(0, V, (N, T), generator=g)
    adv = torch.randn(N, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (N,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]
    logp = token_logprobs_reference(full[:, :-1], ids)
    old = logp + 0.5 * torch.randn(N, T, generator=g)
    ref = logp + 0.5 * torch.randn(N, T, generator=g)
    return full, ids, adv, mask, old, ref


def _on(device: str):
    return tuple(x.to(device) for x in _inputs())


def _loss_step(backend: str, full, ids, adv, mask, old, ref):
    """One loss forward and backward: (loss, metrics, d loss / d full)."""
    leaf = full.detach().requires_grad_()
    loss, metrics = grpo_loss(leaf[:, :-1], ids, adv, mask, old, ref, beta=0.04, backend=backend)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


@pytest.mark.parametrize("device,impl", ROWS, ids=IDS)
def test_grpo_loss_forward_backward(timed, require, device, impl):
    require(device, impl)
    inputs = _on(device)
    backend = "torch" if impl == "reference" else impl
    loss, metrics, grad = _loss_step("torch", *_inputs())
    got_loss, got_metrics, got_grad = _loss_step(backend, *inputs)
    assert metrics["clip_ratio"] > 0 and grad.abs().max() > 0  # the clipped branch and the KL are exercised
    torch.testing.assert_close(got_loss.cpu(), loss, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(got_metrics[key].cpu(), metrics[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.cpu(), grad, rtol=1e-4, atol=1e-6)
    timed(lambda: _loss_step(backend, *inputs), group=f"grpo_loss fwd+bwd[{device}] {SHAPE}", impl=impl, device=device)


@pytest.mark.parametrize("device,impl", ROWS, ids=IDS)
def test_token_logprobs(timed, require, device, impl):
    require(device, impl)
    full, ids, *_ = _on(device)
    backend = "torch" if impl == "reference" else impl
    expected = token_logprobs_reference(_inputs()[0][:, :-1], _inputs()[1])
    got = token_logprobs(full[:, :-1], ids, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        timed(
            lambda: token_logprobs(full[:, :-1], ids, backend=backend),
            group=f"token_logprobs fwd[{device}] {SHAPE}", impl=impl, device=device,
        )
