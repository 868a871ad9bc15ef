"""Owen values from coalition values, on any device, with the backend chosen in :mod:`ospo_fast.dispatch`.

Every backend computes the same thing for each output row (player ``i`` of game ``g``)::

    phi[g, i] = sum over the terms t of i in g's plan of  weight[t] * (v_g[plus[t]] - v_g[minus[t]])

with ``v_g`` the values of game g's coalitions (``csrc/owen_aggregate.h`` states the layout).

* ``torch``: the reference, plain gathers and ``index_add_`` (float64 where the values are float64);
* ``cpp``: ``torch.ops.ospo_fast.owen_aggregate`` on the CPU: games that share a plan in vector tiles (one
  lane per game), parallel over tiles;
* ``cuda``: the same operator's CUDA kernel (``csrc/owen_aggregate_kernel.cu``);
* ``triton``: ``ospo_fast.kernels.owen_aggregate`` (GPU, or the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import _extension, dispatch
from ._checks import as_real_tensor
from .plans import MAX_EXACT_COALITIONS, CoalitionPlan, PlanBatch, make_plan
from .structure import CoalitionStructure

BACKENDS = dispatch.choices("aggregation")


def owen_aggregate_reference(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    row_offsets: torch.Tensor,
    game_ptr_base: torch.Tensor,
    player_ptr: torch.Tensor,
    term_plus: torch.Tensor,
    term_minus: torch.Tensor,
    term_weight: torch.Tensor,
    num_rows: int,
) -> torch.Tensor:
    """The torch reference of the aggregation kernel (``csrc/owen_aggregate.h`` states the contract).

    values, term_weight: float ``[V]``, ``[T]``; value_offsets, row_offsets: int64 ``[G + 1]``;
    game_ptr_base: int64 ``[G]``; player_ptr: int64 ``[Q]``; term_plus, term_minus: int64 ``[T]``.
    Returns float ``[num_rows]``. Any device and float dtype.
    """
    row_of_term, term, base = _expand_terms(value_offsets, row_offsets, game_ptr_base, player_ptr, num_rows)
    gain = values[base + term_plus[term]] - values[base + term_minus[term]]
    out = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    return out.index_add_(0, row_of_term, term_weight[term] * gain)


def _expand_terms(value_offsets, row_offsets, game_ptr_base, player_ptr, num_rows: int):
    """Every (row, term) pair of a batch: int64 ``[P]`` each of the output row, the term, and the offset
    of the row's game in the values."""
    device = player_ptr.device
    rows = torch.arange(num_rows, device=device)
    game_of_row = torch.repeat_interleave(
        torch.arange(game_ptr_base.numel(), device=device), row_offsets.diff(), output_size=num_rows
    )
    ptr = game_ptr_base[game_of_row] + rows - row_offsets[game_of_row]
    begin, counts = player_ptr[ptr], player_ptr[ptr + 1] - player_ptr[ptr]
    row_of_term = torch.repeat_interleave(rows, counts)
    first_of_row = torch.cumsum(counts, 0) - counts
    term = begin[row_of_term] + torch.arange(row_of_term.numel(), device=device) - first_of_row[row_of_term]
    return row_of_term, term, value_offsets[game_of_row[row_of_term]]


# Autograd of the aggregation, shared by the registered operator (cpp, cuda) and the triton launch. The
# output is linear in the values: their gradient is the transposed aggregation, each term sending
# +weight * grad to its plus coalition and -weight * grad to its minus coalition.


def _save_for_backward(ctx, inputs: tuple) -> None:
    ctx.save_for_backward(*inputs[:8])
    ctx.num_rows = inputs[8]


def _aggregate_backward(ctx, grad: torch.Tensor):
    values, value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, term_weight = (
        ctx.saved_tensors
    )
    row_of_term, term, base = _expand_terms(value_offsets, row_offsets, game_ptr_base, player_ptr, ctx.num_rows)
    plus, minus = base + term_plus[term], base + term_minus[term]
    grad_values = grad_weight = None
    if ctx.needs_input_grad[0]:
        sent = term_weight[term] * grad[row_of_term]
        grad_values = torch.zeros_like(values).index_add_(0, plus, sent).index_add_(0, minus, -sent)
    if ctx.needs_input_grad[7]:
        gain = values[plus] - values[minus]
        grad_weight = torch.zeros_like(term_weight).index_add_(0, term, grad[row_of_term] * gain)
    return grad_values, None, None, None, None, None, None, grad_weight, None


if _extension.has_cpp():  # the registered operator's gradient, on every device it runs on
    torch.library.register_autograd(
        "ospo_fast::owen_aggregate",
        _aggregate_backward,
        setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, inputs),
    )


class _TritonAggregate(torch.autograd.Function):
    """The triton launch with the aggregation's gradient (the kernel itself has none)."""

    @staticmethod
    def forward(ctx, *inputs):
        from .kernels.owen_aggregate import owen_aggregate as triton_owen_aggregate

        *args, max_terms = inputs
        _save_for_backward(ctx, tuple(args))
        return triton_owen_aggregate(*args, max_terms=max_terms)

    @staticmethod
    def backward(ctx, grad):
        return *_aggregate_backward(ctx, grad), None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The aggregation backend that runs for ``backend`` on ``device`` (see :func:`ospo_fast.dispatch.resolve`):
    an explicit one is checked, ``"auto"`` picks the fastest available."""
    return dispatch.resolve("aggregation", backend, device)


def _aggregate(batch: PlanBatch, values: torch.Tensor, backend: str) -> torch.Tensor:
    """Flat values ``[batch.num_values]`` -> flat Owen values ``[batch.num_rows]`` with ``backend``."""
    args = (values, *batch.kernel_args(values.device, values.dtype), batch.num_rows)
    if backend == "torch":
        return owen_aggregate_reference(*args)
    if backend in ("cpp", "cuda"):
        return _call_operator(torch.ops.ospo_fast.owen_aggregate.default, values, args[1:])
    return _TritonAggregate.apply(*args, batch.max_terms_per_row)


def _call_operator(op, values: torch.Tensor, rest: tuple) -> torch.Tensor:
    """``op(values, *rest)``. The operator's autograd formula is a Python kernel that costs several
    microseconds a call, more than a small aggregation itself: values that need no gradient skip it."""
    if values.requires_grad and torch.is_grad_enabled():
        return op(values, *rest)
    with torch._C._AutoDispatchBelowAutograd():
        return op(values, *rest)


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
        return _aggregate(plan, values, resolve_backend(backend, values.device))
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
    then costs about 4 us of Python instead of 10-12 (a uniform batch of 4096 games aggregates in about
    80 us)."""
    batch = _repeated_batch(plan, math.prod(shape) // plan.num_coalitions)
    resolved = resolve_backend(backend, device)
    out_shape = (*shape[:-1], plan.num_players)
    if resolved in ("cpp", "cuda"):
        op, args, rows = torch.ops.ospo_fast.owen_aggregate.default, batch.kernel_args(device, dtype), batch.num_rows

        def run(values: torch.Tensor) -> torch.Tensor:
            return _call_operator(op, values.view(-1), (*args, rows)).view(out_shape)
    else:

        def run(values: torch.Tensor) -> torch.Tensor:
            return _aggregate(batch, values.view(-1), resolved).view(out_shape)

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
