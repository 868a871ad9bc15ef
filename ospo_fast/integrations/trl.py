"""OSPO in TRL: ``OSPOGRPOTrainer``, a ``trl.GRPOTrainer`` whose advantages are per token.

    from ospo_fast.integrations.trl import OSPOGRPOTrainer
    trainer = OSPOGRPOTrainer(model, reward_funcs=my_reward, args=GRPOConfig(...), train_dataset=ds)
    trainer.train()

TRL computes its sequence advantages as usual (its reward functions, weights, ``scale_rewards``,
``multi_objective_aggregation``); this trainer then spreads each completion's advantage over its tokens by
the Owen values of the completion's segments (:func:`ospo_fast.redistribute`) and hands TRL's loss a
``[B, T]`` tensor in place of the ``[B]`` one. TRL's ``_compute_loss`` unsqueezes a ``[B]`` advantage to
``[B, 1]`` and uses a ``[B, T]`` one as it is, so every loss type (grpo, dapo, dr_grpo, bnpo, cispo, sapo,
luspo, vespo) and the clipping metrics broadcast per token.

What the attribution game scores (a coalition is the completion reduced to some of its segments):

* by default, TRL's own reward functions, called as TRL calls them (``prompts``, ``completions``,
  ``completion_ids`` and the dataset's other columns as keyword arguments), each coalition with its own
  row's prompt and columns, and weighted by ``args.reward_weights``; the coalition's text is put back
  between the text before the completion's first segment and after its last (think block, answer tags), as
  a one-message assistant turn for conversational prompts. ``log_extra``/``log_metric`` calls made while
  scoring coalitions are dropped, so the completions table shows only real completions. Model-based reward
  functions (``nn.Module``) need ``ospo_reward``.
* ``ospo_reward``: any ospo_fast reward ``reward(texts, owners)`` (e.g.
  :class:`~ospo_fast.rewards.DenseRetrievalReward`, evaluated in one packed encoder forward), with each
  example's owner read from the dataset column ``owner_column``.

Distributed training: TRL gathers the rewards of all processes to normalise them, then keeps each
process's slice of the advantages. The attribution runs after that, on each process's own completions
only; no coalition is evaluated twice and nothing more is communicated.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time

import torch
import trl
from packaging.version import Version
from torch import nn
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from .. import defaults
from ..advantages import Redistribution
from ..attribution import OwenAttributor
from ..credit import attribute_completions, token_advantages
from .common import BatchContext, BatchContextHolder, CompletionReward

__all__ = ["OSPOGRPOTrainer", "MIN_TRL_VERSION"]

# The oldest TRL the trainer is tested with: TRL 1.0-1.2 have no `_tokenizer` (the first step fails), 1.3 is untested.
MIN_TRL_VERSION = "1.4.0"

LIGER_MESSAGE = (
    "use_liger_kernel=True: this TRL ({version}) computes the GRPO loss with Liger's fused loss, which takes one "
    "advantage per sequence ([B]); OSPOGRPOTrainer gives every completion token its own advantage ([B, T]), so "
    "the token credit would be lost. Set use_liger_kernel=False, or use TRL >= 1.14, where Liger only patches "
    "the model's layers and TRL's own loss takes per-token advantages."
)


def check_trl_version(version: str | None = None) -> None:
    """Raises ImportError when the installed TRL (or ``version``) is older than :data:`MIN_TRL_VERSION`."""
    version = trl.__version__ if version is None else version
    if Version(version) < Version(MIN_TRL_VERSION):
        raise ImportError(
            f"trl: OSPOGRPOTrainer needs trl>={MIN_TRL_VERSION}, but trl {version} is installed; "
            "upgrade with pip install 'ospo_fast[trl]'"
        )


def uses_liger_grpo_loss(args) -> bool:
    """Whether TRL would compute the loss with Liger's fused GRPO loss (one advantage per sequence).

    TRL <= 1.13 does so under ``use_liger_kernel`` (``GRPOTrainer.compute_liger_loss``); from 1.14 Liger
    only patches the model's layers and TRL's own loss, which takes per-token advantages, is used.
    """
    return bool(getattr(args, "use_liger_kernel", False)) and hasattr(GRPOTrainer, "compute_liger_loss")


def _ignore(*args, **kwargs) -> None:
    """Stands in for TRL's ``log_extra``/``log_metric`` while coalitions are scored."""


