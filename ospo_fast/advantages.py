"""Advantages: GRPO group normalisation, and the redistribution of a response's advantage over its tokens.

The stage between the Owen values and the loss::

    rewards [B*G] --group_advantages--> A [N]                          (N = B*G responses)
    Owen values of each response's segments + token -> segment maps --spread_credit--> c [N, T]
    redistribute(A, c, completion_mask, mode) --> per-token advantages Â [N, T]  --> ospo_fast.loss.grpo_loss

Design decisions (each is tested in tests/test_advantages.py):

**Token credit.** A segment's Owen value is spread evenly over its tokens, so a segment's total credit is its
Owen value whatever its token length. Tokens outside every segment (special tokens, punctuation between
segments, a ``<think>`` block, which the segmenter does not segment) get credit 0: they are neutral, not
forgotten, and they still receive the floor share below. Because credit comes from the token -> player
map of the completion itself, it lands on the answer's tokens wherever the answer starts, after a think
block included (the reference code aligned credit to the first tokens of the completion).

**Direction and blame.** Owen values are signed: positive when a segment raised the reward, negative when it
lowered it. Credit is read in the direction of the advantage: ``u_t = sign(A) * c_t`` with ``sign(0) = +1``.
For a response better than its group (A > 0) the tokens that raised the reward get the largest shares of
the positive advantage; for a worse one (A < 0) the tokens that *lowered* the reward get the largest shares
of the negative advantage, so they carry the most blame, and tokens that helped carry the least.

**Shares (proportional, rank, hybrid).** Over the L completion tokens of a response, a share
distribution ``w`` (``w_t >= 0``, ``sum w = 1``) and ``Â_t = A * L * w_t``:

* proportional: ``w_t = floor / L + (1 - floor) * max(u_t, 0) / sum_s max(u_s, 0)``;
* rank: the same with ``max(u_t, 0)`` replaced by the rank of ``u_t`` among the response's completion
  tokens (1 = lowest; ties share their average rank), so the highest-credit token gets the largest share;
* hybrid: ``Â_t = A * L * (alpha * w_t + (1 - alpha) / L)`` with the proportional ``w``: alpha = 0 is GRPO,
  alpha = 1 is proportional.

Invariants: the token mean of ``Â`` over completion tokens is exactly ``A`` (the GRPO scale); every share
is >= 0, so every completion token keeps the sign of ``A`` (a zero-reward response, below its group's mean,
keeps a negative advantage on every token: the reference code's "potential" factor cancelled it to 0);
with ``floor > 0`` every completion token gets at least ``floor / L`` of the share, so no token is silently
given zero (the reference code's min-max normalisation gave the lowest-credit token 0); a response with no
credit in its advantage's direction (or no segments at all) gets ``w`` uniform, ``Â_t = A``.

**Potential-based shaping (potential).** The potential of the state before completion token t is the
credit emitted so far, in advantage units: ``Phi_t = kappa * sum_{s < t} c_s`` over completion tokens, with
``kappa = |A| / sum_s |c_s|`` (``Phi`` = 0 when there is no credit), and ``Phi`` of the terminal state = 0.
Shaped rewards ``r_t = Phi_{t+1} - Phi_t`` (``= kappa * c_t``) for all but the last completion token, and
``r_{L-1} = 0 - Phi_{L-1}``. They telescope, ``sum_t r_t = Phi(terminal) - Phi_0 = 0``, so the shaped
return differs from the original by a constant (0) and the optimal policy is unchanged (Ng, Harada &
Russell 1999). Per-token advantage: ``Â_t = A + L * r_t``; the factor L puts the shaping on the scale of
the proportional mode (``L * kappa * c_t`` is the proportional share deviation) and keeps the token mean
exactly ``A``. Why ``kappa = |A| / sum |c|`` and not the signed ``A / sum c``: a signed normaliser flips the
sign of every shaped reward when ``sum c`` and ``A`` disagree in sign, and explodes when ``sum c`` is near 0
(signed Owen values can cancel); with ``kappa > 0`` a token that raised the reward always gets a positive
shaped reward, and ``Phi`` over the whole response equals ``A`` exactly when every credit has ``A``'s sign
(the usual case), with ``|Phi| <= |A|`` always. Note what the telescoping implies: the last completion
token carries ``-L * Phi_{L-1}``, a large opposite-sign advantage when the response earned its credit;
this mode keeps the mean, not the sign of each token (``clip`` bounds it).

**Clipping.** ``clip=c`` clamps ``Â`` to ``[-c, c]``, ``clip=(lo, hi)`` to ``[lo, hi]``, applied last, to
completion tokens only. Clipping can break the token-mean invariant; it is off by default.

**Checks and host synchronisation.** These functions run between the reward and the optimizer step on the
GPU, so they never call ``.item()`` or copy to the host on their own: shapes, dtypes and devices are checked
always; values (NaN or infinite advantages or credit, token -> player indices in range) are checked by
default only for CPU tensors, where it costs nothing. ``check_finite=True`` / ``check_indices=True``
forces the check on the GPU (one synchronisation); ``False`` skips it everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import as_real_tensor
from ._device import to_device

SCALES = ("group", "batch", "none")
REDISTRIBUTION_MODES = ("proportional", "rank", "hybrid", "potential")


def _as_float(x, name: str) -> torch.Tensor:
    """``x`` as a real float tensor: float64 stays, other floats and integers become float32."""
    return as_real_tensor(x, name, integers_to=torch.float32)


def _real_number(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# GRPO advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward against its group, ``(R - group mean) / (std + eps)``.

    Args:
        rewards: float ``[B * G]``: ``B`` groups of ``G = group_size`` consecutive responses to one prompt.
        group_size: ``G`` (>= 1).
        scale: ``"group"``: divide by the group's std; ``"batch"``: by the std of all rewards;
            ``"none"``: only centre (Dr. GRPO). Stds are unbiased (``correction=1``), as TRL computes them.
        eps: added to the std (>= 0).
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
# Owen values -> token credit


def spread_credit(
    player_values: Sequence[torch.Tensor] | torch.Tensor,
    token_player: torch.Tensor,
    player_offsets: torch.Tensor | None = None,
    check_indices: bool | None = None,
) -> torch.Tensor:
    """Token credit from the Owen values of each response's segments.

    Args:
        player_values: a list of ``N`` float ``[n_j]`` tensors (the Owen values of response j's segments), or
            a flat float ``[sum n_j]`` tensor with ``player_offsets``.
        token_player: int ``[N, T]``: the player of each completion token, -1 for tokens outside every segment
            (as :func:`ospo_fast.token_player_maps` returns).
        player_offsets: int ``[N + 1]``: response j's values are ``player_values[offsets[j]:offsets[j + 1]]``;
            only with a flat tensor.
        check_indices: check that every index lies in ``[-1, n_j)`` (None: on CPU tensors only; see the
            module docstring).
    Returns:
        float ``[N, T]`` on ``token_player``'s device (float64 when the values are, else float32): each token
        gets its segment's value divided by the segment's token count, so a segment's credit sums to its
        Owen value; tokens with -1 get 0. A segment without any token (e.g. truncated away) contributes nothing.
    """
    if not isinstance(token_player, torch.Tensor):
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {type(token_player).__name__}")
    if token_player.dim() != 2 or token_player.dtype.is_floating_point or token_player.dtype == torch.bool:
        got = f"{token_player.dtype} {list(token_player.shape)}"
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {got}")
    N, T = token_player.shape
    device = token_player.device
    if isinstance(player_values, torch.Tensor):
        if player_offsets is None:
            raise ValueError("player_offsets: required with a flat player_values tensor ([N + 1] start offsets)")
        values = _as_float(player_values, "player_values")
        if values.dim() != 1:
            raise ValueError(
                "player_values: expected a flat [sum n_j] tensor or a list of N tensors, "
                f"got shape {list(values.shape)}"
            )
        offsets = torch.as_tensor(player_offsets)
        if offsets.dim() != 1 or offsets.numel() != N + 1 or offsets.dtype.is_floating_point:
            got = f"{offsets.dtype} {list(offsets.shape)}"
            raise ValueError(f"player_offsets: expected integer [N + 1] = [{N + 1}], got {got}")
        offsets = to_device(offsets.to(torch.long), device)
    else:
        if player_offsets is not None:
            raise ValueError("player_offsets: only with a flat player_values tensor; a list carries its own lengths")
        rows = [_as_float(v, f"player_values[{j}]") for j, v in enumerate(player_values)]
        if len(rows) != N:
            raise ValueError(f"player_values: has {len(rows)} responses, token_player has N={N} rows")
        for j, v in enumerate(rows):
            if v.dim() != 1:
                raise ValueError(f"player_values[{j}]: expected a 1-D tensor [n_j], got shape {list(v.shape)}")
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in rows) else torch.float32
        values = torch.cat([to_device(v.to(dtype), device) for v in rows]) if rows else torch.zeros(0, device=device)
        offsets = to_device(torch.tensor([0] + [v.numel() for v in rows]).cumsum(0), device)  # lengths: from shapes
    values = to_device(values, device)
    P = values.numel()
    if check_indices or (check_indices is None and device.type == "cpu"):
        _check_player_indices(token_player, offsets, P)

    valid = token_player >= 0
    # Tokens outside segments point at an extra slot P holding value 0 (no boolean indexing: it syncs).
    slot = torch.where(valid, offsets[:-1, None] + token_player.long(), P).reshape(-1)
    counts = torch.zeros(P + 1, dtype=values.dtype, device=device)
    counts.index_add_(0, slot, valid.reshape(-1).to(values.dtype))
    padded = torch.cat([values, values.new_zeros(1)])
    return (padded[slot] / counts[slot].clamp(min=1)).view(N, T)


def _check_player_indices(token_player: torch.Tensor, offsets: torch.Tensor, num_values: int) -> None:
    if bool((offsets.diff() < 0).any()) or int(offsets[0]) != 0 or int(offsets[-1]) != num_values:
        raise ValueError(
            f"player_offsets: expected non-decreasing offsets from 0 to len(player_values)={num_values}, "
            f"got {offsets.tolist()}"
        )
    counts = offsets.diff()[:, None]
    bad = (token_player < -1) | (token_player >= counts)
    if bool(bad.any()):
        j, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token_player: entry [{j}, {t}] = {int(token_player[j, t])} is not a player of response {j} "
            f"(it has {int(counts[j, 0])}; -1 marks tokens outside every segment)"
        )


# ----------------------------------------------------------------------------------------------------
# Redistribution


def _check_redistribution_inputs(advantages, token_credit, completion_mask, check_finite):
    """Validated ``(A [N], c [N, T], mask bool [N, T])`` in one float dtype."""
    advantages = _as_float(advantages, "advantages")
    token_credit = _as_float(token_credit, "token_credit")
    if advantages.dim() != 1:
        raise ValueError(
            f"advantages: expected a 1-D tensor [N] (one per response), got shape {list(advantages.shape)}"
        )
    N = advantages.shape[0]
    if token_credit.dim() != 2 or token_credit.shape[0] != N:
        raise ValueError(f"token_credit: expected shape [N={N}, T], got {list(token_credit.shape)}")
    if not isinstance(completion_mask, torch.Tensor):
        got = type(completion_mask).__name__
        raise ValueError(f"completion_mask: expected a bool or float tensor [N, T], got {got}")
    if completion_mask.shape != token_credit.shape:
        raise ValueError(
            f"completion_mask: expected the shape of token_credit {list(token_credit.shape)}, "
            f"got {list(completion_mask.shape)}"
        )
    for name, x in (("token_credit", token_credit), ("completion_mask", completion_mask)):
        if x.device != advantages.device:
            raise ValueError(f"{name}: on {x.device}, advantages on {advantages.device}; put them on one device")
    dtype = torch.promote_types(advantages.dtype, token_credit.dtype)
    advantages, token_credit = advantages.to(dtype), token_credit.to(dtype)
    mask = completion_mask != 0
    if check_finite or (check_finite is None and advantages.device.type == "cpu"):
        if not bool(torch.isfinite(advantages).all()):
            bad = (~torch.isfinite(advantages)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"advantages: NaN or infinite values at responses {bad}")
        bad_credit = ~torch.isfinite(token_credit) & mask
        if bool(bad_credit.any()):
            j, t = (int(i) for i in bad_credit.nonzero()[0])
            raise ValueError(f"token_credit: NaN or infinite credit on completion tokens, first at [{j}, {t}]")
    return advantages, token_credit, mask


def _relative_shares(score: torch.Tensor, mask: torch.Tensor, length: torch.Tensor, floor: float) -> torch.Tensor:
    """``L * w_t`` with ``w_t = floor / L + (1 - floor) * score_t / sum(score)``; 1 where ``sum(score) == 0``.

    Scaled by L so a response without credit gets exactly 1 (``A * L * (1 / L)`` would round).
    """
    score = torch.where(mask, score, torch.zeros_like(score))
    total = score.sum(dim=1, keepdim=True)
    relative = length * score / torch.where(total > 0, total, torch.ones_like(total))
    # floor + (1 - floor) * relative, written so that equal scores (relative exactly 1) give exactly 1
    shares = 1 + (1 - floor) * (relative - 1)
    return torch.where(total > 0, shares, torch.ones_like(shares))


def _average_ranks(u: torch.Tensor, mask: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Rank (1 = lowest) of ``u_t`` among each row's completion tokens, ties sharing their average rank."""
    key = torch.where(mask, u, torch.full_like(u, float("-inf")))  # padding sorts first, below every token
    ordered = key.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, key.contiguous(), right=False)
    at_or_below = torch.searchsorted(ordered, key.contiguous(), right=True)
    padding = mask.shape[1] - length
    return (below + at_or_below + 1).to(u.dtype) / 2 - padding


