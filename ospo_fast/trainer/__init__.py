"""The OSPO trainer: GRPO with Owen-value credit per token, for Hugging Face causal LMs on one node.

- :mod:`~ospo_fast.trainer.config`: :class:`OSPOConfig`, everything that shapes a run, checked when built;
- :mod:`~ospo_fast.trainer.rollout`: :class:`Rollout`, one step's batch from generate to score to optimise;
- :mod:`~ospo_fast.trainer.loop`: :class:`OSPOTrainer` (generate, score, optimise, the loop, its state);
- :mod:`~ospo_fast.trainer.checkpoint`: the run folder's checkpoint, random generator states and metrics file.

The trainer knows no task: task metrics of the completions come in as ``OSPOTrainer(answer_metrics=...)``.
"""

from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_KEYS,
    METRICS,
    RESUME_MAY_DIFFER,
    append_json_line,
    check_resume_config,
    read_checkpoint,
    read_metrics,
    resume_conflicts,
)
from .config import CREDITS, OSPOConfig
from .loop import OSPOTrainer
from .rollout import Rollout

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KEYS",
    "CREDITS",
    "METRICS",
    "RESUME_MAY_DIFFER",
    "OSPOConfig",
    "OSPOTrainer",
    "Rollout",
    "append_json_line",
    "check_resume_config",
    "read_checkpoint",
    "read_metrics",
    "resume_conflicts",
]