def token_statistics(advantages: torch.Tensor, mask: torch.Tensor, credit) -> dict[str, float]:
    """What the redistribution did to a batch, as TRL metrics (so a run shows OSPO at work).

    Args:
        advantages: float ``[B, T]`` token advantages; mask: bool ``[B, T]``, the trained tokens;
        credit: the batch's :class:`~ospo_fast.credit.CompletionCredit`.
    """
    values = advantages.float()
    count = mask.sum(1)
    rows = count > 0
    mean = (values * mask).sum(1) / count.clamp(min=1)
    spread = ((((values - mean[:, None]) * mask) ** 2).sum(1) / count.clamp(min=1)).sqrt()[rows]
    # Non-uniform: the row's trained tokens differ by more than float noise.
    high = values.masked_fill(~mask, -torch.inf).amax(1)
    low = values.masked_fill(~mask, torch.inf).amin(1)
    nonuniform = (high - low)[rows] > 1e-6 * (1 + mean[rows].abs())
    num = max(len(credit.attributions), 1)
    evaluations = float(credit.attributions.num_evaluations)
    return {
        "ospo/token_advantage_std": spread.mean().item() if spread.numel() else 0.0,
        "ospo/nonuniform_fraction": nonuniform.float().mean().item() if rows.any() else 0.0,
        "ospo/reward_calls_per_completion": evaluations / num,
        "ospo/segments_per_completion": sum(a.segmentation.num_players for a in credit.attributions) / num,
        "ospo/reward_evaluations": evaluations,
    }


