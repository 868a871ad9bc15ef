"""The fused GRPO loss: the Triton kernels against the torch reference, TRL's reductions, masks, checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from ospo_fast import _extension
from ospo_fast.loss import (
    LOSS_TYPES,
    grpo_loss,
    resolve_loss_backend,
    token_logprobs,
    token_logprobs_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if _extension.has_triton() else [])
needs_triton = pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")

# Per dtype: (rtol, atol) for values, then for gradients (bf16/fp16 gradients are rounded on store).
TOL = {
    torch.float32: ((1e-5, 1e-6), (1e-4, 1e-6)),
    torch.bfloat16: ((1e-2, 1e-3), (2e-2, 1e-2)),
    torch.float16: ((1e-3, 1e-4), (1e-2, 1e-3)),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(seed, N=3, T=7, V=101, dtype=torch.float32, per_token=True):
    """Logits as the ``[:, :-1]`` slice of ``[N, T + 1, V]`` (strided, as a causal LM gives them), ids, Â, a
    ragged mask, old log-probs ~0.5 nats off the current ones (so some ratios are clipped) and ref log-probs."""
    g = _gen(seed)
    full = (2 * torch.randn(N, T + 1, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (N, T), generator=g)
    adv = torch.randn(N, T, generator=g) if per_token else torch.randn(N, generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]
    logp = token_logprobs_reference(full[:, :-1], ids)
    old = logp + 0.5 * torch.randn(N, T, generator=g)
    ref = logp + 0.5 * torch.randn(N, T, generator=g)
    to = dict(device=DEVICE)
    return full.to(**to), ids.to(**to), adv.to(**to), mask.to(**to), old.to(**to), ref.to(**to)


def loss_and_grad(backend, full, *args, **kwargs):
    """grpo_loss on ``full[:, :-1]`` and the gradient with respect to ``full``."""
    full = full.detach().clone().requires_grad_()
    loss, metrics = grpo_loss(full[:, :-1], *args, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), metrics, full.grad


# ----------------------------------------------------------------------------------------------------
# token_logprobs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V,block_v", [(101, 32), (257, 64), (257, 512)])
def test_token_logprobs_match_reference(dtype, V, block_v):
    full, ids, *_ = make_inputs(V, V=V, dtype=dtype)
    logits = full[:, :-1]
    expected = token_logprobs_reference(logits, ids, temperature=0.7)
    actual = token_logprobs(logits, ids, temperature=0.7, backend="triton", block_v=block_v)
    assert actual.dtype == torch.float32
    assert_close(actual, expected, 1e-5, 1e-5, what=f"logp {dtype}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_gradient_matches_reference(dtype):
    full, ids, *_ = make_inputs(1, V=257, dtype=dtype)
    upstream = torch.randn(ids.shape, generator=_gen(2)).to(DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        leaf = full.detach().clone().requires_grad_()
        (token_logprobs(leaf[:, :-1], ids, 1.3, backend=backend, block_v=64) * upstream).sum().backward()
        grads.append(leaf.grad)
    assert grads[1].dtype == dtype
    assert_close(grads[1], grads[0], *TOL[dtype][1], what=f"d logp / d logits {dtype}")


# ----------------------------------------------------------------------------------------------------
# grpo_loss: Triton against the torch reference

LOSS_CASES = [
    (loss_type, kl, per_token)
    for loss_type in ("grpo", "dr_grpo", "dapo")
    for kl in (False, True)
    for per_token in (True, False)
]
CASE_IDS = [f"{t}-{'kl' if k else 'nokl'}-{'token' if p else 'seq'}" for t, k, p in LOSS_CASES]


def _loss_kwargs(case, seed, dtype=torch.float32):
    loss_type, kl, per_token = case
    V, block_v = (101, 32) if seed % 2 else (257, 64)
    full, ids, adv, mask, old, ref = make_inputs(seed, V=V, dtype=dtype, per_token=per_token)
    kwargs = dict(
        old_logps=old, ref_logps=ref if kl else None, beta=0.04 if kl else 0.0, eps_low=0.2,
        eps_high=0.28 if loss_type == "dapo" else 0.2, loss_type=loss_type, max_completion_length=11,
        temperature=0.9,
    )
    return full, (ids, adv, mask), kwargs, block_v


@needs_triton
@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_loss_and_metrics_match_reference(case):
    full, args, kwargs, block_v = _loss_kwargs(case, LOSS_CASES.index(case))
    loss, metrics, _ = loss_and_grad("torch", full, *args, **kwargs)
    t_loss, t_metrics, _ = loss_and_grad("triton", full, *args, **kwargs, block_v=block_v)
    assert_close(t_loss, loss, 1e-5, 1e-6, what="loss")
    assert metrics["clip_ratio"] > 0  # the case exercises the clipped branch
    assert t_metrics.keys() == metrics.keys() and ("kl" in metrics) == case[1]
    for key in metrics:
        assert_close(t_metrics[key], metrics[key], 1e-5, 1e-6, what=key)


@needs_triton
@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_loss_gradient_matches_reference(case):
    full, args, kwargs, block_v = _loss_kwargs(case, 100 + LOSS_CASES.index(case))
    *_, grad = loss_and_grad("torch", full, *args, **kwargs)
    *_, t_grad = loss_and_grad("triton", full, *args, **kwargs, block_v=block_v)
    assert grad.abs().max() > 0
    assert_close(t_grad, grad, *TOL[torch.float32][1], what="d loss / d logits")


@needs_triton
@pytest.mark.parametrize("case", LOSS_CASES[::3], ids=CASE_IDS[::3])
def test_bf16_logits_loss_and_gradient_match_reference(case):
    full, args, kwargs, block_v = _loss_kwargs(case, 200 + LOSS_CASES.index(case), dtype=torch.bfloat16)
    loss, _, grad = loss_and_grad("torch", full, *args, **kwargs)
    t_loss, _, t_grad = loss_and_grad("triton", full, *args, **kwargs, block_v=block_v)
    assert t_grad.dtype == torch.bfloat16
    assert_close(t_loss, loss, *TOL[torch.bfloat16][0], what="bf16 loss")
    assert_close(t_grad, grad, *TOL[torch.bfloat16][1], what="bf16 d loss / d logits")


@needs_triton
def test_sliced_logits_are_read_in_place_like_contiguous_ones():
    full, ids, adv, mask, old, ref = make_inputs(5, V=101)
    sliced, _ = grpo_loss(full[:, 1:], ids, adv, mask, old, ref, beta=0.1, backend="triton", block_v=32)
    copied, _ = grpo_loss(full[:, 1:].contiguous(), ids, adv, mask, old, ref, beta=0.1, backend="triton", block_v=32)
    assert_close(sliced, copied, 0, 0, what="strided vs contiguous")


# ----------------------------------------------------------------------------------------------------
# grpo_loss: properties every backend has


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_contribute_nothing(backend):
    full, ids, adv, mask, old, ref = make_inputs(6, V=101)
    kwargs = dict(beta=0.1, backend=backend, block_v=32 if backend == "triton" else None)
    loss, metrics = grpo_loss(full[:, :-1], ids, adv, mask, old, ref, **kwargs)
    off = ~mask
    assert off.any()
    g = _gen(7)
    noisy = full.clone()
    noisy[:, :-1][off] = 50 * torch.randn(int(off.sum()), full.shape[-1], generator=g).to(DEVICE)
    changed = lambda x: torch.where(off, torch.randn(x.shape, generator=g).to(DEVICE) * 10, x)  # noqa: E731
    leaf = noisy.requires_grad_()
    loss2, metrics2 = grpo_loss(leaf[:, :-1], ids, changed(adv), mask, changed(old), changed(ref), **kwargs)
    loss2.backward()
    assert_close(loss2.detach(), loss.detach(), 1e-6, 1e-7, what="loss with other masked tokens")
    for key in metrics:
        assert_close(metrics2[key], metrics[key], 1e-6, 1e-7, what=key)
    assert (leaf.grad[:, :-1][off] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_grpo_loss_is_minus_mean_advantage(backend):
    full, ids, adv, mask, *_ = make_inputs(8, V=101)
    loss, metrics = grpo_loss(full[:, :-1], ids, adv, mask, backend=backend)
    expected = -((adv * mask).sum(1) / mask.sum(1)).mean()
    assert_close(loss.detach(), expected, 1e-6, 1e-7, what="on-policy loss")
    assert metrics["clip_ratio"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_types_use_trl_normalisers(backend):
    # On-policy without KL the per-token objective is -Â, so each loss type is a plain weighted sum.
    full, ids, adv, mask, *_ = make_inputs(9, V=101)
    N = ids.shape[0]
    total = (-adv * mask).sum()
    expected = {
        "grpo": ((-adv * mask).sum(1) / mask.sum(1)).mean(),
        "dr_grpo": total / (N * 13),
        "dapo": total / mask.sum(),
    }
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(
            full[:, :-1], ids, adv, mask, loss_type=loss_type, max_completion_length=13, backend=backend
        )
        assert_close(loss.detach(), value, 1e-6, 1e-7, what=loss_type)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dr_grpo_without_max_completion_length_uses_T(backend):
    full, ids, adv, mask, *_ = make_inputs(10, V=101)
    a, _ = grpo_loss(full[:, :-1], ids, adv, mask, loss_type="dr_grpo", backend=backend)
    T = ids.shape[1]
    b, _ = grpo_loss(full[:, :-1], ids, adv, mask, loss_type="dr_grpo", max_completion_length=T, backend=backend)
    assert_close(a.detach(), b.detach(), 0, 0, what="dr_grpo default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_ratio_counts_ratios_clipped_in_the_advantage_direction(backend):
    full, ids, _, _, _, _ = make_inputs(11, N=2, T=5, V=101)
    logp = token_logprobs_reference(full[:, :-1], ids)
    # ratio 1.5 everywhere: clipped (above 1 + 0.2) where Â > 0 only; ratio 0.5: where Â < 0 only.
    old = logp - torch.tensor([[math.log(1.5)], [math.log(0.5)]], device=DEVICE)
    adv = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.0], [1.0, -1.0, -2.0, 0.5, 0.0]], device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    _, metrics = grpo_loss(full[:, :-1], ids, adv, mask, old, backend=backend)
    assert metrics["high_clip_ratio"].item() == pytest.approx(2 / 10)
    assert metrics["low_clip_ratio"].item() == pytest.approx(2 / 10)
    assert metrics["clip_ratio"].item() == pytest.approx(4 / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_to_an_identical_reference_is_zero_with_zero_gradient(backend):
    full, ids, adv, mask, *_ = make_inputs(12, V=101)
    ref = token_logprobs_reference(full[:, :-1], ids)
    zero_adv = torch.zeros_like(adv)
    leaf = full.clone().requires_grad_()
    loss, metrics = grpo_loss(leaf[:, :-1], ids, zero_adv, mask, None, ref, beta=0.5, backend=backend)
    loss.backward()
    assert abs(metrics["kl"].item()) < 1e-6 and abs(loss.item()) < 1e-6
    assert leaf.grad.abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------
# Backend choice and argument checks


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda():
    assert resolve_loss_backend("auto", torch.device("cpu")) == "torch"
    expected = "triton" if _extension.has_triton() else "torch"
    assert resolve_loss_backend("auto", torch.device("cuda")) == expected


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend"):
        resolve_loss_backend("triton", torch.device("cpu"))


def _bad(**changes):
    """Bad inputs on the CPU: there the loss also range-checks token ids (on a GPU that check would sync)."""
    full, ids, adv, mask, old, ref = make_inputs(13, V=101)
    args = dict(logits=full[:, :-1], input_ids=ids, advantages=adv, completion_mask=mask, old_logps=old, ref_logps=ref)
    args.update(changes)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


_FULL, _IDS, _ADV, _MASK, _OLD, _REF = make_inputs(13, V=101)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (_bad(logits=_FULL[0]), "logits"),
        (_bad(logits=_FULL[:, :-1].long()), "logits"),
        (_bad(input_ids=_IDS[:, :-1]), "input_ids"),
        (_bad(input_ids=_IDS.float()), "input_ids"),
        (_bad(input_ids=_IDS + 101), "input_ids"),
        (_bad(advantages=_ADV[:, :-1]), "advantages"),
        (_bad(advantages=_ADV[:-1, 0]), "advantages"),
        (_bad(completion_mask=_MASK[None]), "completion_mask"),
        (_bad(old_logps=_OLD[:, :3]), "old_logps"),
        (_bad(ref_logps=_REF.T), "ref_logps"),
        (_bad(ref_logps=None, beta=0.1), "ref_logps"),
        (_bad(beta=-0.1), "beta"),
        (_bad(eps_low=1.0), "eps_low"),
        (_bad(eps_high=-0.2), "eps_high"),
        (_bad(loss_type="bnpo"), "loss_type"),
        (_bad(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
        (_bad(temperature=0.0), "temperature"),
        (_bad(temperature=float("inf")), "temperature"),
        (_bad(beta=float("nan")), "beta"),
        (_bad(eps_high=float("inf")), "eps_high"),
        (_bad(backend="cuda"), "backend"),
        (_bad(block_v=48), "block_v"),
    ],
)
def test_grpo_loss_bad_inputs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        grpo_loss(**kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("N,T", [(0, 5), (3, 0), (0, 0)])
def test_an_empty_batch_gives_a_zero_loss_not_nan(loss_type, N, T):
    logits = torch.randn(N, T, 11, requires_grad=True)
    loss, metrics = grpo_loss(logits, torch.zeros(N, T, dtype=torch.long), torch.zeros(N), torch.ones(N, T),
                              loss_type=loss_type, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
    assert logits.grad.shape == logits.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocabulary_on_gpu_matches_reference(dtype):
    # A real vocabulary (several chunks of the default block) and the default launch configuration.
    g = _gen(14)
    N, T, V = 4, 33, 151_936
    full = (3 * torch.randn(N, T + 1, V, generator=g)).to(dtype).cuda()
    ids = torch.randint(0, V, (N, T), generator=g).cuda()
    adv = torch.randn(N, T, generator=g).cuda()
    mask = (torch.arange(T) < torch.tensor([[T], [20], [1], [7]])).cuda()
    old = token_logprobs_reference(full[:, :-1], ids) + 0.2 * torch.randn(N, T, generator=g).cuda()
    ref = old + 0.3 * torch.randn(N, T, generator=g).cuda()
    kwargs = dict(old_logps=old, ref_logps=ref, beta=0.04, loss_type="dapo")
    loss, _, grad = loss_and_grad("torch", full, ids, adv, mask, **kwargs)
    t_loss, _, t_grad = loss_and_grad("triton", full, ids, adv, mask, **kwargs)
    assert_close(t_loss, loss, *TOL[dtype][0], what="loss")
    assert_close(t_grad, grad, *TOL[dtype][1], what="d loss / d logits")
