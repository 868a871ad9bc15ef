"""The policy loss with per-token advantages: log-softmax gather and clipped surrogate, fused over the vocabulary.

``grpo_loss`` takes an advantage per token (``[N, T]``, what :func:`ospo_fast.redistribute` returns) or per
sequence (``[N]``, plain GRPO). Per completion token, with ``logp`` the policy's log-probability of the
sampled token at ``temperature``, ``r = exp(logp - old_logp)`` and ``Â`` its advantage::

    objective_t = -min(r Â, clip(r, 1 - eps_low, 1 + eps_high) Â) + beta * k3_t
    k3_t        = exp(ref_logp - logp) - (ref_logp - logp) - 1          (Schulman's k3 KL estimator)

reduced over tokens as TRL's GRPOTrainer does for each ``loss_type``:

* ``grpo``: mean over each sequence's completion tokens, then mean over sequences;
* ``dr_grpo``: sum over completion tokens / (N * max_completion_length);
* ``dapo``: sum over completion tokens / number of completion tokens in the batch.

Backends, chosen in :func:`resolve_loss_backend`:

* ``torch``: the reference, ``log_softmax`` on an fp32 copy of the logits and autograd;
* ``triton``: ``ospo_fast.kernels.grpo_loss``: one pass over the vocabulary in chunks for the forward and
  one for the backward, logits read in their own dtype, gradients written in it; the only fp32 tensors
  are ``[N, T]``. It runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Alignment: ``logits[n, t]`` is the distribution that produced ``input_ids[n, t]``; for a causal LM over
prompt + completion that is ``model(...).logits[:, P - 1 : -1]`` against ``ids[:, P:]``. Such a slice is read
in place by the Triton backend (only the vocabulary stride must be 1).

No function here synchronises the host with a GPU stream: the checks look at shapes, dtypes and devices
only (value checks, such as token ids in range, run on CPU tensors alone).
"""

from __future__ import annotations

import torch

from . import dispatch
from ._checks import check_choice, check_int, check_number

LOSS_BACKENDS = dispatch.choices("loss")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------------------------------
# Torch reference


def token_logprobs_reference(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``input_ids``: float32 ``[N, T]`` from ``[N, T, V]`` and ``[N, T]``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)


