"""Which coalitions to evaluate, and how their values combine into Owen values.

A :class:`CoalitionPlan` (``plan.py``) lists the distinct coalitions of one structure and the weighted terms
that turn their values into Owen values. The exact plan (``exact.py``) enumerates the Owen formula; the
sampled plan (``sampled.py``) averages marginal contributions over Owen-consistent orders; :func:`make_plan`
and :func:`make_plans` (``choice.py``) choose between them. What is kept between calls lives in bounded
:class:`PlanCache` objects (``cache.py``). Many plans are aggregated together by
:class:`~ospo_fast.aggregation.PlanBatch`.
"""

from .cache import PER_BATCH_CACHE_SIZE, PER_PLAN_CACHE_SIZE, PLAN_CACHE_SIZE, PlanCache, plan_cache
from .choice import check_plan_options, make_plan, make_plans
from .exact import EXACT_COALITIONS_HARD_LIMIT, MAX_EXACT_COALITIONS, exact_plan, num_exact_coalitions
from .plan import CoalitionPlan
from .sampled import MAX_PERMUTATIONS, owen_orders, sampled_plan

__all__ = [
    "EXACT_COALITIONS_HARD_LIMIT",
    "MAX_EXACT_COALITIONS",
    "MAX_PERMUTATIONS",
    "PER_BATCH_CACHE_SIZE",
    "PER_PLAN_CACHE_SIZE",
    "PLAN_CACHE_SIZE",
    "CoalitionPlan",
    "PlanCache",
    "check_plan_options",
    "exact_plan",
    "make_plan",
    "make_plans",
    "num_exact_coalitions",
    "owen_orders",
    "plan_cache",
    "sampled_plan",
]
