"""ospo_fast: Owen-Shapley Policy Optimization, fast.

The data flows one way: text -> structure -> plan -> batched evaluation -> values -> Owen values ->
token advantages -> loss. This package exposes each stage; see README.md for a tour.
"""

from . import _extension, rewards
from .advantages import Redistribution, group_advantages, redistribute
from .aggregation import PlanBatch, owen_aggregate_reference
from .attribution import Attribution, Attributions, OwenAttributor
from .credit import (
    CompletionCredit,
    TokenCredit,
    attribute_completions,
    credit_on_tokens,
    excess_credit,
    spread_credit,
    token_advantages,
    token_player_map,
    token_player_maps,
)
from .loss import grpo_loss, token_logprobs
from .owen import BACKENDS, owen_from_values, owen_values, resolve_backend
from .plans import (
    MAX_EXACT_COALITIONS,
    CoalitionPlan,
    exact_plan,
    make_plan,
    make_plans,
    num_exact_coalitions,
    owen_orders,
    sampled_plan,
)
from .segment import (
    Segmentation,
    Segmenter,
    SpacySegmenter,
    coalition_text,
    coalition_texts,
)
from .structure import MAX_PLAYERS, CoalitionStructure
from .trainer import OSPOConfig, OSPOTrainer

# Load the compiled operators now, as extension-cpp does: torch.ops.ospo_fast.* and their fake (meta) kernels
# exist as soon as ``import ospo_fast`` returns. Without a build the package runs on its torch reference.
_extension._load()

__version__ = "0.1.0"

#: Subpackages loaded on first use (``of.data.default_task``, ``of.integrations.trl``), so that ``import
#: ospo_fast`` imports neither pandas (the data loaders), the application layer, nor TRL or verl. The rewards
#: load with the package: the attribution evaluates them.
_LAZY_SUBPACKAGES = ("app", "data", "integrations")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Attribution",
    "Attributions",
    "CompletionCredit",
    "BACKENDS",
    "MAX_EXACT_COALITIONS",
    "MAX_PLAYERS",
    "OSPOConfig",
    "OSPOTrainer",
    "CoalitionPlan",
    "CoalitionStructure",
    "OwenAttributor",
    "Redistribution",
    "PlanBatch",
    "Segmentation",
    "Segmenter",
    "SpacySegmenter",
    "TokenCredit",
    "attribute_completions",
    "coalition_text",
    "coalition_texts",
    "credit_on_tokens",
    "data",
    "excess_credit",
    "exact_plan",
    "group_advantages",
    "grpo_loss",
    "make_plan",
    "make_plans",
    "num_exact_coalitions",
    "owen_aggregate_reference",
    "owen_from_values",
    "owen_orders",
    "owen_values",
    "resolve_backend",
    "redistribute",
    "rewards",
    "sampled_plan",
    "spread_credit",
    "token_advantages",
    "token_logprobs",
    "token_player_map",
    "token_player_maps",
]
