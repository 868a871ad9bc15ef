"""ospo_fast: Owen-Shapley Policy Optimization, fast.

The data flows one way: text -> structure -> plan -> batched evaluation -> values -> Owen values ->
token advantages -> loss. This package exposes each stage; see README.md for a tour.
"""

from .attribution import Attribution, Attributions, OwenAttributor
from .owen import BACKENDS, owen_aggregate_reference, owen_from_values, owen_values, resolve_backend
from .plans import (
    MAX_EXACT_COALITIONS,
    CoalitionPlan,
    PlanBatch,
    exact_plan,
    make_plan,
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
    token_player_map,
    token_player_maps,
)
from .structure import MAX_PLAYERS, CoalitionStructure
from . import rewards  # noqa: E402  (a subpackage: of.rewards.DenseRetrievalReward)

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Attributions",
    "BACKENDS",
    "MAX_EXACT_COALITIONS",
    "MAX_PLAYERS",
    "CoalitionPlan",
    "CoalitionStructure",
    "OwenAttributor",
    "PlanBatch",
    "Segmentation",
    "Segmenter",
    "SpacySegmenter",
    "coalition_text",
    "coalition_texts",
    "exact_plan",
    "make_plan",
    "num_exact_coalitions",
    "owen_aggregate_reference",
    "owen_from_values",
    "owen_orders",
    "owen_values",
    "resolve_backend",
    "rewards",
    "sampled_plan",
    "token_player_map",
    "token_player_maps",
]
