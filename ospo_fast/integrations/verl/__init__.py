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

from .delivery import _install_token_reward_delivery
from .estimator import (
    ESTIMATOR_OPTIONS,
    NO_CREDIT_MESSAGE,
    compute_ospo_advantage,
    dense_token_rewards,
    grpo_sequence_advantages,
    last_token_mask,
    ospo_advantages,
    split_token_rewards,
)
from .reward import ATTRIBUTION_OPTIONS, TokenRewards, _verl_classes, build_attributor, score_responses

# OSPORewardManager and OSPORewardLoopManager subclass verl's classes: module attributes built on first
# access (they need verl), so they are left out of __all__.
__all__ = [
    "ATTRIBUTION_OPTIONS",
    "ESTIMATOR_OPTIONS",
    "NO_CREDIT_MESSAGE",
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
