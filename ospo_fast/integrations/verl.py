"""OSPO in verl: the ``"ospo"`` advantage estimator and the ``"ospo"`` reward manager.

How token credit travels from the reward to the advantages. verl calls an advantage estimator with the
batch's ``token_level_rewards`` ``[B, L]``, ``response_mask`` ``[B, L]``, the group ids ``index`` (the
prompt ``uid``) and the algorithm ``config``; nothing else from the batch reaches it (verl 0.9.1,
``compute_advantage`` in ``verl/trainer/ppo/ray_trainer.py``). So the OSPO reward manager writes a *dense*
token reward that carries both the sequence reward and the Owen-value credit:

    r[j, t] = credit[j, t]                               for the response's tokens before the last one
    r[j, last] = R_j - sum_t credit[j, t]                 the last response token carries the rest

so ``sum_t r[j, t] = R_j``, the reward verl's GRPO would see (every estimator that sums the token rewards
still works, and verl logs the same scores). The segment that owns the last token spreads its Owen value
over its other tokens, so no credit is lost there. The ``"ospo"`` estimator splits ``r`` back into ``R``
(the sum) and the credit (every token but the last), computes verl's GRPO advantage of ``R`` within each
``uid`` group, and redistributes it over the tokens that carry credit with :func:`ospo_fast.redistribute`
(every other token, the last one included, keeps the GRPO advantage). A reward that puts one scalar on the
last token (any other reward manager) has no credit: the estimator would give every token the GRPO
advantage, exactly verl's ``"grpo"``, so it refuses such a first batch (``no_credit``). With
``algorithm.use_kl_in_reward`` the per-token KL penalty is part of ``r``, of the sequence reward and of the
credit, as it is for verl's estimators.

The reward manager scores a response with verl's ``compute_score(data_source, solution_str, ground_truth,
extra_info)`` (the custom reward function, or verl's default), and evaluates the attribution game with the
same function: a coalition is the response reduced to some of its segments, put back between the text
before its first segment and after its last (think block, answer tags), and scored with its own row's
ground truth and extra info.

Two reward-manager APIs exist in verl; both are registered under ``"ospo"``:

* :class:`OSPORewardManager` (``verl.workers.reward_manager``): ``manager(data) -> reward_tensor [B, L]``,
  the whole batch attributed in one evaluation; the dense tensor is used as it is.
* :class:`OSPORewardLoopManager` (``verl.experimental.reward_loop``, verl >= 0.7): ``run_single`` scores one
  response; its ``reward_score`` is a float (the sequence reward) that also carries the dense token rewards,
  and :meth:`assemble_rm_scores` writes them when verl assembles ``rm_scores`` for a batch. verl's agent-loop
  streaming reward path would place one float per response on its last token; :func:`register` wraps it to
  write the dense token rewards instead (see docs/integrations.md). Where no credit arrives all the same,
  the ``"ospo"`` estimator raises at its first step rather than silently computing GRPO.

verl is imported only when this module registers with it (at import, when verl is installed); the
pure-torch functions (:func:`ospo_advantages`, :func:`dense_token_rewards`, :func:`split_token_rewards`,
:func:`grpo_sequence_advantages`) need only torch.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import defaults
from ..advantages import Redistribution, group_advantages
from ..attribution import OwenAttributor
from ..credit import attribute_completions, token_advantages
from ..segment import Segmenter
from .common import BatchContext, BatchContextHolder, CompletionReward

# OSPORewardManager and OSPORewardLoopManager subclass verl's classes: module attributes built on first
# access (they need verl), so they are left out of __all__.
__all__ = [
    "TokenRewards",
    "build_attributor",
    "compute_ospo_advantage",
    "dense_token_rewards",
    "grpo_sequence_advantages",
    "last_token_mask",
    "ospo_advantages",
    "register",
    "score_responses",
    "split_token_rewards",
]

ESTIMATOR_OPTIONS = dict(
    mode=defaults.REDISTRIBUTION, alpha=defaults.ALPHA, floor=defaults.FLOOR, max_share=defaults.MAX_SHARE, clip=None,
    no_credit="raise",
)
ATTRIBUTION_OPTIONS = dict(method=defaults.ATTRIBUTION_METHOD, budget=defaults.BUDGET, seed=defaults.SEED,
                           max_players=defaults.SEGMENTER_MAX_PLAYERS)


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


# ----------------------------------------------------------------------------------------------------
# Scoring responses: verl's compute_score as the attribution game's reward


def _score_value(result) -> float:
    """verl's compute_score returns a number or a dict with "score"."""
    return float(result["score"]) if isinstance(result, dict) else float(result)


