"""Advantages: GRPO group normalisation, and the redistribution of a response's advantage over its tokens.

    rewards [B*G] --group_advantages--> A [N]                         (N = B*G responses)
    A + token credit c [N, T] (ospo_fast.credit) --redistribute--> per-token advantages Â [N, T] --> the loss

Only the tokens of the answer's segments share out ``A``; every other completion token gets exactly ``A``,
as in GRPO. Over the segment tokens, shares ``w`` (>= 0, summing to 1) give ``Â_t = A * L * w_t``: their mean
is ``A``, every token keeps the sign of ``A``, and a response with nothing to assign gets ``A`` on every
token. The shares come from the credit read in the advantage's direction (the tokens that lowered the reward
carry most of a negative advantage), proportionally, by rank, or mixed with uniform; ``max_share`` bounds a
token's share without moving the mean. docs/credit.md gives each decision, its invariant and why (and why
there is no potential-based mode).

These functions run between the reward and the optimizer step on the GPU, so they never read device memory
on the host on their own: values (NaN or infinite inputs) are checked by default only for CPU tensors;
``check_finite=True`` forces the check on the GPU (one synchronisation), ``False`` skips it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import defaults
from ._checks import as_real_tensor, check_choice, check_int, check_number
from .defaults import REDISTRIBUTION_MODES

SCALES = defaults.ADVANTAGE_SCALES

#: The default bound on a token's share ``Â_t / A`` (docs/credit.md, "The bound").
DEFAULT_MAX_SHARE = defaults.MAX_SHARE


def _as_float(x, name: str) -> torch.Tensor:
    """``x`` as a real float tensor: float64 stays, other floats and integers become float32."""
    return as_real_tensor(x, name, integers_to=torch.float32)


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
    group_size = check_int(group_size, "group_size", 1)
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: length {rewards.numel()} is not a multiple of group_size={group_size}")
    check_choice(scale, "scale", SCALES)
    check_number(eps, "eps", 0.0)
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


@dataclass(frozen=True)
class Redistribution:
    """How a response's advantage is shared out over its segment tokens, checked once when built (every error
    names the field). Calling it is :func:`redistribute` with these options.

    Attributes:
        mode: ``"proportional"``, ``"rank"`` or ``"hybrid"`` (the paper's shares: every token keeps its response's
            sign), or ``"signed"``: the token credit is each token's segment advantage ``a`` (its segment's Owen
            value against the segments of its group, :func:`group_segment_advantages`) and a segment token gets
            ``A + segment_weight * (a - A)``, so a segment's own credit can flip its sign (docs/credit.md).
        alpha: hybrid only: weight of the proportional shares, in [0, 1].
        segment_weight: signed only: weight of the segment's own advantage, in [0, 1] (0 is GRPO).
        floor: the part of the share spread uniformly over the segment tokens, in [0, 1]; with ``floor > 0``
            no segment token gets zero advantage unless ``A`` is 0.
        clip: None, ``c`` (clamp to ``[-c, c]``) or ``(lo, hi)``, applied last; it can break the mean invariant.
        max_share: bound on ``Â_t / A`` (>= 1), kept by pulling a row towards uniform; None: no bound.
    """

    mode: str = defaults.REDISTRIBUTION
    alpha: float = defaults.ALPHA
    floor: float = defaults.FLOOR
    clip: float | tuple[float, float] | None = None
    max_share: float | None = DEFAULT_MAX_SHARE
    segment_weight: float = defaults.SEGMENT_WEIGHT

    def __post_init__(self):
        if self.mode not in REDISTRIBUTION_MODES:
            hint = " ('potential' was removed: see docs/credit.md)" if self.mode == "potential" else ""
            raise ValueError(f"mode: expected one of {REDISTRIBUTION_MODES}, got {self.mode!r}{hint}")
        check_number(self.alpha, "alpha", 0.0, 1.0)
        check_number(self.floor, "floor", 0.0, 1.0)
        check_number(self.segment_weight, "segment_weight", 0.0, 1.0)
        if self.max_share is not None:
            check_number(self.max_share, "max_share", 1.0)
        clip_bounds(self.clip)

    def __call__(self, advantages: torch.Tensor, token_credit: torch.Tensor, completion_mask: torch.Tensor,
                 segment_mask: torch.Tensor | None = None, check_finite: bool | None = None) -> torch.Tensor:
        """:func:`redistribute` of these arguments with this object's options."""
        A, c, mask, segment = _check_redistribution_inputs(advantages, token_credit, completion_mask, segment_mask,
                                                           check_finite)
        if self.mode == "signed":
            mixed = A[:, None] + float(self.segment_weight) * (c - A[:, None])
            out = torch.where(segment, mixed, A[:, None].expand_as(c))
            return self._clip_and_mask(out, mask)
        length = segment.sum(dim=1, keepdim=True).to(A.dtype)
        u = torch.where(A[:, None] >= 0, c, -c)  # credit in the advantage's direction (sign(0) = +1)
        score = torch.clamp(u, min=0) if self.mode != "rank" else _average_ranks(u, segment, length)
        shares = _relative_shares(score, segment, length, float(self.floor))
        if self.mode == "hybrid":
            shares = 1 + float(self.alpha) * (shares - 1)  # alpha * shares + (1 - alpha), exactly 1 where shares are
        if self.max_share is not None:
            shares = _bound_shares(shares, segment, float(self.max_share))
        out = A[:, None] * torch.where(segment, shares, torch.ones_like(shares))
        return self._clip_and_mask(out, mask)

    def _clip_and_mask(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bounds = clip_bounds(self.clip)
        if bounds is not None:
            out = out.clamp(*bounds)
        return torch.where(mask, out, torch.zeros_like(out))


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
    segment_weight: float = defaults.SEGMENT_WEIGHT,
) -> torch.Tensor:
    """Per-token advantages from each response's advantage and its tokens' credit.

    Args:
        advantages: float ``[N]``: one advantage per response (e.g. :func:`group_advantages`).
        token_credit: float ``[N, T]``: signed credit of each token (e.g. :func:`ospo_fast.spread_credit`); for
            ``mode="signed"``, each token's segment advantage (:func:`group_segment_advantages`).
        completion_mask: bool or float ``[N, T]``: nonzero on the completion tokens that are trained.
        mode, alpha, floor, clip, max_share, segment_weight: see :class:`Redistribution`.
        check_finite: reject NaN or infinite advantages and credit (None: on CPU tensors only).
        segment_mask: bool ``[N, T]``: True on the tokens that belong to a segment (``token_player >= 0``);
            only they share out the advantage, every other completion token gets exactly ``A``. None: every
            completion token counts as a segment token.
    Returns:
        float ``[N, T]`` (float64 when an input is, else float32), 0 where the mask is 0. Without ``clip``,
        the mean of each row over its segment tokens, and over its completion tokens, is its advantage.
    """
    options = Redistribution(mode=mode, alpha=alpha, floor=floor, clip=clip, max_share=max_share,
                             segment_weight=segment_weight)
    return options(advantages, token_credit, completion_mask, segment_mask=segment_mask, check_finite=check_finite)


