"""Owen values from coalition values: :func:`owen_from_values` (the values of a plan's coalitions, or of a
:class:`~ospo_fast.aggregation.PlanBatch`'s, to Owen values) and :func:`owen_values` (a game to its Owen values),
on any device, with the backend chosen in :mod:`ospo_fast.dispatch`. The aggregation they run (torch
reference, C++/CUDA operator, Triton kernel, and their gradient) is :mod:`ospo_fast.aggregation`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import dispatch
from ._checks import as_real_tensor
from .aggregation import PlanBatch, aggregate, aggregator
from .plans import MAX_EXACT_COALITIONS, CoalitionPlan, make_plan
from .structure import CoalitionStructure

BACKENDS = dispatch.choices("aggregation")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The aggregation backend that runs for ``backend`` on ``device`` (see :func:`ospo_fast.dispatch.resolve`):
    an explicit one is checked, ``"auto"`` picks the fastest available."""
    return dispatch.resolve("aggregation", backend, device)


_KERNEL_DTYPES = (torch.float32, torch.float64)


def _as_float_values(values, name: str = "values") -> torch.Tensor:
    # Kernels accumulate in float32 or float64; integer values keep full precision in float64.
    if isinstance(values, torch.Tensor) and values.dtype in _KERNEL_DTYPES and values.is_contiguous():
        return values  # the common case, without a call chain: aggregation is often microseconds
    return as_real_tensor(values, name, integers_to=torch.float64).contiguous()


def owen_from_values(
    plan: CoalitionPlan | PlanBatch, values: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Owen values from the values of a plan's coalitions.

    Args:
        plan: a :class:`CoalitionPlan`, or a :class:`PlanBatch` of games with different plans.
        values: for a plan, float ``[C]`` (one game) or ``[B, C]`` (B games sharing the plan), in the order
            of ``plan.masks``; for a batch, float ``[batch.num_values]`` (games concatenated).
        backend: ``"auto"`` (the fastest available for the device) or one of ``"torch"``, ``"cpp"``,
            ``"cuda"``, ``"triton"``.

    Returns:
        ``[n]``, ``[B, n]`` or ``[batch.num_rows]``; float64 for float64 values, float32 otherwise.
        Only shapes and dtypes are checked here, nothing that needs the values on the host, so the call
        never synchronises a GPU stream. Differentiable in ``values`` on every backend (the gradient is the
        transposed aggregation).
    """
    values = _as_float_values(values)
    if isinstance(plan, PlanBatch):
        if values.dim() != 1 or values.shape[0] != plan.num_values:
            raise ValueError(
                f"values: expected shape ({plan.num_values},) for a PlanBatch (its games' coalitions, "
                f"concatenated), got {tuple(values.shape)}"
            )
        return aggregate(plan, values, resolve_backend(backend, values.device))
    if not isinstance(plan, CoalitionPlan):
        raise ValueError(f"plan: expected a CoalitionPlan or a PlanBatch, got {type(plan).__name__}")
    run = plan.cache.get(("run", values.shape, values.device, values.dtype, backend))
    if run is None:
        C = plan.num_coalitions
        if values.dim() not in (1, 2) or values.shape[-1] != C:
            raise ValueError(
                f"values: expected shape ({C},) or (B, {C}) - one value per row of plan.masks - "
                f"got {tuple(values.shape)}"
            )
        run = _plan_runner(plan, values.shape, values.device, values.dtype, backend)
    return run(values)


def _plan_runner(plan: CoalitionPlan, shape: torch.Size, device: torch.device, dtype: torch.dtype, backend: str):
    """``values -> Owen values`` for games sharing ``plan``, with values of this (checked) shape, device and
    dtype: everything but the kernel call is resolved once and kept in ``plan.cache``. On the CPU a repeated call
    then costs a few microseconds of Python instead of 10-12 (a uniform batch of 4096 games aggregates in about
    80 us)."""
    batch = _repeated_batch(plan, math.prod(shape) // plan.num_coalitions)
    out_shape = (*shape[:-1], plan.num_players)
    run_flat = aggregator(batch, device, dtype, resolve_backend(backend, device))

    def run(values: torch.Tensor) -> torch.Tensor:
        return run_flat(values.view(-1)).view(out_shape)

    return plan.cache.put(("run", shape, device, dtype, backend), run)


def _repeated_batch(plan: CoalitionPlan, num_games: int) -> PlanBatch:
    """The batch of ``num_games`` games sharing ``plan``; kept in ``plan.cache`` (bounded, least recently used
    evicted first), so a repeated call builds nothing."""
    return plan.cache.get_or_build(("repeat", num_games), lambda: PlanBatch.repeat(plan, num_games))


def owen_values(
    value_fn: Callable[[torch.Tensor], torch.Tensor],
    structure: CoalitionStructure,
    method: str = "exact",
    *,
    budget: int = 256,
    num_permutations: int | None = None,
    seed: int = 0,
    antithetic: bool = True,
    backend: str = "auto",
    max_exact_coalitions: int = MAX_EXACT_COALITIONS,
) -> torch.Tensor:
    """Owen values of the game ``value_fn`` over ``structure``.

    ``value_fn(masks)`` gets every coalition the plan needs at once (bool ``[C, n]``) and returns their
    values (float ``[C]``); it is called exactly once. ``method`` is ``"exact"``, ``"sampled"``
    (``num_permutations`` Owen-consistent orders, default 64, from ``seed``) or ``"auto"`` (exact when it
    needs at most ``budget`` coalitions). ``exact`` refuses structures that need more than
    ``max_exact_coalitions`` coalitions (see :func:`~ospo_fast.exact_plan`). Returns float ``[n]``: float64
    when the values are float64.
    """
    if not callable(value_fn):
        raise ValueError(f"value_fn: expected a callable masks -> values, got {type(value_fn).__name__}")
    plan = make_plan(
        structure, method, budget=budget, num_permutations=num_permutations, seed=seed, antithetic=antithetic,
        max_exact_coalitions=max_exact_coalitions,
    )
    values = _as_float_values(value_fn(plan.masks), name="value_fn(masks)")
    if tuple(values.shape) != (plan.num_coalitions,):
        raise ValueError(
            f"value_fn(masks): returned shape {tuple(values.shape)}, expected ({plan.num_coalitions},): "
            f"one value per row of masks [{plan.num_coalitions}, {plan.num_players}]"
        )
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"value_fn(masks): returned NaN or infinite values for coalitions {bad} (e.g. masks[{bad[0]}]); "
            "every coalition needs a finite value"
        )
    return owen_from_values(plan, values, backend=backend)
