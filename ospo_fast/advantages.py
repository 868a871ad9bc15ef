"""Advantages: GRPO group normalisation, and the redistribution of a response's advantage over its tokens.

The stage between the Owen values and the loss::

    rewards [B*G] --group_advantages--> A [N]                          (N = B*G responses)
    (excess) Owen values of each response's segments + token -> segment maps --spread_credit--> c [N, T]
    redistribute(A, c, completion_mask, mode) --> per-token advantages Â [N, T]  --> ospo_fast.loss.grpo_loss

Design decisions (each is tested in tests/test_advantages.py):

**Which tokens take part.** Only the tokens of the answer's segments (``token_player >= 0``, passed as
``segment_mask``) share out the advantage. Every other completion token (a ``<think>`` block, the answer
tags, punctuation between segments, the end-of-sequence token, anything after the answer) gets exactly the
response's advantage ``A``, as in GRPO: GRPO's advantages sum to 0 over a group at every token, so with
rewards that carry no signal no token class drifts; a redistribution that moved advantage between the
think block and the answer would teach, whatever the task, to write more of one and less of the other.
Among the segment tokens the mean stays ``A`` (so the mean over the whole completion is ``A`` too).

**Token credit.** A segment's credit is spread evenly over its tokens, so a segment's total credit is the
same whatever its token length (:func:`~ospo_fast.token_credit.spread_credit`, the credit stage). Because
credit comes from the token -> player map of the completion itself, it lands on the answer's tokens wherever
the answer starts. The trainers
(:func:`ospo_fast.rollout.attribute_completions`) use as a segment's credit its *excess* Owen value,
:func:`ospo_fast.owen.excess_credit`: the Owen value less the segment's structural share ``w_i`` of
``v(N) - v(empty)``, i.e. its Owen value in the game with v(N) and v(empty) set to 0. The raw Owen value
moves with the response's reward, and so with its advantage, by ``w_i (R - v(empty))``: larger for the
phrases of short sentences, and concentrated on few tokens for short phrases. Under rewards that carry no
signal that made short phrases and one-phrase sentences drift: with phrases of 1, 4, 2 and 3 tokens in
sentences of one and three phrases, the one-token phrase's group sum went to +3.9 (proportional), +1.6
(rank), +2.1 (hybrid). The excess credit does not depend on v(N) or v(empty), sums to 0 over the answer,
and keeps every segment token within noise of 0 there (tested; with skewed rewards, mostly 0 and
sometimes high, within 0.2). What it gives up: in an additive game whose unions differ in size, the
phrases of small unions get less than their Owen value's share (the structure pays them more of v(N)).

**Direction and blame.** Owen values are signed: positive when a segment raised the reward, negative when it
lowered it. Credit is read in the direction of the advantage: ``u_t = sign(A) * c_t`` with ``sign(0) = +1``.
For a response better than its group (A > 0) the tokens that raised the reward get the largest shares of
the positive advantage; for a worse one (A < 0) the tokens that *lowered* the reward get the largest shares
of the negative advantage, so they carry the most blame, and tokens that helped carry the least.

**Shares (proportional, rank, hybrid).** Over the L segment tokens of a response, a share distribution
``w`` (``w_t >= 0``, ``sum w = 1``) and ``Â_t = A * L * w_t``:

* proportional: ``w_t = floor / L + (1 - floor) * max(u_t, 0) / sum_s max(u_s, 0)``;
* rank: the same with ``max(u_t, 0)`` replaced by the rank of ``u_t`` among the response's segment tokens
  (1 = lowest; ties share their average rank), so the highest-credit token gets the largest share;
* hybrid: ``Â_t = A * L * (alpha * w_t + (1 - alpha) / L)`` with the proportional ``w``: alpha = 0 is GRPO,
  alpha = 1 is proportional.

Invariants: the mean of ``Â`` over the segment tokens is exactly ``A``; every share is >= 0, so every
token keeps the sign of ``A``; with ``floor > 0`` every segment token gets at least ``floor / L`` of the
share. A response whose segment tokens all have the same credit (one segment, for instance), no credit in
its advantage's direction, or no segment at all gets ``Â_t = A`` exactly on every token: OSPO is GRPO when
there is nothing to assign.

**The bound (max_share).** The share ``s_t = Â_t / A`` of a token can reach L (a one-token segment holding
all the credit of a long answer). ``max_share`` bounds it: a row whose largest share exceeds it is pulled
towards uniform, ``s <- 1 + lam * (s - 1)`` with the ``lam`` in (0, 1) that brings the largest share down to
``max_share``. That keeps the mean ``A``, the signs and the order of the shares, so it bounds
``|Â_t| <= max_share * |A|`` without the drift a clamp would bring. The default,
:data:`DEFAULT_MAX_SHARE`, was chosen from the shares of ``ospo-fast train`` runs (README, "Which tokens get
credit"). ``clip`` (off by default) also clamps ``Â`` to fixed bounds, applied last, to all completion
tokens: it can break the mean invariant and make a group's token sums non-zero.

**Why there is no potential-based mode.** Potential-based shaping in return-to-go form gives token t the
advantage ``A - Phi(s_t)`` with ``Phi`` a function of the prefix ``s_t`` only; ``Phi`` is then a per-state
baseline and the expected policy gradient is unchanged (``E[grad log pi(a|s)] = 0``). So such shaping can
lower variance but cannot move credit between tokens in expectation, and an Owen value, which depends on
the segments *after* t, is not a function of the prefix: a potential built from Owen values biases the
gradient. (Earlier versions shipped such a mode; it made the end-of-sequence token carry the opposite of the
answer's credit and taught the policy to stop closing its answers.)

**Checks and host synchronisation.** These functions run between the reward and the optimizer step on the
GPU, so they never call ``.item()`` or copy to the host on their own: shapes, dtypes and devices are checked
always; values (NaN or infinite advantages or credit, token -> player indices in range) are checked by
default only for CPU tensors, where it costs nothing. ``check_finite=True`` / ``check_indices=True``
forces the check on the GPU (one synchronisation); ``False`` skips it everywhere.
"""

