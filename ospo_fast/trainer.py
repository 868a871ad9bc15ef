"""OSPOTrainer: GRPO with Owen-value credit assignment, for Hugging Face causal LMs on one node.

One step::

    prompts --generate G each--> completions --segment--> segments
            --OwenAttributor (one packed reward evaluation)--> v(N) per response and Owen values per segment
            --group_advantages--> A [N] --spread_credit + redistribute--> per-token advantages [N, T]
            --grpo_loss (clipped surrogate, optional KL)--> backward --> optimizer step

``mode="grpo"`` runs the same code with every token of a response given its advantage A: the baseline
for every comparison. The sequence reward is the reward of the response reduced to all its segments
(``v(N)`` of the attribution game, ``reward(coalition_text(sg, all))``) in both modes, so OSPO's credit sums
exactly to what GRPO optimises.

Between the rewards and the optimizer step nothing reads device memory on the host: advantages,
redistribution, loss, gradient clipping and the step stay on the device. Checkpoints (model, optimizer,
scheduler, RNG states, data order, step) are written to a temporary file and renamed over the previous one,
so a crash mid-write leaves the previous checkpoint whole; ``resume=True`` continues exactly where it stopped.

Nothing non-finite reaches the weights: a NaN or infinite reward computed on the host stops the step with an
error naming the responses, before any update (rewards left on a GPU are not read back; a non-finite one
makes the loss non-finite); a NaN or infinite loss or gradient skips that update (the fused AdamW leaves
weights and moments as they were, decided on the device), with a ``RuntimeWarning`` and the
``skipped_updates`` metric. Checkpoints hold only tensors and plain data and load with ``weights_only=True``;
a resume must keep the saved config's run-shaping fields (see :data:`RESUME_MAY_DIFFER`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import defaults
from .advantages import Redistribution, clip_bounds, group_advantages
from .attribution import OwenAttributor
from .credit import attribute_completions, completion_offsets, token_advantages
from .data.prompts import follows_format
from .loss import LOSS_BACKENDS, LOSS_TYPES, grpo_loss
from .policy import prompt_text
from .segment import Segmenter, coalition_text
from .structure import MAX_PLAYERS

CHECKPOINT = "checkpoint.pt"
#: Where the credit comes from: the Owen values, or the same values permuted among each response's segments.
CREDITS = ("owen", "shuffled")
METRICS = "metrics.jsonl"


@dataclass
class OSPOConfig:
    """Everything that shapes a run. Defaults follow the OSPO paper's reference setting where it has one
    (group size 8, learning rate 5e-6, no KL, at most 64 coalitions per response)."""

    output_dir: str = defaults.OUTPUT_DIR
    mode: str = defaults.TRAINING_MODE  # "ospo" or "grpo"
    redistribution: str = defaults.REDISTRIBUTION  # see ospo_fast.advantages
    alpha: float = defaults.ALPHA
    floor: float = defaults.FLOOR
    max_share: float | None = defaults.MAX_SHARE  # bound on a token's advantage / its response's
    clip: float | None = None
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

    def check(self) -> "OSPOConfig":
        """Validates every field (run at construction, so a bad setting fails before any model is loaded);
        each error names the field and what it accepts."""
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir: expected a non-empty path, got {self.output_dir!r}")
        _choice(self, "mode", defaults.TRAINING_MODES)
        _choice(self, "redistribution", defaults.REDISTRIBUTION_MODES)
        _choice(self, "advantage_scale", defaults.ADVANTAGE_SCALES)
        _choice(self, "loss_type", LOSS_TYPES)
        _choice(self, "loss_backend", LOSS_BACKENDS)
        _choice(self, "attribution_method", defaults.ATTRIBUTION_METHODS)
        _choice(self, "credit", CREDITS)
        for name in ("group_size", "prompts_per_step", "max_steps", "micro_batch_size", "num_iterations",
                     "max_new_tokens", "save_steps", "max_players"):
            _int_at_least(self, name, 1)
        _int_at_least(self, "group_size", 2, "GRPO needs at least 2 completions per prompt")
        _int_at_least(self, "attribution_budget", 2, "a response's game needs at least v(empty) and v(N)")
        _int_at_least(self, "warmup_steps", 0)
        _int_at_least(self, "seed", 0)
        if self.max_players > MAX_PLAYERS:
            raise ValueError(f"max_players: expected an int in [1, {MAX_PLAYERS}], got {self.max_players!r}")
        inf = math.inf
        _number_in(self, "learning_rate", 0, inf, low_open=True)
        _number_in(self, "temperature", 0, inf, low_open=True)
        _number_in(self, "max_grad_norm", 0, inf, low_open=True)
        _number_in(self, "top_p", 0, 1, low_open=True)
        _number_in(self, "weight_decay", 0, inf)
        _number_in(self, "beta", 0, inf)
        _number_in(self, "eps_low", 0, 1, high_open=True)  # the lower clip bound 1 - eps_low stays positive
        _number_in(self, "eps_high", 0, inf)
        _number_in(self, "alpha", 0, 1)
        _number_in(self, "floor", 0, 1)
        if self.max_share is not None:
            _number_in(self, "max_share", 1, inf)
        clip_bounds(self.clip)  # raises naming clip
        _dtype(self.attribution_dtype)  # raises naming attribution_dtype
        if self.bf16 not in (None, True, False):
            raise ValueError(f"bf16: expected None, True or False, got {self.bf16!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress: expected True or False, got {self.progress!r}")
        if self.lora is not None and not isinstance(self.lora, dict):
            raise ValueError(f"lora: expected None or a dict of peft LoraConfig arguments, got {self.lora!r}")
        return self


def _choice(cfg, name: str, allowed) -> None:
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {getattr(cfg, name)!r}")


def _int_at_least(cfg, name: str, low: int, why: str = "") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name}: expected {kind}" + (f" ({why})" if why else "") + f", got {value!r}")


def _number_in(cfg, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """A finite number (inf only where ``high`` is inf and excluded) in the given interval."""
    value = getattr(cfg, name)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = (("(" if low_open else "[") + f"{low}, "
                    + (f"{high})" if high_open or high == math.inf else f"{high}]"))
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")


class OSPOTrainer:
    """Trains a causal LM with OSPO (or GRPO) against a reward over candidate pools.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer (see :mod:`ospo_fast.policy`).
        reward: a :class:`~ospo_fast.rewards.DenseRetrievalReward` or any ``reward(texts, owners) -> float [N]``.
        prompts: the training prompts (chat message lists or strings).
        owners: ``owners[i]``: the reward's pool (owner) for prompt i.
        config: :class:`OSPOConfig`.
        ref_model: the reference model of the KL term (``beta > 0``); None copies the initial model (or,
            with LoRA, disables the adapters).
        callbacks: functions ``callback(trainer, step, metrics)`` called after each step (evaluation, plots).
    """

    def __init__(
        self,
        model,
        tokenizer,
        reward: Callable,
        prompts: Sequence,
        owners: Sequence[int],
        config: OSPOConfig | None = None,
        ref_model=None,
        callbacks: Sequence[Callable] = (),
    ):
        self.config = (config or OSPOConfig()).check()
        if len(prompts) == 0:
            raise ValueError("prompts: expected at least one prompt")
        if len(owners) != len(prompts):
            raise ValueError(f"owners: expected {len(prompts)}, one per prompt, got {len(owners)}")
        cfg = self.config
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.owners = [int(o) for o in owners]
        self.reward = reward
        self.device = next(model.parameters()).device
        self.use_bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        if cfg.lora:
            model = _with_lora(model, cfg.lora)
        self.model = model
        self.ref_model = ref_model
        if cfg.beta > 0 and ref_model is None and not cfg.lora:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.segmenter = Segmenter(max_players=cfg.max_players)
        self.attributor = OwenAttributor(
            reward, segmenter=self.segmenter, method=cfg.attribution_method, budget=cfg.attribution_budget,
            seed=cfg.seed, encoder_dtype=_dtype(cfg.attribution_dtype),
        ) if cfg.mode == "ospo" else None
        self.redistribution = Redistribution(mode=cfg.redistribution, alpha=cfg.alpha, floor=cfg.floor, clip=cfg.clip,
                                             max_share=cfg.max_share)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The fused AdamW skips an update on the device when told the gradients are not finite (see optimise).
        self.fused_optimizer = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           fused=self.fused_optimizer or None)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.callbacks = list(callbacks)
        self.step = 0
        self.data_rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.order: list[int] = []
        self.output_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------------------------
    # Data order: seeded epochs over the prompts; its state is checkpointed.

    def _next_prompts(self) -> list[int]:
        picked = []
        while len(picked) < self.config.prompts_per_step:
            if not self.order:
                self.order = self.data_rng.permutation(len(self.prompts)).tolist()
            picked.append(self.order.pop())
        return picked

    # ------------------------------------------------------------------------------------------------
    # Rollout: generation, rewards, attribution, token advantages.

    @torch.no_grad()
    def generate(self, prompt_ids: list[int]) -> dict:
        """G sampled completions for each prompt: prompt/completion ids and masks (on the model's device)."""
        cfg, tok = self.config, self.tokenizer
        texts = [prompt_text(tok, self.prompts[i]) for i in prompt_ids]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        ids = enc["input_ids"].repeat_interleave(cfg.group_size, dim=0)
        attention = enc["attention_mask"].repeat_interleave(cfg.group_size, dim=0)
        self.model.eval()
        with self._autocast():
            out = self.model.generate(
                input_ids=ids, attention_mask=attention, do_sample=True, temperature=cfg.temperature,
                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        completion = out[:, ids.shape[1]:]
        # Train on the tokens up to and including the first end-of-sequence token.
        is_eos = completion == tok.eos_token_id
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        completion_mask = ~after_eos
        return dict(prompt_ids=ids, prompt_mask=attention, completion_ids=completion, completion_mask=completion_mask)

    def score(self, rollout: dict, prompt_ids: list[int]) -> dict:
        """Rewards, advantages and per-token advantages of a rollout (adds them to ``rollout``)."""
        cfg = self.config
        owners = [self.owners[i] for i in prompt_ids for _ in range(cfg.group_size)]
        mask = rollout["completion_mask"]
        start = time.perf_counter()
        if self.attributor is not None:
            # The shuffled control draws its permutations from (seed, step): a resumed run repeats them.
            permute = np.random.default_rng([cfg.seed, self.step]) if cfg.credit == "shuffled" else None
            credit = attribute_completions(self.tokenizer, rollout["completion_ids"], self.attributor, owners,
                                           keep=mask, permute=permute)
            texts = credit.texts
            rewards = credit.full_values  # v(N) of each response's game (v(empty) when it has no segment)
            evaluations = credit.attributions.num_evaluations
        else:
            ids = rollout["completion_ids"].masked_fill(~mask, self.tokenizer.pad_token_id)
            texts = [completion_offsets(self.tokenizer, row)[0] for row in ids.tolist()]
            answers = [coalition_text(sg, [True] * sg.num_players) for sg in map(self.segmenter, texts)]
            rewards = torch.as_tensor(self.reward(answers, owners)).reshape(-1)
            evaluations = len(answers)
        attribution_seconds = time.perf_counter() - start
        _check_rewards(rewards, prompt_ids, cfg.group_size)
        rewards = rewards.float().to(self.device)
        advantages = group_advantages(rewards, cfg.group_size, scale=cfg.advantage_scale, check_finite=False)
        if self.attributor is None:
            segment_mask = torch.zeros_like(mask)
            token_adv = token_advantages(advantages, mask, None)
        else:
            segment_mask = credit.segment_mask.to(self.device)  # only these tokens share out the advantage
            token_adv = token_advantages(advantages, mask, credit, self.redistribution)
            rollout.update(credit=credit.credit, token_player=credit.token_player)
        rollout.update(
            texts=texts, owners=owners, rewards=rewards, advantages=advantages, token_advantages=token_adv,
            segment_mask=segment_mask,
            attribution_seconds=attribution_seconds, num_evaluations=evaluations,
        )
        return rollout

    # ------------------------------------------------------------------------------------------------
    # Optimisation

    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _completion_logits(self, model, rollout: dict, rows: slice) -> torch.Tensor:
        """Logits ``[n, Tc, V]`` that produced each completion token."""
        prompt, completion = rollout["prompt_ids"][rows], rollout["completion_ids"][rows]
        ids = torch.cat([prompt, completion], dim=1)
        attention = torch.cat([rollout["prompt_mask"][rows], rollout["completion_mask"][rows].long()], dim=1)
        # Positions as generate() assigns them under left padding.
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        # Only the positions that predict a completion token go through the LM head (a 49k-word vocabulary
        # makes the head a fifth of the model's compute).
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=completion.shape[1] + 1).logits
        return logits[:, :-1]

    @torch.no_grad()
    def _logps(self, model, rollout: dict) -> torch.Tensor:
        from .loss import token_logprobs

        parts = []
        for rows in self._micro_batches(rollout["completion_ids"].shape[0]):
            logits = self._completion_logits(model, rollout, rows)
            parts.append(token_logprobs(logits, rollout["completion_ids"][rows], self.config.temperature))
        return torch.cat(parts)

    def _micro_batches(self, n: int):
        size = self.config.micro_batch_size
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def _reference_logps(self, rollout: dict) -> torch.Tensor | None:
        if self.config.beta <= 0:
            return None
        if self.ref_model is not None:
            return self._logps(self.ref_model, rollout)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._logps(self.model, rollout)

    def optimise(self, rollout: dict) -> dict:
        """The policy update(s) on one scored rollout; returns device tensors of loss metrics."""
        cfg = self.config
        n = rollout["completion_ids"].shape[0]
        mask = rollout["completion_mask"]
        old_logps = self._logps(self.model, rollout) if cfg.num_iterations > 1 else None
        ref_logps = self._reference_logps(rollout)
        total_tokens = mask.sum().clamp(min=1)
        sums: dict[str, torch.Tensor] = {}
        skipped = torch.zeros((), device=self.device)
        self.model.train()
        for _ in range(cfg.num_iterations):
            iteration_loss = torch.zeros((), device=self.device)
            for rows in self._micro_batches(n):
                logits = self._completion_logits(self.model, rollout, rows)
                loss, metrics = grpo_loss(
                    logits, rollout["completion_ids"][rows], rollout["token_advantages"][rows], mask[rows],
                    old_logps=None if old_logps is None else old_logps[rows],
                    ref_logps=None if ref_logps is None else ref_logps[rows], beta=cfg.beta,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, backend=cfg.loss_backend,
                )
                # Weight of this micro-batch in the full batch's loss: by sequences, or by tokens for dapo.
                weight = mask[rows].sum() / total_tokens if cfg.loss_type == "dapo" else (rows.stop - rows.start) / n
                (loss * weight / cfg.num_iterations).backward()
                iteration_loss = iteration_loss + loss.detach().float() * weight
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() * weight / cfg.num_iterations
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            # A non-finite loss or gradient never reaches the weights: the update is skipped (weights and
            # Adam moments untouched), counted in the "skipped_updates" metric and warned about in train_step.
            nonfinite = (~(torch.isfinite(grad_norm) & torch.isfinite(iteration_loss))).float()
            skipped = skipped + nonfinite
            if self.fused_optimizer:
                self.optimizer.found_inf = nonfinite  # read on the device: no host sync
                self.optimizer.step()
            elif not bool(nonfinite):
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = grad_norm
        sums["skipped_updates"] = skipped
        return sums

    # ------------------------------------------------------------------------------------------------
    # The loop, metrics and checkpoints

    def train_step(self) -> dict:
        start = time.perf_counter()
        prompt_ids = self._next_prompts()
        rollout = self.generate(prompt_ids)
        generation_seconds = time.perf_counter() - start
        rollout = self.score(rollout, prompt_ids)
        optimise_start = time.perf_counter()
        loss_metrics = self.optimise(rollout)
        optimise_seconds = time.perf_counter() - optimise_start
        self.step += 1
        # Host reads happen here, after the optimizer step.
        lengths = rollout["completion_mask"].sum(1).float()
        metrics = {
            "step": self.step,
            "mode": self.config.mode,
            "reward": rollout["rewards"].mean().item(),
            "reward_std": rollout["rewards"].std().item() if rollout["rewards"].numel() > 1 else 0.0,
            "completion_length": lengths.mean().item(),
            "format_rate": sum(map(follows_format, rollout["texts"])) / len(rollout["texts"]),
            "num_evaluations": rollout["num_evaluations"],
            "generation_seconds": generation_seconds,
            "attribution_seconds": rollout["attribution_seconds"],  # rewards and Owen values
            "optimise_seconds": optimise_seconds,  # forward and backward passes and the optimizer step
            "lr": self.scheduler.get_last_lr()[0],
            **{k: float(v) for k, v in loss_metrics.items()},
            "step_seconds": time.perf_counter() - start,
        }
        if metrics["skipped_updates"]:
            warnings.warn(f"step {self.step}: the loss or the gradient was NaN or infinite; "
                          f"{metrics['skipped_updates']:.0f} update(s) skipped, the weights are unchanged",
                          RuntimeWarning, stacklevel=2)
        self.last_rollout = rollout
        return metrics

    def train(self, resume: bool = False) -> list[dict]:
        """Runs until ``config.max_steps``; returns the metrics of the steps run now."""
        cfg = self.config
        if resume:
            self.load_checkpoint()  # before the folder is made: resuming nothing leaves no empty folder
        else:
            _seed_everything(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = []
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{cfg.mode} training", unit="step")
        while self.step < cfg.max_steps:
            metrics = self.train_step()
            history.append(metrics)
            append_json_line(self.output_dir / METRICS, metrics)
            for callback in self.callbacks:
                callback(self, self.step, metrics)
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.3f}")
        if bar is not None:
            bar.close()
        return history

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_rng.bit_generator.state,
            "order": list(self.order),
            "rng": _rng_states(),
            "attributor": self.attributor.state_dict() if self.attributor is not None else None,
        }

    def save_checkpoint(self) -> Path:
        """Writes ``output_dir/checkpoint.pt`` atomically (a temporary file renamed over the previous one)."""
        path = self.output_dir / CHECKPOINT
        _atomic_torch_save(self.state_dict(), path)
        return path

    def load_checkpoint(self) -> None:
        """Restores everything from ``output_dir/checkpoint.pt`` and drops metrics logged after it. The
        checkpoint's config must agree with this trainer's on everything that shapes the run
        (:data:`RESUME_MAY_DIFFER` lists the fields that may change, such as ``max_steps`` to extend a run)."""
        path = self.output_dir / CHECKPOINT
        state = read_checkpoint(path, map_location=self.device)
        check_resume_config(path, state["config"], self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.bit_generator.state = state["data_rng"]
        self.order = list(state["order"])
        self.step = int(state["step"])
        _set_rng_states(state["rng"])
        if self.attributor is not None and state.get("attributor") is not None:
            self.attributor.load_state_dict(state["attributor"])  # the sampled plans' orders continue
        _truncate_metrics(self.output_dir / METRICS, self.step)


#: The keys of a checkpoint written by :meth:`OSPOTrainer.save_checkpoint`.
CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "scheduler", "data_rng", "order", "rng", "attributor")
#: Config fields a resumed run may change: where and how long it runs, how often it saves, how it shows
#: progress, and memory or implementation knobs that leave the optimisation itself as it was.
RESUME_MAY_DIFFER = ("output_dir", "max_steps", "save_steps", "progress", "micro_batch_size", "loss_backend")


