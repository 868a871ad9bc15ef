"""Rollout: one step's batch as it passes from generate to score to optimise."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """N = prompts x group size responses. :meth:`OSPOTrainer.generate` fills the first four fields (on the
    model's device); :meth:`OSPOTrainer.score` fills the rest; :meth:`OSPOTrainer.optimise` reads both.

    Tc is the completion width, Tp the (left-padded) prompt width.
    """

    prompt_ids: torch.Tensor  # long [N, Tp], each prompt repeated group-size times
    prompt_mask: torch.Tensor  # long [N, Tp]
    completion_ids: torch.Tensor  # long [N, Tc]
    completion_mask: torch.Tensor  # bool [N, Tc]: tokens up to and including the first end-of-sequence token
    texts: list[str] | None = None  # the decoded completions
    owners: list[int] | None = None  # the reward's pool of each response
    rewards: torch.Tensor | None = None  # float [N]: v(N), the reward of the response reduced to all its segments
    advantages: torch.Tensor | None = None  # float [N]: group advantages
    token_advantages: torch.Tensor | None = None  # float [N, Tc]: what the loss weights each token by
    segment_mask: torch.Tensor | None = None  # bool [N, Tc]: tokens inside a segment (all False in grpo mode)
    credit: torch.Tensor | None = None  # float [N, Tc]: Owen-value credit per token (ospo mode only)
    token_player: torch.Tensor | None = None  # long [N, Tc]: each token's segment, -1 outside (ospo mode only)
    attribution_seconds: float | None = None  # rewards and Owen values
    num_evaluations: int | None = None  # reward evaluations spent