from __future__ import annotations

import torch

from . import defaults
from ._checks import as_real_tensor
from .defaults import REDISTRIBUTION_MODES
from .token_credit import spread_credit  # noqa: F401  (the credit stage; importable from here as before)

SCALES = defaults.ADVANTAGE_SCALES

#: The default bound on a token's share ``Â_t / A`` (module docstring, "The bound").
DEFAULT_MAX_SHARE = defaults.MAX_SHARE


def _as_float(x, name: str) -> torch.Tensor:
    """``x`` as a real float tensor: float64 stays, other floats and integers become float32."""
    return as_real_tensor(x, name, integers_to=torch.float32)


def _real_number(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# GRPO advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = defaults.ADVANTAGE_SCALE,
                     eps: float = defaults.GROUP_EPS, check_finite: bool | None = None) -> torch.Tensor:
    """GRPO advantages: each reward against its group, ``(R - group mean) / (std + eps)``.

    Args:
        rewards: float ``[B * G]``: ``B`` groups of ``G = group_size`` consecutive responses to one prompt.
        group_size: ``G`` (>= 1).
        scale: ``"group"``: divide by the group's std; ``"batch"``: by the std of all rewards;
            ``"none"``: only centre (Dr. GRPO). Stds are unbiased (``correction=1``), as TRL computes them.
        eps: added to the std (>= 0).
        check_finite: reject NaN or infinite rewards (None: on CPU tensors only, where it costs no sync).
    Returns:
        float ``[B * G]`` (float64 for float64 rewards, else float32). A group whose rewards are all equal
        (a group of one included) gets exactly 0, never NaN: it carries no signal.
    """
    rewards = _as_float(rewards, "rewards")
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards: expected a 1-D tensor [B * G] (groups of group_size consecutive responses), "
            f"got shape {list(rewards.shape)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: length {rewards.numel()} is not a multiple of group_size={group_size}")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    _real_number(eps, "eps", 0.0, float("inf"))
    if check_finite or (check_finite is None and rewards.device.type == "cpu"):
        finite = torch.isfinite(rewards)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()[:5].tolist()
            raise ValueError(f"rewards: NaN or infinite values at responses {bad}; a non-finite reward would make "
                             "its whole group's advantages NaN")
    if group_size == 1 or rewards.numel() == 0:
        return torch.zeros_like(rewards)
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    # Rounding of the mean leaves ~1e-17 in a constant group, and a zero std turns it into ~1e-13 / eps:
    # compare the rewards themselves instead.
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred).reshape(-1)