def read_checkpoint(path, map_location=None, mmap: bool = False) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (tensors and plain data only, so a file
    from elsewhere cannot run code). A missing, empty, truncated, foreign or incomplete file raises an error
    naming the file and what was expected. ``mmap=True`` reads the config without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}; run without --resume first")
    expected = ("expected a checkpoint written by OSPOTrainer.save_checkpoint "
                f"(a dict with keys {list(CHECKPOINT_KEYS)})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[-1].strip() if str(e).strip() else "not a torch checkpoint"
        raise ValueError(f"{path}: holds something other than tensors and plain data, or is not a torch file "
                         f"({reason}); {expected}") from None
    except (EOFError, RuntimeError, OSError) as e:
        size = path.stat().st_size
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot be read ({size} bytes: empty or truncated?): {reason}; {expected}") from None
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state):
        missing = sorted(set(CHECKPOINT_KEYS) - set(state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: incomplete checkpoint (missing {missing}); {expected}")
    return state


def resume_conflicts(saved: dict, given: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, given value) for every config field that shapes the run and differs."""
    return [(name, saved.get(name), value) for name, value in given.items()
            if name not in RESUME_MAY_DIFFER and saved.get(name) != value]


def check_resume_config(path, saved: dict, config: OSPOConfig) -> None:
    """Raises naming the first field where ``config`` would change the run saved at ``path``."""
    conflicts = resume_conflicts(saved, asdict(config))
    if conflicts:
        name, old, new = conflicts[0]
        raise ValueError(f"config.{name}: the run at {path} was saved with {name}={old!r}, this trainer has "
                         f"{new!r}; resume with the saved value (only {', '.join(RESUME_MAY_DIFFER)} may differ)")


# ----------------------------------------------------------------------------------------------------
# Helpers


def _check_rewards(rewards: torch.Tensor, prompt_ids: list[int], group_size: int) -> None:
    """Rewards must be finite: one NaN would turn every advantage of its group, then the weights, into NaN.

    Checked on CPU tensors only, where it costs nothing: on a GPU the check would stall the stream between the
    rewards and the optimizer step, and there the non-finite loss skips the update instead (see optimise).
    """
    if rewards.device.type != "cpu":
        return
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        where = ", ".join(f"{i} (prompt {prompt_ids[i // group_size]}, completion {i % group_size})" for i in bad[:5])
        raise ValueError(f"reward: returned NaN or infinite values {rewards[bad[:5]].tolist()} for responses "
                         f"{where}{' ...' if len(bad) > 5 else ''}; every response needs a finite reward")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("attribution_dtype: expected None or a floating torch dtype name like 'bfloat16', "
                         f"got {name!r}")
    return dtype


def _with_lora(model, lora: dict):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("config.lora needs peft: pip install peft") from None
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_states() -> dict:
    """The global generators' states as tensors and plain data, so checkpoints load with weights_only=True."""
    legacy = np.random.get_state(legacy=False)
    numpy_state = {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])}}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def append_json_line(path: Path, record: dict) -> None:
    """Appends one JSON line in a single write, flushed to disk, so a crash tears at most the last line."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file. A torn last line (a crash mid-append) is dropped; a damaged line
    anywhere else is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # no newline after it: the write that ended here did not finish
                break
            raise ValueError(f"{path}: line {number} is not a JSON object ({line[:80]!r}); expected one JSON "
                             "record per line")
        records.append(record)
    return records


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the metric lines of steps up to ``last_step`` (a resumed run rewrites the later ones) and drops
    a torn last line, so the next append starts on a line of its own."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Supervised warm start


def supervised_warm_start(
    model, tokenizer, prompts: Sequence, targets: Sequence[str], steps: int = defaults.WARM_START_STEPS,
    batch_size: int = 16, learning_rate: float = defaults.WARM_START_LR, seed: int = 0, progress: bool = True,
    bf16: bool = False,
) -> list[float]:
    """A short supervised fine-tune on (prompt, target completion) pairs, so a fresh policy writes the
    answer format before RL starts. Only the completion tokens (and the end-of-sequence token) are trained.
    ``bf16`` runs the forward under bf16 autocast (the weights and the optimizer stay fp32). Returns the loss of
    each step."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"targets: expected one target per prompt ({len(prompts)}), got {len(targets)}")
    device = next(model.parameters()).device
    rng = np.random.Generator(np.random.PCG64(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    examples = []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((p, t))
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="warm start", unit="step")
    model.train()
    for _ in iterator:
        batch = [examples[i] for i in rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, t) in enumerate(batch):
            seq = p + t
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p) : len(seq)] = torch.tensor(t)
            attention[row, : len(seq)] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
