"""Triton kernels for the token log-probabilities and the clipped GRPO surrogate with per-token advantages.

One program per token row ``(n, t)``. The forward kernel reads the row's logits in chunks of ``BLOCK_V``
in their own dtype and keeps an online log-sum-exp in fp32, so no fp32 copy of the ``[N, T, V]`` logits
ever exists; it gathers the target's logit and, for the loss, computes the ratio, the clipped per-token
objective and the k3 KL in the same program. It stores ``logp`` and ``lse`` (4 bytes each per token) for
the backward kernel, which reads the logits once more and writes

    dlogits[v] = g_t * (onehot(v == id_t) - softmax(logits / temperature)[v]) / temperature

chunk by chunk in the logits' dtype, with ``g_t = d objective / d logp_t`` formed in the kernel from the
saved per-token quantities. The token reduction (grpo / dr_grpo / dapo) is done by the caller in torch on
``[N, T]``. Masked tokens are skipped: their outputs stay 0 and their logit gradients are written as 0.

The contract (shapes, dtypes, the meaning of each quantity) is stated by ``ospo_fast.loss``, whose torch
reference these kernels must match; they trust their inputs.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _grpo_fwd_kernel(
    logits,
    stride_ln,
    stride_lt,
    ids,
    mask,
    adv,
    old,
    ref,
    logp_out,
    lse_out,
    ratio_out,
    loss_out,
    kl_out,
    T,
    V,
    temperature,
    beta,
    eps_low,
    eps_high,
    HAS_LOSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(mask + row) == 0:
            return  # outputs were zero-initialised
    # int64 offsets: N * T * V exceeds 2**31 for real batches
    base = logits + (row // T) * stride_ln + (row % T) * stride_lt
    cols = tl.arange(0, BLOCK_V)
    run_max = float("-inf")
    run_sum = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    target = tl.load(ids + row)
    logp = tl.load(base + target).to(tl.float32) / temperature - lse
    tl.store(logp_out + row, logp)
    tl.store(lse_out + row, lse)
    if HAS_LOSS:
        a = tl.load(adv + row)
        if HAS_OLD:
            ratio = tl.exp(logp - tl.load(old + row))
        else:
            ratio = tl.exp(logp - logp)  # on-policy: exactly 1, as a float32 tensor
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        loss = -tl.minimum(ratio * a, clipped * a)
        if HAS_REF:
            d = tl.load(ref + row) - logp
            kl = tl.exp(d) - d - 1.0
            loss += beta * kl
            tl.store(kl_out + row, kl)
        tl.store(ratio_out + row, ratio)
        tl.store(loss_out + row, loss)


@triton.jit
def _grpo_bwd_kernel(
    grad,
    logits,
    stride_ln,
    stride_lt,
    dlogits,
    ids,
    mask,
    adv,
    old,
    ref,
    logp_in,
    lse_in,
    T,
    V,
    temperature,
    beta,
    eps_low,
    eps_high,
    HAS_LOSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    out = dlogits + row * V  # dlogits is contiguous [N, T, V]
    cols = tl.arange(0, BLOCK_V)
    if HAS_MASK:
        if tl.load(mask + row) == 0:
            for start in range(0, V, BLOCK_V):
                tl.store(out + start + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(dlogits.dtype.element_ty),
                         mask=start + cols < V)
            return
    g = tl.load(grad + row)
    if HAS_LOSS:
        # d(-min(r A, clip(r) A))/d logp: -A r where the unclipped term is the minimum (ties included,
        # as torch's min and clamp split and pass the gradient), else 0; dr/dlogp = r.
        logp = tl.load(logp_in + row)
        a = tl.load(adv + row)
        if HAS_OLD:
            ratio = tl.exp(logp - tl.load(old + row))
        else:
            ratio = tl.exp(logp - logp)
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        dlogp = tl.where(ratio * a <= clipped * a, -a * ratio, 0.0)
        if HAS_REF:
            dlogp += beta * (1.0 - tl.exp(tl.load(ref + row) - logp))  # d k3 / d logp
        g = g * dlogp
    g = g / temperature
    lse = tl.load(lse_in + row)
    target = tl.load(ids + row)
    base = logits + (row // T) * stride_ln + (row % T) * stride_lt
    for start in range(0, V, BLOCK_V):
        v = start + cols
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32) / temperature
        p = tl.exp(x - lse)
        d = g * (tl.where(v == target, 1.0, 0.0) - p)
        tl.store(out + v, d.to(dlogits.dtype.element_ty), mask=v < V)


def default_block_v(vocab_size: int) -> int:
    """The vocabulary chunk each step reads: the whole row when small, else 4096 elements."""
    return min(triton.next_power_of_2(max(vocab_size, 16)), 4096)


def _launch_config(block_v: int) -> dict:
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


def _flags(mask, adv, old, ref) -> dict:
    return {
        "HAS_LOSS": adv is not None,
        "HAS_MASK": mask is not None,
        "HAS_OLD": old is not None,
        "HAS_REF": ref is not None,
    }


def grpo_forward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    adv: torch.Tensor | None = None,
    old: torch.Tensor | None = None,
    ref: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    block_v: int | None = None,
):
    """Forward launch.

    logits: float ``[N, T, V]`` with a unit stride on V (any strides on N and T: ``logits[:, :-1]`` of a
    contiguous tensor is read in place); ids: int64 ``[N, T]`` contiguous; mask: float32 ``[N, T]`` or None
    (every token); adv, old, ref: float32 ``[N, T]`` contiguous, or None (adv None: log-probabilities only;
    old None: on-policy; ref None: no KL). Returns fp32 ``[N, T]`` tensors ``(logp, lse, ratio, loss, kl)``;
    ``ratio``, ``loss`` are None without ``adv`` and ``kl`` is None without ``ref``; masked tokens hold 0.
    """
    N, T, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.zeros(N, T, **f32), torch.zeros(N, T, **f32)
    ratio = torch.zeros(N, T, **f32) if adv is not None else None
    loss = torch.zeros(N, T, **f32) if adv is not None else None
    kl = torch.zeros(N, T, **f32) if ref is not None else None
    if N * T:
        dummy = logp  # never read: the matching HAS_* flag is off
        _grpo_fwd_kernel[(N * T,)](
            logits, logits.stride(0), logits.stride(1), ids,
            _or(mask, dummy), _or(adv, dummy), _or(old, dummy), _or(ref, dummy),
            logp, lse, _or(ratio, dummy), _or(loss, dummy), _or(kl, dummy),
            T, V, float(temperature), float(beta), float(eps_low), float(eps_high),
            **_flags(mask, adv, old, ref), **_launch_config(block_v or default_block_v(V)),
        )
    return logp, lse, ratio, loss, kl


def grpo_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None = None,
    adv: torch.Tensor | None = None,
    old: torch.Tensor | None = None,
    ref: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    block_v: int | None = None,
) -> torch.Tensor:
    """Backward launch: ``d / d logits`` as a contiguous ``[N, T, V]`` tensor in the logits' dtype.

    grad: fp32 ``[N, T]`` contiguous: the gradient of the per-token objective (with ``adv``) or of ``logp``
    (without); the other arguments as :func:`grpo_forward` and its saved ``logp``, ``lse``.
    """
    N, T, V = logits.shape
    dlogits = torch.empty((N, T, V), dtype=logits.dtype, device=logits.device)
    if N * T:
        dummy = logp
        _grpo_bwd_kernel[(N * T,)](
            grad, logits, logits.stride(0), logits.stride(1), dlogits, ids,
            _or(mask, dummy), _or(adv, dummy), _or(old, dummy), _or(ref, dummy), logp, lse,
            T, V, float(temperature), float(beta), float(eps_low), float(eps_high),
            **_flags(mask, adv, old, ref), **_launch_config(block_v or default_block_v(V)),
        )
    return dlogits


def _or(tensor, fallback):
    return fallback if tensor is None else tensor
