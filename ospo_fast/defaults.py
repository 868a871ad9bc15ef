"""OSPO's defaults and the names each option accepts, in one place.

Every module that offers one of these options (the library functions, :class:`~ospo_fast.OSPOTrainer`'s
config, the TRL and verl integrations, the ``ospo-fast`` command) reads its default here, and the command
builds its ``choices`` from the tuples below. Where two uses want different values, each has its own name
and a comment saying which use it is for. The lowest layer: this module imports nothing of the package.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------
# Names an option accepts

#: How a response's advantage is shared out over its segment tokens (:func:`ospo_fast.redistribute`): the
#: paper's shares (proportional, rank, hybrid: every token keeps its response's sign) and signed segment
#: advantages (a segment's Owen value against its group's segments can flip its tokens' sign).
REDISTRIBUTION_MODES = ("proportional", "rank", "hybrid", "signed")
#: What GRPO divides the centred rewards by (:func:`ospo_fast.group_advantages`).
ADVANTAGE_SCALES = ("group", "batch", "none")
#: How the Owen values are computed (:func:`ospo_fast.make_plan`'s ``method``).
ATTRIBUTION_METHODS = ("auto", "exact", "sampled")
#: What the trainer runs: OSPO's per-token advantages, or GRPO's (every token its response's advantage).
TRAINING_MODES = ("ospo", "grpo")
#: The retrieval rewards a task builds over its pools (:meth:`ospo_fast.data.SearchTask.reward`).
REWARD_KINDS = ("dense", "bm25")

# ----------------------------------------------------------------------------------------------------
# Advantages: GRPO normalisation and redistribution (ospo_fast.advantages)

REDISTRIBUTION = "proportional"
#: hybrid mode: the weight of the proportional shares.
ALPHA = 0.5
#: The part of a response's advantage spread uniformly over its segment tokens.
FLOOR = 0.1
#: signed mode: the weight of the segment's own advantage, ``Â_t = A + segment_weight * (a_seg(t) - A)``.
SEGMENT_WEIGHT = 1.0
#: The bound on a token's share ``Â_t / A``, chosen from the shares of ``ospo-fast train`` runs.
MAX_SHARE = 4.0
ADVANTAGE_SCALE = "group"
#: Added to the group std by :func:`ospo_fast.group_advantages` (OSPOTrainer): TRL's GRPO uses 1e-4 too.
GROUP_EPS = 1e-4
#: Added to the group std by the verl estimator (the same group_advantages): verl's own
#: ``compute_grpo_outcome_advantage`` epsilon, so that ospo with no credit gives verl's grpo advantages.
VERL_GRPO_EPS = 1e-6

# ----------------------------------------------------------------------------------------------------
# Attribution: segments and Owen values

ATTRIBUTION_METHOD = "auto"
#: Coalitions per response an exact plan may use before "auto" samples (training and the library).
BUDGET = 64
#: :func:`ospo_fast.make_plan`'s own budget, also ``ospo-fast attribute``'s (one response at a time).
PLAN_BUDGET = 256
#: Orders of a sampled plan (:func:`ospo_fast.sampled_plan`'s default; ``ospo-fast demo``).
NUM_PERMUTATIONS = 64
#: Players a segmenter keeps per response (:data:`ospo_fast.MAX_PLAYERS` is the engine's hard limit).
SEGMENTER_MAX_PLAYERS = 16
SEED = 0

# ----------------------------------------------------------------------------------------------------
# Training (OSPOConfig; the library and a pretrained policy)

TRAINING_MODE = "ospo"
GROUP_SIZE = 8
PROMPTS_PER_STEP = 4
MAX_STEPS = 100
#: OSPOConfig's learning rate: the OSPO paper's setting for a pretrained policy.
LEARNING_RATE = 5e-6
MAX_NEW_TOKENS = 48
TEMPERATURE = 1.0
LOSS_TYPE = "grpo"
#: KL weight: no KL term.
BETA = 0.0
SAVE_STEPS = 25
OUTPUT_DIR = "runs/ospo"