class _VerlRows(BatchContextHolder):
    """verl's ``compute_score`` over the rows of one batch; the batch's :class:`BatchContext` holds each row's
    ``compute_score`` arguments (the context of each row's game)."""

    def __init__(self, compute_score: Callable):
        self.compute_score = compute_score

    def __call__(self, texts: list[str], rows: list[int]) -> list[float]:
        context = self.ospo_batch.rows
        return [_score_value(self.compute_score(solution_str=t, **context[r])) for t, r in zip(texts, rows)]


def build_attributor(score_rows: Callable, options: dict | None = None) -> OwenAttributor:
    """An attributor over a :class:`CompletionReward` of ``score_rows``; options: ``method``, ``budget``,
    ``seed``, ``max_players`` (``+reward.ospo.budget=128`` in verl's config)."""
    opts = _options(ATTRIBUTION_OPTIONS, dict(options or {}), "reward.ospo")
    return OwenAttributor(
        CompletionReward(score_rows), segmenter=Segmenter(max_players=opts["max_players"]), method=opts["method"],
        budget=opts["budget"], seed=opts["seed"],
    )


def score_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, attributor: OwenAttributor):
    """Sequence rewards and dense OSPO token rewards of a batch of responses.

    Args:
        tokenizer: the policy's tokenizer.
        response_ids: int ``[B, L]``; response_mask: ``[B, L]``, nonzero on each response's valid tokens.
        attributor: from :func:`build_attributor` (its reward scores row j's texts in row j's context).
    Returns:
        ``(rewards float32 [B], token_rewards float32 [B, L], credit)``: the reward of each whole response,
        its :func:`dense_token_rewards`, and the :class:`~ospo_fast.credit.CompletionCredit`.
    """
    reward = attributor.reward
    mask = response_mask.bool()
    rows = list(range(response_ids.shape[0]))
    credit = attribute_completions(
        tokenizer, response_ids, attributor, rows, keep=mask, reserve_last=last_token_mask(mask),
        reward_scope=reward.bind,
    )
    # The reward of each whole response, as verl's own reward managers compute it (with framed coalitions the
    # game's v(N) is the same number; an unframed reward would score the answer alone).
    rewards = torch.tensor(reward.score_rows(credit.texts, rows), dtype=torch.float32)
    return rewards, dense_token_rewards(rewards, credit.credit.cpu(), mask.cpu()), credit


def _row_context(non_tensor_batch: dict, i: int, reward_fn_key: str) -> dict:
    reward_model = non_tensor_batch.get("reward_model")
    extra_info = non_tensor_batch.get("extra_info")
    return dict(
        data_source=non_tensor_batch[reward_fn_key][i] if reward_fn_key in non_tensor_batch else None,
        ground_truth=reward_model[i].get("ground_truth") if reward_model is not None else None,
        extra_info=dict(extra_info[i] or {}) if extra_info is not None else {},
    )


class TokenRewards(float):
    """A response's reward that also carries its dense token rewards.

    The reward loop's ``run_single`` must return one number per response (``reward_score``); verl paths
    that treat it as a float keep working (they see R), and :meth:`OSPORewardLoopManager.assemble_rm_scores`
    reads ``token_rewards`` when it assembles a batch.
    """

    def __new__(cls, value: float, token_rewards: Sequence[float]):
        obj = super().__new__(cls, value)
        obj.token_rewards = [float(x) for x in token_rewards]
        return obj

    def __reduce__(self):  # Ray moves it between processes
        return TokenRewards, (float(self), self.token_rewards)


# ----------------------------------------------------------------------------------------------------
# verl classes, defined on first use (they subclass verl's base classes)

_CLASSES: dict[str, type] = {}


