"""Delivering the dense token rewards through verl's agent loop (which would otherwise write one float per response)."""

from __future__ import annotations

import torch

from .reward import TokenRewards

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
