"""verl's ``"ospo"`` advantage estimator, pure torch: dense token rewards <-> (sequence reward, token credit), verl's
GRPO advantages over ``uid`` groups, and their redistribution by the credit (:func:`ospo_fast.credit.token_advantages`).
The package docstring (:mod:`ospo_fast.integrations.verl`) says how the credit travels."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from ... import defaults
from ...advantages import Redistribution, group_advantages
from ...credit import token_advantages

ESTIMATOR_OPTIONS = dict(
    mode=defaults.REDISTRIBUTION, alpha=defaults.ALPHA, floor=defaults.FLOOR, max_share=defaults.MAX_SHARE, clip=None,
    no_credit="raise",
)


# ----------------------------------------------------------------------------------------------------
# Pure torch: dense token rewards <-> (sequence reward, token credit), and the estimator's core


def last_token_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, L]``: True on each row's last token with a nonzero mask (no True in an empty row)."""
    mask = response_mask.bool()
    return mask & (mask.flip(1).cumsum(1).flip(1) == 1)


def dense_token_rewards(rewards: torch.Tensor, token_credit: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token rewards that sum to each response's reward and carry its credit on the other tokens.

    Args:
        rewards: float ``[B]``: each response's reward R.
        token_credit: float ``[B, L]``: each token's credit; the last response token's entry must be 0
            (:func:`ospo_fast.credit.attribute_completions` with ``reserve_last``).
        response_mask: ``[B, L]``, nonzero on the response tokens.
    Returns:
        float32 ``[B, L]``: ``credit`` on the response tokens, plus ``R - sum(credit)`` on the last one;
        0 off the mask. A row without response tokens is all 0.
    """
    mask = response_mask.bool()
    credit = torch.where(mask, token_credit.float(), torch.zeros_like(token_credit, dtype=torch.float32))
    rest = rewards.float().to(credit.device) - credit.sum(dim=1)
    return credit + last_token_mask(mask) * rest[:, None]


def split_token_rewards(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`dense_token_rewards`: ``(rewards [B], token_credit [B, L])``.

    ``rewards`` is the row sum, as verl's GRPO computes it; the credit is every masked token's reward but
    the last one's.
    """
    mask = response_mask.bool()
    rewards = token_level_rewards.sum(dim=-1)
    credit = torch.where(mask & ~last_token_mask(mask), token_level_rewards, torch.zeros_like(token_level_rewards))
    return rewards, credit


def grpo_sequence_advantages(
    scores: torch.Tensor, index: Sequence, epsilon: float = defaults.VERL_GRPO_EPS, norm_adv_by_std_in_grpo: bool = True
) -> torch.Tensor:
    """verl's GRPO advantage of each response within its group: :func:`ospo_fast.group_advantages` over groups
    in any order and of any sizes.

    Args:
        scores: float ``[B]``: sequence rewards.
        index: ``B`` group ids (any hashable: verl's ``uid`` strings), groups in any order.
        epsilon: added to the group std; verl's own default (:data:`~ospo_fast.defaults.VERL_GRPO_EPS`, 1e-6),
            so that the estimator's sequence advantages are verl's ``grpo``'s, where
            :func:`~ospo_fast.group_advantages` defaults to TRL's 1e-4.
        norm_adv_by_std_in_grpo: divide by the group std (GRPO) or only centre (Dr. GRPO).
    Returns:
        float32 ``[B]``: ``(R - group mean) / (group std + epsilon)`` with the unbiased std; a group of one
        has mean 0 and std 1, as in verl's ``compute_grpo_outcome_advantage``. A group whose rewards are all
        equal gets exactly 0 (verl's loop leaves the rounding of its mean, divided by ``epsilon``).
    """
    if len(index) != scores.shape[0]:
        raise ValueError(f"index: expected {scores.shape[0]} group ids, one per response, got {len(index)}")
    _, group = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    group = group.reshape(-1)
    values = scores.float()
    # A group of one: mean 0 and std 1, as verl has it (group_advantages gives it 0).
    out = values / (1 + epsilon) if norm_adv_by_std_in_grpo else values.clone()
    sizes = np.bincount(group)
    in_order = np.argsort(group, kind="stable")  # each group's rows together, in batch order
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    for size in np.unique(sizes[sizes > 1]).tolist():  # group_advantages takes groups of one size, consecutive
        rows = in_order[sizes[group[in_order]] == size]
        rows = torch.as_tensor(rows, dtype=torch.long, device=scores.device)
        out[rows] = group_advantages(values[rows], size, scale=scale, eps=epsilon, check_finite=False)
    return out


def ospo_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence,
    token_credit: torch.Tensor | None = None,
    epsilon: float = defaults.VERL_GRPO_EPS,
    norm_adv_by_std_in_grpo: bool = True,
    mode: str = defaults.REDISTRIBUTION,
    alpha: float = defaults.ALPHA,
    floor: float = defaults.FLOOR,
    clip: float | tuple[float, float] | None = None,
    max_share: float | None = defaults.MAX_SHARE,
    segment_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token OSPO advantages: verl's GRPO advantage of each response, redistributed by token credit.

    Args:
        token_level_rewards: float ``[B, L]``; the sequence reward is the row sum.
        response_mask: ``[B, L]``, nonzero on the response tokens.
        index: ``B`` group ids.
        token_credit: float ``[B, L]``; None reads it from ``token_level_rewards`` (:func:`split_token_rewards`).
        epsilon, norm_adv_by_std_in_grpo: as verl's GRPO.
        mode, alpha, floor, clip, max_share: see :func:`ospo_fast.redistribute`.
        segment_mask: bool ``[B, L]``, True on the tokens of the answer's segments; None: the tokens that
            carry credit (the dense rewards hold no segment map; a segment token whose credit is exactly 0
            then gets the GRPO advantage, like the think block, the tags and the last token).
    Returns:
        float32 ``[B, L]``, 0 off the mask; without ``clip``, each row's mean over its response tokens is its
        GRPO advantage.
    """
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"token_level_rewards, response_mask: expected two [B, L] tensors of one shape, got "
            f"{list(token_level_rewards.shape)} and {list(response_mask.shape)}"
        )
    scores, credit = split_token_rewards(token_level_rewards, response_mask)
    if token_credit is not None:
        credit = token_credit
    advantages = grpo_sequence_advantages(scores, index, epsilon, norm_adv_by_std_in_grpo)
    if segment_mask is None:
        segment_mask = credit != 0
    redistribution = Redistribution(mode=mode, alpha=alpha, floor=floor, clip=clip, max_share=max_share)
    return token_advantages(advantages, response_mask, credit, redistribution, segment_mask=segment_mask).float()


def _section(config, name: str) -> dict:
    """``config[name]`` as a dict, for a DictConfig, a verl dataclass config, a dict or None."""
    if config is None:
        return {}
    section = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    if section is None:
        return {}
    return {k: section[k] for k in section} if not isinstance(section, dict) else dict(section)


def _options(defaults: dict, given: dict, where: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; expected some of {sorted(defaults)}")
    return {**defaults, **given}


NO_CREDIT_MESSAGE = (
    "algorithm.adv_estimator=ospo: no token credit reached the estimator (every response's reward sits on its "
    "last token), so ospo would compute exactly verl's grpo. The ospo reward manager delivers the credit "
    "(reward.reward_manager.name=ospo, with ospo_fast.integrations.verl registered in every verl process: the "
    "verl.plugins entry point does it); another reward manager, or a verl path that keeps one float per "
    "response, drops it (docs/integrations.md, 'Which verl paths deliver the credit'). To train on anyway, as "
    "grpo with a warning, set +algorithm.ospo.no_credit=warn."
)

# Checked on the estimator's first call in a process: later batches may rightly carry no credit (every
# answer one segment, or equal rewards), the first one of a run where credit flows practically never does.
_credit_checked = False


def _check_credit_arrives(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, no_credit: str) -> None:
    global _credit_checked
    if no_credit not in ("raise", "warn"):
        raise ValueError(f"algorithm.ospo.no_credit: expected 'raise' or 'warn', got {no_credit!r}")
    if _credit_checked:
        return
    _credit_checked = True
    _, credit = split_token_rewards(token_level_rewards, response_mask)
    if bool((credit != 0).any()):
        return
    if no_credit == "raise":
        _credit_checked = False  # a caller that catches it and retries is checked again
        raise RuntimeError(NO_CREDIT_MESSAGE)
    warnings.warn(NO_CREDIT_MESSAGE, RuntimeWarning, stacklevel=3)


def compute_ospo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | None = None,
    epsilon: float = defaults.VERL_GRPO_EPS,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator verl calls for ``algorithm.adv_estimator=ospo``: ``(advantages, returns)``, both ``[B, L]``.

    Options come from ``config`` (verl's ``algorithm`` section): ``norm_adv_by_std_in_grpo`` and the section
    ``ospo`` (``mode``, ``alpha``, ``floor``, ``max_share``, ``clip``; set with ``+algorithm.ospo.mode=rank``;
    and ``no_credit``).

    Raises:
        RuntimeError: on the first call in a process, when no token of the batch carries credit (the reward
            reached the estimator as one number per response) and ``no_credit`` is ``"raise"`` (the default);
            ``no_credit="warn"`` warns once instead and trains as GRPO.
    """
    if index is None:
        raise ValueError("index: the ospo estimator needs the prompt group ids (verl's non_tensor_batch['uid'])")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(config.get("norm_adv_by_std_in_grpo", True)) if config is not None else True
    options = _options(ESTIMATOR_OPTIONS, _section(config, "ospo"), "algorithm.ospo")
    _check_credit_arrives(token_level_rewards, response_mask, options.pop("no_credit"))
    with torch.no_grad():
        advantages = ospo_advantages(
            token_level_rewards, response_mask, index, epsilon=epsilon,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, **options,
        )
    return advantages, advantages