def per_token_objective(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    beta: float,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The clipped surrogate (plus ``beta`` k3 KL) per token, from fp32 ``[N, T]`` inputs.

    ``old_logps`` None means on-policy: the ratio is ``exp(logp - logp.detach())``, 1 with gradient 1.
    Returns ``(objective, ratio, kl)``, each fp32 ``[N, T]``; ``kl`` is None without ``ref_logps``.
    """
    old = logp.detach() if old_logps is None else old_logps
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    objective = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logp) - (ref_logps - logp) - 1
        objective = objective + beta * kl
    return objective, ratio, kl


def reduce_loss(
    objective: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
) -> torch.Tensor:
    """Scalar loss from the per-token objective ``[N, T]`` and the float completion mask ``[N, T]``. An empty batch
    (no sequence, or no completion token) gives 0, not NaN: it has nothing to teach."""
    masked = objective * mask
    sequences = max(objective.size(0), 1)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    if loss_type == "dr_grpo":
        return masked.sum() / (sequences * max_completion_length)
    return masked.sum() / mask.sum().clamp(min=1.0)  # dapo


def _metrics(ratio, kl, advantages, mask, eps_low, eps_high) -> dict[str, torch.Tensor]:
    """Token means over completion tokens, as TRL logs them: fraction clipped below / above / either, KL."""
    count = mask.sum().clamp(min=1.0)
    low = ((ratio < 1 - eps_low) & (advantages < 0)).float()
    high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
    out = {
        "clip_ratio": ((low + high) * mask).sum() / count,
        "low_clip_ratio": (low * mask).sum() / count,
        "high_clip_ratio": (high * mask).sum() / count,
    }
    if kl is not None:
        out["kl"] = (kl * mask).sum() / count
    return {k: v.detach() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# Triton autograd functions


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, input_ids, temperature, block_v):
        from .kernels.grpo_loss import grpo_forward

        logp, lse, *_ = grpo_forward(logits, input_ids, temperature=temperature, block_v=block_v)
        ctx.save_for_backward(logits, input_ids, logp, lse)
        ctx.temperature, ctx.block_v = temperature, block_v
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        from .kernels.grpo_loss import grpo_backward

        logits, input_ids, logp, lse = ctx.saved_tensors
        dlogits = grpo_backward(
            grad_logp.float().contiguous(), logits, input_ids, logp, lse,
            temperature=ctx.temperature, block_v=ctx.block_v,
        )
        return dlogits, None, None, None


class _TritonGRPOObjective(torch.autograd.Function):
    """logits -> (objective, logp, ratio, kl) per token; only ``objective`` carries a gradient."""

    @staticmethod
    def forward(ctx, logits, input_ids, mask, advantages, old_logps, ref_logps, beta, eps_low, eps_high,
                temperature, block_v):
        from .kernels.grpo_loss import grpo_forward

        logp, lse, ratio, objective, kl = grpo_forward(
            logits, input_ids, mask, advantages, old_logps, ref_logps,
            temperature=temperature, beta=beta, eps_low=eps_low, eps_high=eps_high, block_v=block_v,
        )
        ctx.save_for_backward(logits, input_ids, mask, advantages, old_logps, ref_logps, logp, lse)
        ctx.scalars = (temperature, beta, eps_low, eps_high, block_v)
        kl_out = kl if kl is not None else torch.zeros_like(logp)
        ctx.mark_non_differentiable(logp, ratio, kl_out)
        return objective, logp, ratio, kl_out

    @staticmethod
    def backward(ctx, grad_objective, *_):
        from .kernels.grpo_loss import grpo_backward

        logits, input_ids, mask, advantages, old_logps, ref_logps, logp, lse = ctx.saved_tensors
        temperature, beta, eps_low, eps_high, block_v = ctx.scalars
        dlogits = grpo_backward(
            grad_objective.float().contiguous(), logits, input_ids, logp, lse, mask, advantages, old_logps,
            ref_logps, temperature=temperature, beta=beta, eps_low=eps_low, eps_high=eps_high, block_v=block_v,
        )
        return (dlogits,) + (None,) * 10


# ----------------------------------------------------------------------------------------------------
# Public functions


def resolve_loss_backend(backend: str, device: torch.device) -> str:
    """The loss implementation that runs for ``backend`` on ``device``: ``"torch"`` or ``"triton"`` (see
    :func:`ospo_fast.dispatch.resolve`).

    ``auto``: Triton on CUDA tensors when triton is installed, else torch (the interpreter is a test tool).
    """
    return dispatch.resolve("loss", backend, device)


def _check_logits_ids(logits, input_ids, temperature, block_v) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        got = f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor [N, T, V], got {got}")
    N, T, V = logits.shape
    if V < 1:
        raise ValueError("logits: the vocabulary dimension V is empty")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an integer tensor [N, T], got {got}")
    if tuple(input_ids.shape) != (N, T):
        raise ValueError(
            f"input_ids: expected shape [{N}, {T}] (the first two dims of logits), got {list(input_ids.shape)}"
        )
    if input_ids.device != logits.device:
        raise ValueError(f"input_ids: on {input_ids.device}, logits on {logits.device}; put them on one device")
    if input_ids.device.type == "cpu" and input_ids.numel():  # a value check costs no device sync here
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids: token ids must lie in [0, {V}) (the vocabulary of logits), got [{lo}, {hi}]")
    check_number(temperature, "temperature", 0.0, low_open=True)
    if block_v is not None and (
        isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1)
    ):
        raise ValueError(f"block_v: expected None or a power of two >= 16, got {block_v!r}")
    return logits, input_ids.long().contiguous()


def _per_token(name: str, x, N: int, T: int, device, allow_per_sequence: bool = False) -> torch.Tensor:
    """``x`` as a contiguous float32 ``[N, T]`` tensor (``[N]`` broadcast over T when allowed)."""
    shapes = f"[{N}, {T}]" + (f" or [{N}]" if allow_per_sequence else "")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shapes}, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, logits on {device}; put them on one device")
    if allow_per_sequence and tuple(x.shape) == (N,):
        x = x[:, None].expand(N, T)
    if tuple(x.shape) != (N, T):
        raise ValueError(f"{name}: expected shape {shapes}, got {list(x.shape)}")
    return x.to(torch.float32).contiguous()


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Log-probabilities of ``input_ids`` under ``softmax(logits / temperature)``, without an fp32 logits copy.

    Args:
        logits: float ``[N, T, V]``, any float dtype (read as is, accumulated in fp32).
        input_ids: int ``[N, T]``, ids in ``[0, V)``.
        temperature: the sampling temperature (> 0).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_loss_backend`).
        block_v: Triton only: vocabulary elements read per step (a power of two); None picks by V.
    Returns:
        float32 ``[N, T]``, differentiable with respect to ``logits``.
    """
    logits, input_ids = _check_logits_ids(logits, input_ids, temperature, block_v)
    if resolve_loss_backend(backend, logits.device) == "torch":
        return token_logprobs_reference(logits, input_ids, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _TritonTokenLogprobs.apply(logits, input_ids, float(temperature), block_v)


def grpo_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss with per-token (or per-sequence) advantages, fused over the vocabulary.

    Args:
        logits: float ``[N, T, V]`` (any float dtype) of the policy; ``logits[n, t]`` produced ``input_ids[n, t]``.
        input_ids: int ``[N, T]``: the sampled completion tokens.
        advantages: float ``[N, T]`` per token (e.g. from :func:`ospo_fast.redistribute`) or ``[N]`` per sequence.
        completion_mask: bool or float ``[N, T]``: 1 on completion tokens, 0 on padding (and anything not trained).
        old_logps: float ``[N, T]``: log-probabilities under the sampling policy; None for on-policy (ratio 1).
        ref_logps: float ``[N, T]``: log-probabilities under the reference model, for the KL term; required when
            ``beta != 0``; when given with ``beta == 0`` the KL is only reported in the metrics.
        beta: weight of the k3 KL (>= 0).
        eps_low, eps_high: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]`` (DAPO's clip-higher uses
            eps_high = 0.28).
        loss_type: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"`` (module docstring).
        max_completion_length: the ``dr_grpo`` normaliser; None uses T. Pass the generation limit so the
            normaliser stays constant across batches.
        temperature: the sampling temperature the logits are divided by (> 0).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_loss_backend`).
        block_v: Triton only: vocabulary elements read per step (a power of two); None picks by V.
    Returns:
        ``(loss, metrics)``: a float32 scalar differentiable with respect to ``logits`` (0 for a batch with no
        completion token), and detached float32
        scalars ``clip_ratio``, ``low_clip_ratio``, ``high_clip_ratio`` (fractions of completion tokens whose
        ratio is clipped, as TRL counts them) and, when ``ref_logps`` is given, ``kl`` (mean k3 per token).
    """
    logits, input_ids = _check_logits_ids(logits, input_ids, temperature, block_v)
    N, T, _ = logits.shape
    device = logits.device
    adv = _per_token("advantages", advantages, N, T, device, allow_per_sequence=True)
    mask = _per_token("completion_mask", completion_mask, N, T, device)
    old = None if old_logps is None else _per_token("old_logps", old_logps, N, T, device)
    ref = None if ref_logps is None else _per_token("ref_logps", ref_logps, N, T, device)
    check_choice(loss_type, "loss_type", LOSS_TYPES)
    check_number(beta, "beta", 0.0)
    check_number(eps_high, "eps_high", 0.0)
    check_number(eps_low, "eps_low", 0.0, 1.0, high_open=True)  # the lower clip bound 1 - eps_low stays positive
    if beta != 0 and ref is None:
        raise ValueError(f"ref_logps: beta={beta} weights a KL to the reference model; pass ref_logps [N, T] or beta=0")
    if max_completion_length is None:
        max_completion_length = max(T, 1)
    else:
        check_int(max_completion_length, "max_completion_length", 1, expected="None or a positive int")

    if resolve_loss_backend(backend, device) == "torch":
        logp = token_logprobs_reference(logits, input_ids, temperature)
        # Padding may hold anything (a reference model's log-prob of a pad token, say); inf there would turn
        # `objective * mask` and its gradient into NaN, so masked tokens get neutral inputs (the kernels skip them).
        live, neutral = mask != 0, logp.detach()
        adv = torch.where(live, adv, 0.0)
        old = None if old is None else torch.where(live, old, neutral)
        ref = None if ref is None else torch.where(live, ref, neutral)
        objective, ratio, kl = per_token_objective(logp, adv, old, ref, beta, eps_low, eps_high)
    else:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        objective, _, ratio, kl = _TritonGRPOObjective.apply(
            logits, input_ids, mask, adv, old, ref, float(beta), float(eps_low), float(eps_high),
            float(temperature), block_v,
        )
        kl = kl if ref is not None else None
    loss = reduce_loss(objective, mask, loss_type, max_completion_length)
    return loss, _metrics(ratio, kl, adv, mask, eps_low, eps_high)
