"""OSPOConfig: everything that shapes a training run, checked field by field when it is built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import defaults
from .._checks import check_choice, check_int, check_number
from ..advantages import Redistribution, clip_bounds
from ..loss import LOSS_BACKENDS, LOSS_TYPES
from ..structure import MAX_PLAYERS

#: Where the credit comes from: the Owen values, or the same values permuted among each response's segments.
CREDITS = ("owen", "shuffled")


@dataclass
class OSPOConfig:
    """Everything that shapes a run. Defaults follow the OSPO paper's reference setting where it has one
    (group size 8, learning rate 5e-6, no KL, at most 64 coalitions per response)."""

    output_dir: str = defaults.OUTPUT_DIR
    mode: str = defaults.TRAINING_MODE  # "ospo" or "grpo"
    redistribution: str = defaults.REDISTRIBUTION  # see ospo_fast.Redistribution and docs/credit.md
    alpha: float = defaults.ALPHA
    floor: float = defaults.FLOOR
    max_share: float | None = defaults.MAX_SHARE  # bound on a token's advantage / its response's
    clip: float | None = None
    segment_weight: float = defaults.SEGMENT_WEIGHT  # redistribution="signed": weight of the segment's advantage
    advantage_scale: str = defaults.ADVANTAGE_SCALE
    group_size: int = defaults.GROUP_SIZE
    prompts_per_step: int = defaults.PROMPTS_PER_STEP
    max_steps: int = defaults.MAX_STEPS
    learning_rate: float = defaults.LEARNING_RATE
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16
    num_iterations: int = 1  # optimisation passes over each generated batch (PPO epochs)
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_p: float = 1.0
    loss_type: str = defaults.LOSS_TYPE
    beta: float = defaults.BETA
    eps_low: float = 0.2
    eps_high: float = 0.2
    attribution_method: str = defaults.ATTRIBUTION_METHOD
    credit: str = "owen"  # "owen", or "shuffled": each response's credit permuted among its segments (a control)
    attribution_budget: int = defaults.BUDGET
    attribution_dtype: str | None = None  # encoder precision: None (float32 on CPU, bfloat16 on CUDA) or a dtype name
    max_players: int = defaults.SEGMENTER_MAX_PLAYERS
    seed: int = defaults.SEED
    save_steps: int = defaults.SAVE_STEPS
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 on CPU
    lora: dict | None = None  # e.g. {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    loss_backend: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.check()

    @property
    def redistribution_options(self) -> Redistribution:
        """The redistribution this config asks for (:class:`~ospo_fast.Redistribution`)."""
        return Redistribution(mode=self.redistribution, alpha=self.alpha, floor=self.floor, clip=self.clip,
                              max_share=self.max_share, segment_weight=self.segment_weight)

    def check(self) -> "OSPOConfig":
        """Validates every field (run at construction, so a bad setting fails before any model is loaded);
        each error names the field and what it accepts."""
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir: expected a non-empty path, got {self.output_dir!r}")
        for name, allowed in (("mode", defaults.TRAINING_MODES), ("redistribution", defaults.REDISTRIBUTION_MODES),
                              ("advantage_scale", defaults.ADVANTAGE_SCALES), ("loss_type", LOSS_TYPES),
                              ("loss_backend", LOSS_BACKENDS), ("attribution_method", defaults.ATTRIBUTION_METHODS),
                              ("credit", CREDITS)):
            check_choice(getattr(self, name), name, allowed)
        for name in ("prompts_per_step", "max_steps", "micro_batch_size", "num_iterations", "max_new_tokens",
                     "save_steps"):
            self._int(name, 1)
        self._int("group_size", 2, expected="an int >= 2 (GRPO needs at least 2 completions per prompt)")
        self._int("attribution_budget", 2, expected="an int >= 2 (a response's game needs at least v(empty) and v(N))")
        self._int("max_players", 1, MAX_PLAYERS)
        self._int("warmup_steps", 0)
        self._int("seed", 0)
        inf = math.inf
        self._number("learning_rate", 0, inf, low_open=True)
        self._number("temperature", 0, inf, low_open=True)
        self._number("max_grad_norm", 0, inf, low_open=True)
        self._number("top_p", 0, 1, low_open=True)
        self._number("weight_decay", 0, inf)
        self._number("beta", 0, inf)
        self._number("eps_low", 0, 1, high_open=True)  # the lower clip bound 1 - eps_low stays positive
        self._number("eps_high", 0, inf)
        self._number("alpha", 0, 1)
        self._number("floor", 0, 1)
        if self.max_share is not None:
            self._number("max_share", 1, inf)
        clip_bounds(self.clip)  # raises naming clip
        self._number("segment_weight", 0, 1)
        torch_dtype(self.attribution_dtype)  # raises naming attribution_dtype
        if self.bf16 not in (None, True, False):
            raise ValueError(f"bf16: expected None, True or False, got {self.bf16!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress: expected True or False, got {self.progress!r}")
        if self.lora is not None and not isinstance(self.lora, dict):
            raise ValueError(f"lora: expected None or a dict of peft LoraConfig arguments, got {self.lora!r}")
        return self

    # A numpy scalar that passes is stored as a Python number, so the config (saved in every checkpoint) stays
    # plain data that loads with weights_only=True.

    def _int(self, name: str, low: int, high: int | None = None, expected: str | None = None) -> None:
        setattr(self, name, check_int(getattr(self, name), name, low, high, expected))

    def _number(self, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
        value = getattr(self, name)
        number = check_number(value, name, low, high, low_open, high_open)
        if type(value) not in (int, float):
            setattr(self, name, number)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The floating torch dtype named by ``attribution_dtype`` (``"bfloat16"``, ``"torch.float16"``), or None."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("attribution_dtype: expected None or a floating torch dtype name like 'bfloat16', "
                         f"got {name!r}")
    return dtype