class OSPOGRPOTrainer(GRPOTrainer, BatchContextHolder):
    """``trl.GRPOTrainer`` with Owen-value redistribution of each completion's advantage over its tokens.

    Takes every argument of ``GRPOTrainer`` (same names and order up to ``processing_class``; the rest by
    keyword), plus:

    Args:
        ospo_attributor: an :class:`~ospo_fast.OwenAttributor` to use as it is (its reward's owners are read
            from ``owner_column``, unless the reward is a :class:`~ospo_fast.integrations.common.CompletionReward`).
        ospo_reward: the reward of the attribution game, ``reward(texts, owners) -> float [N]``; None scores
            coalitions with TRL's reward functions (module docstring).
        owner_column: the dataset column holding each example's owner index for ``ospo_reward``.
        redistribution: ``"proportional"``, ``"rank"``, ``"hybrid"`` or ``"signed"`` (docs/credit.md). Only
            the tokens of the answer's segments share out a completion's advantage; every other token
            (think block, tags, EOS) gets TRL's advantage unchanged. ``"signed"`` compares each segment with
            the segments of its group of ``num_generations`` completions (one process only: TRL may split a
            group across processes).
        alpha, floor, max_share, clip, segment_weight: see :class:`ospo_fast.Redistribution`.
        attribution_method, attribution_budget: the coalition plan ("auto": exact Owen values when they need
            at most ``attribution_budget`` coalitions per completion, else sampled orders).
        segmenter: cuts completions into segments (default :class:`~ospo_fast.Segmenter`).

    Logs, next to TRL's metrics (this process's completions): ``ospo/token_advantage_std`` (the std of the
    advantages within a completion, averaged over completions; 0 under GRPO), ``ospo/nonuniform_fraction``
    (the share of completions whose tokens got different advantages), ``ospo/reward_calls_per_completion``,
    ``ospo/segments_per_completion``, ``ospo/reward_evaluations`` and ``ospo/attribution_seconds``.

    Raises:
        ImportError: TRL older than :data:`MIN_TRL_VERSION`.
        ValueError: ``args.use_liger_kernel=True`` where TRL uses Liger's fused GRPO loss (TRL <= 1.13); a
            model-based reward function without ``ospo_reward``; a bad redistribution option.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        ospo_attributor: OwenAttributor | None = None,
        ospo_reward=None,
        owner_column: str = "owner",
        redistribution: str = defaults.REDISTRIBUTION,
        alpha: float = defaults.ALPHA,
        floor: float = defaults.FLOOR,
        max_share: float | None = defaults.MAX_SHARE,
        clip: float | tuple[float, float] | None = None,
        segment_weight: float = defaults.SEGMENT_WEIGHT,
        attribution_method: str = defaults.ATTRIBUTION_METHOD,
        attribution_budget: int = defaults.BUDGET,
        segmenter=None,
        **kwargs,
    ):
        check_trl_version()
        if uses_liger_grpo_loss(args):
            raise ValueError(LIGER_MESSAGE.format(version=trl.__version__))
        if ospo_attributor is not None and ospo_reward is not None:
            raise ValueError("ospo_reward: pass either ospo_attributor or ospo_reward, not both")
        # Checked now, with errors naming the options, rather than at the first generation.
        self.ospo_redistribution = Redistribution(mode=redistribution, alpha=alpha, floor=floor, clip=clip,
                                                  max_share=max_share, segment_weight=segment_weight)
        super().__init__(
            model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, **kwargs,
        )
        if ospo_attributor is None:
            if ospo_reward is None:
                self._check_reward_funcs_are_callables()
                ospo_reward = CompletionReward(self._score_rows)
            ospo_attributor = OwenAttributor(
                ospo_reward, segmenter=segmenter, method=attribution_method, budget=attribution_budget,
                seed=self.args.seed,
            )
        self.ospo_attributor = ospo_attributor
        self.owner_column = owner_column
        if self.ospo_redistribution.mode == "signed" and self.accelerator.num_processes > 1:
            raise ValueError("redistribution='signed': compares each segment with the segments of its group, and TRL "
                             f"may split a group over the {self.accelerator.num_processes} processes; run it on one "
                             "process, or use a share mode (proportional, rank, hybrid)")

    def _check_reward_funcs_are_callables(self) -> None:
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, nn.Module):
                raise ValueError(
                    f"reward_funcs: '{name}' is a reward model; coalitions are scored with TRL's reward functions "
                    "only when all are Python functions. Pass ospo_reward=reward(texts, owners) (e.g. "
                    "ospo_fast.rewards.DenseRetrievalReward) and an owner column."
                )

    # ------------------------------------------------------------------------------------------------
    # The two TRL hooks: the batch's context is recorded where TRL scores it, and the advantages are
    # replaced where TRL returns them.

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL calls this with this process's own rows, before gathering: the context of the local game, kept
        # until _generate_and_score_completions has attributed the batch.
        self.set_ospo_batch(BatchContext(rows=inputs, prompts=prompts))
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        """TRL's rollout, then its ``[B]`` advantages replaced by OSPO's ``[B, T]`` ones.

        The output also holds ``sequence_advantages`` (TRL's ``[B]`` advantages): the token mean of
        ``advantages`` over each completion's trained tokens equals it (without ``clip``), and every token
        outside ``segment_mask`` (bool ``[B, T]``, the tokens of the answer's segments) gets it exactly.
        """
        output = super()._generate_and_score_completions(inputs)
        batch = self.ospo_batch
        mode = "train" if self.model.training else "eval"
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:  # tool outputs are not trained; their tokens get no advantage
            mask = mask & output["tool_mask"].bool()
        row_reward = self.ospo_attributor.reward if isinstance(self.ospo_attributor.reward, CompletionReward) else None
        if row_reward is not None:
            owners = list(range(len(batch.rows)))
        else:
            owners = self._owners(batch.rows)
        start = time.perf_counter()
        try:
            credit = attribute_completions(
                self._tokenizer, output["completion_ids"], self.ospo_attributor, owners,
                keep=output["completion_mask"].bool(), reward_scope=row_reward.bind if row_reward else None,
            )
        finally:
            self.set_ospo_batch(None)
        sequence = output["advantages"]
        output["sequence_advantages"] = sequence
        output["segment_mask"] = credit.segment_mask.to(mask.device)  # only these tokens share out the advantage
        output["advantages"] = token_advantages(sequence, mask, credit, self.ospo_redistribution,
                                                groups=self._ospo_group_size(mode, len(batch.rows)))
        self.ospo_last_credit = credit  # the batch's segments, Owen values and token credit, for inspection
        elapsed = time.perf_counter() - start
        for name, value in token_statistics(output["advantages"], mask, credit).items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["ospo/attribution_seconds"].append(elapsed)
        return output

    def _ospo_group_size(self, mode: str, rows: int) -> int | None:
        """The group size the signed mode compares segments within (this process's rows hold whole groups)."""
        if self.ospo_redistribution.mode != "signed":
            return None
        size = self.num_generations if mode == "train" else self.num_generations_eval
        if self.accelerator.num_processes > 1 or rows % size:
            raise ValueError(
                f"redistribution='signed': compares each segment with the segments of its group of {size} "
                f"completions, and this process holds {rows} rows of a batch split over "
                f"{self.accelerator.num_processes} process(es); run it on one process, or use a share mode"
            )
        return size

    # Checkpoints: the attributor's generator is saved and restored with TRL's random states, so a resumed
    # run draws the sampled plans' orders that an uninterrupted one would.

    def _attributor_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"ospo_attributor_{self.args.process_index}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        torch.save(self.ospo_attributor.state_dict(), self._attributor_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and os.path.isfile(self._attributor_state_file(checkpoint)):
            self.ospo_attributor.load_state_dict(torch.load(self._attributor_state_file(checkpoint), weights_only=True))

    def _owners(self, inputs) -> list[int]:
        if any(self.owner_column not in x for x in inputs):
            raise ValueError(
                f"owner_column: the dataset has no column {self.owner_column!r} giving each example's owner "
                f"(pool) index for the attribution reward; columns are {sorted(inputs[0])}"
            )
        return [int(x[self.owner_column]) for x in inputs]

    # ------------------------------------------------------------------------------------------------
    # TRL's reward functions as the game's reward

    def _score_rows(self, completions: list[str], rows: list[int]) -> list[float]:
        """Completion texts scored by TRL's reward functions (weighted sum), text k as a completion of row rows[k]."""
        batch = self.ospo_batch
        inputs, prompts = batch.rows, batch.prompts
        if is_conversational({"prompt": prompts[0]}):
            formatted = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            formatted = list(completions)
        columns = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs = {k: [inputs[r][k] for r in rows] for k in columns}
        kwargs.update(trainer_state=self.state, log_extra=_ignore, log_metric=_ignore)
        if getattr(self, "environments", None) is not None:
            kwargs["environments"] = [self.environments[r] for r in rows]
        completion_ids = self._tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        total = torch.zeros(len(completions), dtype=torch.float64)
        for func, weight in zip(self.reward_funcs, self.reward_weights.tolist()):
            scores = func(
                prompts=[prompts[r] for r in rows], completions=formatted, completion_ids=completion_ids, **kwargs
            )
            if inspect.isawaitable(scores):  # an async reward function: run it on TRL's event loop
                scores = asyncio.run_coroutine_threadsafe(scores, self.async_loop).result()
            scores = torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float64)
            total += weight * scores.nan_to_num(nan=0.0)  # TRL sums the functions that returned a value
        return total.tolist()