# ----------------------------------------------------------------------------------------------------
# Redistribution


def _check_redistribution_inputs(advantages, token_credit, completion_mask, segment_mask, check_finite):
    """Validated ``(A [N], c [N, T], mask bool [N, T], segment tokens bool [N, T])`` in one float dtype."""
    advantages = _as_float(advantages, "advantages")
    token_credit = _as_float(token_credit, "token_credit")
    if advantages.dim() != 1:
        raise ValueError(
            f"advantages: expected a 1-D tensor [N] (one per response), got shape {list(advantages.shape)}"
        )
    N = advantages.shape[0]
    if token_credit.dim() != 2 or token_credit.shape[0] != N:
        raise ValueError(f"token_credit: expected shape [N={N}, T], got {list(token_credit.shape)}")
    masks = {"completion_mask": completion_mask}
    if segment_mask is not None:
        masks["segment_mask"] = segment_mask
    for name, x in masks.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a bool or float tensor [N, T], got {type(x).__name__}")
        if x.shape != token_credit.shape:
            raise ValueError(f"{name}: expected the shape of token_credit {list(token_credit.shape)}, "
                             f"got {list(x.shape)}")
    for name, x in (("token_credit", token_credit), *masks.items()):
        if x.device != advantages.device:
            raise ValueError(f"{name}: on {x.device}, advantages on {advantages.device}; put them on one device")
    dtype = torch.promote_types(advantages.dtype, token_credit.dtype)
    advantages, token_credit = advantages.to(dtype), token_credit.to(dtype)
    mask = completion_mask != 0
    segment = mask if segment_mask is None else mask & (segment_mask != 0)
    if check_finite or (check_finite is None and advantages.device.type == "cpu"):
        if not bool(torch.isfinite(advantages).all()):
            bad = (~torch.isfinite(advantages)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"advantages: NaN or infinite values at responses {bad}")
        bad_credit = ~torch.isfinite(token_credit) & segment
        if bool(bad_credit.any()):
            j, t = (int(i) for i in bad_credit.nonzero()[0])
            raise ValueError(f"token_credit: NaN or infinite credit on segment tokens, first at [{j}, {t}]")
    return advantages, token_credit, mask, segment


def _relative_shares(score: torch.Tensor, segment: torch.Tensor, length: torch.Tensor, floor: float) -> torch.Tensor:
    """``L * w_t`` with ``w_t = floor / L + (1 - floor) * score_t / sum(score)`` over the segment tokens.

    Exactly 1 on every token of a row with nothing to assign: ``sum(score) == 0``, or every segment token
    with the same score (``L * score / sum(score)`` would only round to 1).
    """
    score = torch.where(segment, score, torch.zeros_like(score))
    total = score.sum(dim=1, keepdim=True)
    highest = torch.where(segment, score, torch.full_like(score, float("-inf"))).amax(dim=1, keepdim=True)
    lowest = torch.where(segment, score, torch.full_like(score, float("inf"))).amin(dim=1, keepdim=True)
    assigns = (total > 0) & (highest != lowest)
    relative = length * score / torch.where(total > 0, total, torch.ones_like(total))
    shares = 1 + (1 - floor) * (relative - 1)  # floor + (1 - floor) * relative
    return torch.where(assigns, shares, torch.ones_like(shares))


def _average_ranks(u: torch.Tensor, segment: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Rank (1 = lowest) of ``u_t`` among each row's segment tokens, ties sharing their average rank."""
    key = torch.where(segment, u, torch.full_like(u, float("-inf")))  # other tokens sort first, below every one
    ordered = key.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, key.contiguous(), right=False)
    at_or_below = torch.searchsorted(ordered, key.contiguous(), right=True)
    others = segment.shape[1] - length
    return (below + at_or_below + 1).to(u.dtype) / 2 - others


def _bound_shares(shares: torch.Tensor, segment: torch.Tensor, max_share: float) -> torch.Tensor:
    """Each row pulled towards uniform just enough that no segment token's share exceeds ``max_share``."""
    highest = torch.where(segment, shares, torch.zeros_like(shares)).amax(dim=1, keepdim=True)
    excess = highest - 1
    lam = torch.where(highest > max_share,
                      (max_share - 1) / torch.where(excess > 0, excess, torch.ones_like(excess)), 1.0)
    return torch.where(lam < 1, 1 + lam * (shares - 1), shares)


