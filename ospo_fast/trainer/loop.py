"""OSPOTrainer: GRPO with Owen-value credit assignment, for Hugging Face causal LMs on one node.

One step::

    prompts --generate G each--> completions --segment--> segments
            --OwenAttributor (one packed reward evaluation)--> v(N) per response and Owen values per segment
            --group_advantages--> A [N] --token_advantages (the credit stage)--> per-token advantages [N, T]
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
a resume must keep the saved config's run-shaping fields (see
:data:`~ospo_fast.trainer.checkpoint.RESUME_MAY_DIFFER`).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..advantages import group_advantages
from ..attribution import OwenAttributor
from ..credit import attribute_completions, completion_offsets, token_advantages
from ..loss import grpo_loss
from ..policy import prompt_text
from ..segment import Segmenter, coalition_text
from .checkpoint import (
    CHECKPOINT,
    METRICS,
    append_json_line,
    atomic_save,
    check_resume_config,
    read_checkpoint,
    rng_states,
    seed_everything,
    set_rng_states,
    truncate_metrics,
)
from .config import OSPOConfig, torch_dtype
from .rollout import Rollout


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
        answer_metrics: ``answer_metrics(texts) -> {name: value}``, task metrics of a step's decoded completions
            logged with the step's metrics (the application passes the answer-format rate); None logs none.
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
        answer_metrics: Callable[[list[str]], dict[str, float]] | None = None,
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
            seed=cfg.seed, encoder_dtype=torch_dtype(cfg.attribution_dtype),
        ) if cfg.mode == "ospo" else None
        self.redistribution = cfg.redistribution_options
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
        self.answer_metrics = answer_metrics
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
    def generate(self, prompt_ids: list[int]) -> Rollout:
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
        return Rollout(prompt_ids=ids, prompt_mask=attention, completion_ids=completion, completion_mask=~after_eos)

    def score(self, rollout: Rollout, prompt_ids: list[int]) -> Rollout:
        """Rewards, advantages and per-token advantages of a rollout (fills them in ``rollout``)."""
        cfg = self.config
        owners = [self.owners[i] for i in prompt_ids for _ in range(cfg.group_size)]
        mask = rollout.completion_mask
        start = time.perf_counter()
        if self.attributor is not None:
            # The shuffled control draws its permutations from (seed, step): a resumed run repeats them.
            permute = np.random.default_rng([cfg.seed, self.step]) if cfg.credit == "shuffled" else None
            credit = attribute_completions(self.tokenizer, rollout.completion_ids, self.attributor, owners,
                                           keep=mask, permute=permute)
            texts = credit.texts
            rewards = credit.full_values  # v(N) of each response's game (v(empty) when it has no segment)
            evaluations = credit.attributions.num_evaluations
        else:
            ids = rollout.completion_ids.masked_fill(~mask, self.tokenizer.pad_token_id)
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
            token_adv = token_advantages(advantages, mask, credit, self.redistribution, groups=cfg.group_size)
            rollout.credit, rollout.token_player = credit.credit, credit.token_player
        rollout.texts, rollout.owners, rollout.rewards, rollout.advantages = texts, owners, rewards, advantages
        rollout.token_advantages, rollout.segment_mask = token_adv, segment_mask
        rollout.attribution_seconds, rollout.num_evaluations = attribution_seconds, evaluations
        return rollout

    # ------------------------------------------------------------------------------------------------
    # Optimisation

    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _completion_logits(self, model, rollout: Rollout, rows: slice) -> torch.Tensor:
        """Logits ``[n, Tc, V]`` that produced each completion token."""
        prompt, completion = rollout.prompt_ids[rows], rollout.completion_ids[rows]
        ids = torch.cat([prompt, completion], dim=1)
        attention = torch.cat([rollout.prompt_mask[rows], rollout.completion_mask[rows].long()], dim=1)
        # Positions as generate() assigns them under left padding.
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        # Only the positions that predict a completion token go through the LM head (a 49k-word vocabulary
        # makes the head a fifth of the model's compute).
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=completion.shape[1] + 1).logits
        return logits[:, :-1]

    @torch.no_grad()
    def _logps(self, model, rollout: Rollout) -> torch.Tensor:
        from ..loss import token_logprobs

        parts = []
        for rows in self._micro_batches(rollout.completion_ids.shape[0]):
            logits = self._completion_logits(model, rollout, rows)
            parts.append(token_logprobs(logits, rollout.completion_ids[rows], self.config.temperature))
        return torch.cat(parts)

    def _micro_batches(self, n: int):
        size = self.config.micro_batch_size
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def _reference_logps(self, rollout: Rollout) -> torch.Tensor | None:
        if self.config.beta <= 0:
            return None
        if self.ref_model is not None:
            return self._logps(self.ref_model, rollout)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._logps(self.model, rollout)

    def optimise(self, rollout: Rollout) -> dict:
        """The policy update(s) on one scored rollout; returns device tensors of loss metrics."""
        cfg = self.config
        n = rollout.completion_ids.shape[0]
        mask = rollout.completion_mask
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
                    logits, rollout.completion_ids[rows], rollout.token_advantages[rows], mask[rows],
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
        lengths = rollout.completion_mask.sum(1).float()
        metrics = {
            "step": self.step,
            "mode": self.config.mode,
            "reward": rollout.rewards.mean().item(),
            "reward_std": rollout.rewards.std().item() if rollout.rewards.numel() > 1 else 0.0,
            "completion_length": lengths.mean().item(),
            **(self.answer_metrics(rollout.texts) if self.answer_metrics is not None else {}),
            "num_evaluations": rollout.num_evaluations,
            "generation_seconds": generation_seconds,
            "attribution_seconds": rollout.attribution_seconds,  # rewards and Owen values
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
            seed_everything(cfg.seed)
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
            "rng": rng_states(),
            "attributor": self.attributor.state_dict() if self.attributor is not None else None,
        }

    def save_checkpoint(self) -> Path:
        """Writes ``output_dir/checkpoint.pt`` atomically (a temporary file renamed over the previous one)."""
        path = self.output_dir / CHECKPOINT
        atomic_save(self.state_dict(), path)
        return path

    def load_checkpoint(self) -> None:
        """Restores everything from ``output_dir/checkpoint.pt`` and drops metrics logged after it. The
        checkpoint's config must agree with this trainer's on everything that shapes the run
        (:data:`~ospo_fast.trainer.checkpoint.RESUME_MAY_DIFFER` lists the fields that may change, such as
        ``max_steps`` to extend a run)."""
        path = self.output_dir / CHECKPOINT
        state = read_checkpoint(path, map_location=self.device)
        check_resume_config(path, state["config"], self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.bit_generator.state = state["data_rng"]
        self.order = list(state["order"])
        self.step = int(state["step"])
        set_rng_states(state["rng"])
        if self.attributor is not None and state.get("attributor") is not None:
            self.attributor.load_state_dict(state["attributor"])  # the sampled plans' orders continue
        truncate_metrics(self.output_dir / METRICS, self.step)


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


def _with_lora(model, lora: dict):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("config.lora needs peft: pip install peft") from None
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
