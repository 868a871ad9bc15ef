"""verl's ``"ospo"`` reward managers: a response scored with verl's ``compute_score``, and its attribution game
scored with the same function, written as the dense token rewards the estimator reads."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ... import defaults
from ...attribution import OwenAttributor
from ...credit import attribute_completions
from ...segment import Segmenter
from ..common import BatchContext, BatchContextHolder, CompletionReward
from .estimator import _options, _section, dense_token_rewards, last_token_mask

ATTRIBUTION_OPTIONS = dict(method=defaults.ATTRIBUTION_METHOD, budget=defaults.BUDGET, seed=defaults.SEED,
                           max_players=defaults.SEGMENTER_MAX_PLAYERS)


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