def _verl_classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    from verl.workers.reward_manager.abstract import AbstractRewardManager

    class OSPORewardManager(AbstractRewardManager):
        """verl reward manager (``reward_manager=ospo``): dense OSPO token rewards for a whole batch.

        Args:
            tokenizer: the policy's tokenizer.
            num_examine: responses to print per data source (as verl's naive manager).
            compute_score: ``compute_score(data_source, solution_str, ground_truth, extra_info)``; None uses
                verl's default.
            reward_fn_key: the non-tensor column naming the data source.
            ospo: attribution options (``method``, ``budget``, ``seed``, ``max_players``).
        """

        def __init__(
            self, tokenizer, num_examine=0, compute_score=None, reward_fn_key="data_source", ospo=None, **kwargs
        ):
            if compute_score is None:
                from verl.utils.reward_score import default_compute_score as compute_score
            self.tokenizer = tokenizer
            self.num_examine = num_examine
            self.reward_fn_key = reward_fn_key
            self.rows = _VerlRows(compute_score)
            self.attributor = build_attributor(self.rows, ospo)

        def __call__(self, data, return_dict: bool = False):
            prompt_length = data.batch["prompts"].shape[-1]
            response_mask = data.batch["attention_mask"][:, prompt_length:]
            rows = [_row_context(data.non_tensor_batch, i, self.reward_fn_key) for i in range(len(data))]
            with self.rows.ospo_batch_scope(BatchContext(rows=rows)):
                rewards, token_rewards, credit = score_responses(
                    self.tokenizer, data.batch["responses"], response_mask, self.attributor
                )
            for text in credit.texts[: self.num_examine]:
                print("[response]", text)
            if not return_dict:
                return token_rewards
            info = {
                "score": rewards.tolist(),
                "ospo_num_segments": [a.segmentation.num_players for a in credit.attributions],
            }
            return {"reward_tensor": token_rewards, "reward_extra_info": info}

    _CLASSES["OSPORewardManager"] = OSPORewardManager
    try:
        from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
    except ImportError:  # verl before the reward loop (< 0.7): the batch manager only
        RewardManagerBase = None

    if RewardManagerBase is not None:

        class OSPORewardLoopManager(RewardManagerBase):
            """verl reward-loop manager (``reward.reward_manager.name=ospo``): one response per ``run_single``.

            Attribution options come from the config section ``reward.ospo`` (``+reward.ospo.budget=128``).
            """

            def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                         reward_model_tokenizer=None):
                super().__init__(config, tokenizer, compute_score)
                if compute_score is None:
                    from verl.utils.reward_score import default_compute_score as compute_score
                self.compute_score = compute_score
                reward_config = config.get("reward", None) if config is not None else None
                self.ospo_options = _section(reward_config, "ospo")
                _options(ATTRIBUTION_OPTIONS, self.ospo_options, "reward.ospo")  # checks them once, here

            async def run_single(self, data) -> dict:
                data = data[-1:]  # multi-sequence outputs: the last sequence is the response
                return await self.loop.run_in_executor(None, lambda: self._score_one(data))

            def _score_one(self, data) -> dict:
                item = data[0]
                response_ids = item.batch["responses"]
                response_mask = item.batch["attention_mask"][-response_ids.shape[-1] :]
                # Calls run concurrently in executor threads: each gets its own row context and attributor.
                rows = _VerlRows(self.compute_score)
                with rows.ospo_batch_scope(BatchContext(rows=[_row_context(data.non_tensor_batch, 0, "data_source")])):
                    rewards, token_rewards, credit = score_responses(
                        self.tokenizer, response_ids[None], response_mask[None],
                        build_attributor(rows, self.ospo_options),
                    )
                valid = int(response_mask.sum())
                score = TokenRewards(float(rewards[0]), token_rewards[0, :valid].tolist())
                info = {"acc": float(rewards[0]), "ospo_num_segments": credit.attributions[0].segmentation.num_players}
                return {"reward_score": score, "reward_extra_info": info}

            @classmethod
            def assemble_rm_scores(cls, data, scores) -> torch.Tensor:
                """``rm_scores [B, L]``: the dense token rewards when every score carries them."""
                if not all(isinstance(s, TokenRewards) for s in scores):
                    return super().assemble_rm_scores(data, scores)
                rm_scores = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
                for i, s in enumerate(scores):
                    rm_scores[i, : len(s.token_rewards)] = torch.tensor(s.token_rewards)
                return rm_scores

        _CLASSES["OSPORewardLoopManager"] = OSPORewardLoopManager
    for name, cls in _CLASSES.items():  # importable (and picklable by reference) as module attributes
        cls.__module__, cls.__qualname__ = __name__, name
    return _CLASSES


# ----------------------------------------------------------------------------------------------------
# Delivering the token rewards through verl's agent loop