def potential_shaping(
    advantages: torch.Tensor,
    token_credit: torch.Tensor,
    completion_mask: torch.Tensor,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Potential and shaped per-token rewards (module docstring, "Potential-based shaping").

    Args:
        advantages: float ``[N]``; token_credit: float ``[N, T]``; completion_mask: bool or float ``[N, T]``.
    Returns:
        ``(phi, r)``, float ``[N, T]``, 0 off the completion tokens: ``phi[j, t]`` is the potential of the state
        before completion token t, ``r[j, t]`` the shaped reward of emitting it; ``sum_t r[j, t] = 0``.
    """
    A, c, mask = _check_redistribution_inputs(advantages, token_credit, completion_mask, check_finite)
    return _potential(A, c, mask)


def _potential(A: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros_like(c)
    c = torch.where(mask, c, zero)
    total = c.abs().sum(dim=1)
    kappa = torch.where(total > 0, A.abs() / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(A))
    emitted_before = c.cumsum(dim=1) - c
    phi = torch.where(mask, kappa[:, None] * emitted_before, zero)
    # The last completion token: no completion token after it; its successor is the terminal state (phi 0).
    last = mask & (mask.flip(1).cumsum(1).flip(1) == 1)
    r = torch.where(last, -phi, kappa[:, None] * c)
    return phi, torch.where(mask, r, zero)


def redistribute(
    advantages: torch.Tensor,
    token_credit: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = "proportional",
    alpha: float = 0.5,
    floor: float = 0.1,
    clip: float | tuple[float, float] | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Per-token advantages from each response's advantage and its tokens' credit.

    Args:
        advantages: float ``[N]``: one advantage per response (e.g. :func:`group_advantages`).
        token_credit: float ``[N, T]``: signed credit of each token (e.g. :func:`spread_credit`).
        completion_mask: bool or float ``[N, T]``: nonzero on the completion tokens that are trained.
        mode: ``"proportional"``, ``"rank"``, ``"hybrid"`` or ``"potential"`` (module docstring).
        alpha: hybrid only: weight of the proportional shares, in [0, 1].
        floor: proportional, rank and hybrid: the part of the share spread uniformly, in [0, 1]; with
            ``floor > 0`` no completion token gets zero advantage unless ``A`` is 0.
        clip: None, ``c`` (clamp to ``[-c, c]``) or ``(lo, hi)``, applied last; it can break the mean invariant.
        check_finite: reject NaN or infinite advantages and credit (None: on CPU tensors only).
    Returns:
        float ``[N, T]`` (float64 when an input is, else float32), 0 where the mask is 0. Without ``clip``,
        the mean of each row over its completion tokens is its advantage.
    """
    if mode not in REDISTRIBUTION_MODES:
        raise ValueError(f"mode: expected one of {REDISTRIBUTION_MODES}, got {mode!r}")
    alpha = _real_number(alpha, "alpha", 0.0, 1.0)
    floor = _real_number(floor, "floor", 0.0, 1.0)
    bounds = _clip_bounds(clip)
    A, c, mask = _check_redistribution_inputs(advantages, token_credit, completion_mask, check_finite)
    length = mask.sum(dim=1, keepdim=True).to(A.dtype)
    if mode == "potential":
        out = A[:, None] + length * _potential(A, c, mask)[1]
    else:
        u = torch.where(A[:, None] >= 0, c, -c)  # credit in the advantage's direction (sign(0) = +1)
        score = torch.clamp(u, min=0) if mode != "rank" else _average_ranks(u, mask, length)
        shares = _relative_shares(score, mask, length, floor)
        if mode == "hybrid":
            shares = alpha * shares + (1 - alpha)
        out = A[:, None] * shares
    if bounds is not None:
        out = out.clamp(*bounds)
    return torch.where(mask, out, torch.zeros_like(out))


def _clip_bounds(clip) -> tuple[float, float] | None:
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