def group_segment_advantages(
    worth: list[torch.Tensor], token_player: torch.Tensor, groups, eps: float = defaults.GROUP_EPS,
) -> torch.Tensor:
    """Each segment's advantage against all the segments of its group, on its tokens: the token credit of
    ``mode="signed"``.

    A segment's *worth* is its Owen value scaled to the whole answer, ``x_i = phi_i / w_i`` with ``w_i = 1 / (m
    |U_i|)`` its structural share (:func:`ospo_fast.credit.segment_worth`): what the answer would be worth if all
    its segments were like this one. As a process reward is normalised (DeepSeekMath), every segment of every
    completion of a group is centred and scaled by the mean and (unbiased) std of the group's segments:
    ``a_i = (x_i - mean) / (std + eps)``. A group of one-segment answers gets exactly its GRPO advantages
    (``x = R - v(empty)``); a group whose segments are all worth the same, or with one segment in all, gets 0.

    Args:
        worth: ``N`` float tensors ``[n_j]``, the worth of response j's segments.
        token_player: int ``[N, T]``: each token's segment, -1 outside every segment.
        groups: an int ``G`` (consecutive groups of ``G`` responses) or an int tensor ``[N]`` of group ids.
        eps: added to the std (as :func:`group_advantages`).
    Returns:
        float ``[N, T]`` on ``token_player``'s device: each token's segment advantage, 0 outside segments.
        No host synchronisation.
    """
    N, T = token_player.shape
    device = token_player.device
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in worth) else torch.float32
    counts = torch.tensor([w.numel() for w in worth], dtype=torch.long)
    values = torch.cat([w.to(device=device, dtype=dtype) for w in worth]) if worth else torch.zeros(0, device=device)
    if isinstance(groups, torch.Tensor):
        group_of_response = groups.to(device=device, dtype=torch.long)
        num_groups = N  # an upper bound: ids are taken as given, without reading them on the host
        if group_of_response.shape != (N,):
            raise ValueError(f"groups: expected an int tensor [N={N}] of group ids, got {list(groups.shape)}")
    else:
        size = check_int(groups, "groups", 1, expected="a group size (int >= 1) or an int tensor [N] of group ids")
        if N % size:
            raise ValueError(f"groups: {N} responses are not whole groups of {size}")
        group_of_response = torch.arange(N, device=device) // size
        num_groups = max(N // size, 1)
    group = group_of_response.repeat_interleave(counts.to(device), output_size=values.numel())  # per segment
    n = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(n).index_add_(0, group, values)
    mean = total / n.clamp(min=1)
    centred = values - mean[group]
    var = torch.zeros_like(n).index_add_(0, group, centred * centred) / (n - 1).clamp(min=1)
    a = centred / (var.sqrt()[group] + eps)
    # A group whose segments are all worth the same gets exactly 0 (rounding would leave ~1e-13 / eps).
    low = torch.full_like(n, float("inf")).scatter_reduce_(0, group, values, "amin")
    high = torch.full_like(n, float("-inf")).scatter_reduce_(0, group, values, "amax")
    a = torch.where((low == high)[group], torch.zeros_like(a), a)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
    valid = token_player >= 0
    slot = torch.where(valid, offsets[:-1, None] + token_player.long(), values.numel())
    padded = torch.cat([a, a.new_zeros(1)])
    return padded[slot.reshape(-1)].view(N, T)


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