# verl 0.9's agent loop turns each response's ``reward_score`` into ``rm_scores`` with the whole reward on the
# last token, the only route from a rule-based reward to the estimator. These wrappers write the dense token
# rewards a TokenRewards carries instead; any other score is left as verl writes it.


def _dense_row(score: TokenRewards, row: torch.Tensor) -> torch.Tensor:
    """``row`` (a response's rm_scores) with the token rewards written from its first token."""
    out = torch.zeros_like(row)
    n = min(len(score.token_rewards), row.shape[-1])
    out[:n] = torch.tensor(score.token_rewards[:n], dtype=row.dtype)
    return out


def _install_token_reward_delivery() -> None:
    """Wraps the agent loop's output assembly (idempotent): ``AgentLoopOutput.as_dict`` (the v1 trainer,
    ``trainer.use_v1=True``, verl's default) and ``AgentLoopWorker`` post-processing (the legacy trainer)."""
    try:
        from verl.experimental.agent_loop import agent_loop
    except ImportError:  # verl without the agent loop: the batch reward manager's tensor is used as it is
        return
    if getattr(agent_loop.AgentLoopOutput.as_dict, "_ospo_dense", False):
        return

    as_dict = agent_loop.AgentLoopOutput.as_dict

    def dense_as_dict(self):
        score = self.reward_score
        output = as_dict(self)
        if isinstance(score, TokenRewards) and "rm_scores" in output:
            output["rm_scores"] = _dense_row(score, output["rm_scores"])
        return output

    worker = agent_loop.AgentLoopWorker
    agent_loop_postprocess, postprocess = worker._agent_loop_postprocess, worker._postprocess

    async def keep_token_rewards(self, output, *args, **kwargs):
        # The padded output is a validated pydantic model, which turns the TokenRewards into a plain float.
        internal = await agent_loop_postprocess(self, output, *args, **kwargs)
        if isinstance(output.reward_score, TokenRewards):
            internal.reward_score = output.reward_score
        return internal

    def dense_postprocess(self, inputs, *args, **kwargs):
        data = postprocess(self, inputs, *args, **kwargs)
        if "rm_scores" in data.batch.keys() and all(isinstance(x.reward_score, TokenRewards) for x in inputs):
            rm_scores = data.batch["rm_scores"]
            for i, x in enumerate(inputs):  # responses are right-padded
                rm_scores[i] = _dense_row(x.reward_score, rm_scores[i])
        return data

    for wrapper in (dense_as_dict, keep_token_rewards, dense_postprocess):
        wrapper._ospo_dense = True
    agent_loop.AgentLoopOutput.as_dict = dense_as_dict
    worker._agent_loop_postprocess, worker._postprocess = keep_token_rewards, dense_postprocess


def __getattr__(name: str):
    if name in ("OSPORewardManager", "OSPORewardLoopManager"):
        classes = _verl_classes()
        if name in classes:
            return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the ``"ospo"`` advantage estimator and reward managers with verl (idempotent).

    Also makes verl's agent loop deliver the dense token rewards to the estimator (they would otherwise
    arrive as one float per response). Runs at import when verl is installed, and verl imports this module
    in every process that imports verl through the ``verl.plugins`` entry point that ospo_fast declares
    (unless ``VERL_USE_EXTERNAL_PLUGINS=none``); otherwise call it yourself or name the module in
    ``VERL_USE_EXTERNAL_MODULES``.
    """
    from verl.trainer.ppo import core_algos
    from verl.workers.reward_manager import registry

    classes = _verl_classes()
    if core_algos.ADV_ESTIMATOR_REGISTRY.get("ospo") is not compute_ospo_advantage:
        core_algos.register_adv_est("ospo")(compute_ospo_advantage)
    if registry.REWARD_MANAGER_REGISTRY.get("ospo") is not classes["OSPORewardManager"]:
        registry.register("ospo")(classes["OSPORewardManager"])
    if "OSPORewardLoopManager" in classes:
        from verl.experimental.reward_loop.reward_manager import registry as loop_registry

        if loop_registry.REWARD_MANAGER.get("ospo") is not classes["OSPORewardLoopManager"]:
            loop_registry.register("ospo")(classes["OSPORewardLoopManager"])
    _install_token_reward_delivery()


if importlib.util.find_spec("verl") is not None:
    register()