def redistribute(
    advantages: torch.Tensor,
    token_credit: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = defaults.REDISTRIBUTION,
    alpha: float = defaults.ALPHA,
    floor: float = defaults.FLOOR,
    clip: float | tuple[float, float] | None = None,
    check_finite: bool | None = None,
    *,
    segment_mask: torch.Tensor | None = None,
    max_share: float | None = DEFAULT_MAX_SHARE,
) -> torch.Tensor:
    """Per-token advantages from each response's advantage and its tokens' credit.

    Args:
        advantages: float ``[N]``: one advantage per response (e.g. :func:`group_advantages`).
        token_credit: float ``[N, T]``: signed credit of each token (e.g. :func:`spread_credit`).
        completion_mask: bool or float ``[N, T]``: nonzero on the completion tokens that are trained.
        mode: ``"proportional"``, ``"rank"`` or ``"hybrid"`` (module docstring).
        alpha: hybrid only: weight of the proportional shares, in [0, 1].
        floor: the part of the share spread uniformly over the segment tokens, in [0, 1]; with
            ``floor > 0`` no segment token gets zero advantage unless ``A`` is 0.
        clip: None, ``c`` (clamp to ``[-c, c]``) or ``(lo, hi)``, applied last; it can break the mean invariant.
        check_finite: reject NaN or infinite advantages and credit (None: on CPU tensors only).
        segment_mask: bool ``[N, T]``: True on the tokens that belong to a segment (``token_player >= 0``);
            only they share out the advantage, every other completion token gets exactly ``A``. None: every
            completion token counts as a segment token.
        max_share: bound on ``Â_t / A`` (>= 1), kept by pulling a row towards uniform (module docstring);
            None: no bound.
    Returns:
        float ``[N, T]`` (float64 when an input is, else float32), 0 where the mask is 0. Without ``clip``,
        the mean of each row over its segment tokens, and over its completion tokens, is its advantage.
    """
    if mode not in REDISTRIBUTION_MODES:
        hint = " ('potential' was removed: see ospo_fast.advantages)" if mode == "potential" else ""
        raise ValueError(f"mode: expected one of {REDISTRIBUTION_MODES}, got {mode!r}{hint}")
    alpha = _real_number(alpha, "alpha", 0.0, 1.0)
    floor = _real_number(floor, "floor", 0.0, 1.0)
    if max_share is not None:
        max_share = _real_number(max_share, "max_share", 1.0, float("inf"))
    bounds = clip_bounds(clip)
    A, c, mask, segment = _check_redistribution_inputs(advantages, token_credit, completion_mask, segment_mask,
                                                       check_finite)
    length = segment.sum(dim=1, keepdim=True).to(A.dtype)
    u = torch.where(A[:, None] >= 0, c, -c)  # credit in the advantage's direction (sign(0) = +1)
    score = torch.clamp(u, min=0) if mode != "rank" else _average_ranks(u, segment, length)
    shares = _relative_shares(score, segment, length, floor)
    if mode == "hybrid":
        shares = 1 + alpha * (shares - 1)  # alpha * shares + (1 - alpha), exactly 1 where shares are
    if max_share is not None:
        shares = _bound_shares(shares, segment, max_share)
    out = A[:, None] * torch.where(segment, shares, torch.ones_like(shares))
    if bounds is not None:
        out = out.clamp(*bounds)
    return torch.where(mask, out, torch.zeros_like(out))


def clip_bounds(clip) -> tuple[float, float] | None:
    if clip is None:
        return None
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0:
            raise ValueError(f"clip: expected a positive bound c (clamp to [-c, c]), got {clip!r}")
        return -float(clip), float(clip)
    if isinstance(clip, (tuple, list)) and len(clip) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in clip
    ):
        lo, hi = float(clip[0]), float(clip[1])
        if not lo <= hi:
            raise ValueError(f"clip: expected (lo, hi) with lo <= hi, got {clip!r}")
        return lo, hi
    raise ValueError(f"clip: expected None, a positive number or a (lo, hi) pair, got {clip!r}")
