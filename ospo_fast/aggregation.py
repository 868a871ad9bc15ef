"""The Owen aggregation op: its layout (:class:`PlanBatch`), its torch reference, and its fast kernels' wrapper.

Every implementation computes, for each output row (player ``i`` of game ``g``)::

    phi[g, i] = sum over the terms t of i in g's plan of  weight[t] * (v_g[plus[t]] - v_g[minus[t]])

with ``v_g`` the values of game g's coalitions (``csrc/owen_aggregate.h`` states the layout). The backends:

* ``torch``: :func:`owen_aggregate_reference`, plain gathers and ``index_add_`` (float64 where the values are);
* ``cpp``: the extension's operator ``torch.ops.ospo_fast.owen_aggregate`` on the CPU: games that share a plan
  in vector tiles (one lane per game), parallel over tiles;
* ``cuda``: the same operator's CUDA kernel (``csrc/owen_aggregate_kernel.cu``);
* ``triton``: ``ospo_fast.kernels.owen_aggregate`` (GPU, or the CPU under ``TRITON_INTERPRET=1``).

The operator's fake kernel (for ``torch.compile``) and gradient are registered here with ``torch.library``;
the Triton launch gets the same gradient through an autograd function.

:func:`aggregate` runs a backend (already chosen by :func:`ospo_fast.owen.resolve_backend`) on a batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import _extension
from ._device import to_device_all
from .plans import PER_BATCH_CACHE_SIZE, CoalitionPlan, PlanCache
from .plans.plan import _offsets


class PlanBatch:
    """Many games, each with its own plan, aggregated by one kernel launch.

    Game ``g`` owns ``values[value_offsets[g]:value_offsets[g+1]]`` (its plan's coalitions, in plan order)
    and ``phi[row_offsets[g]:row_offsets[g+1]]`` (its players). Distinct plans are stored once however
    many games share them: ``game_ptr_base[g]`` says where game g's plan starts in the concatenated CSR
    pointers ``player_ptr`` (already shifted into the concatenated term arrays).

    >>> batch = PlanBatch([exact_plan(s1), exact_plan(s2), exact_plan(s1)])
    >>> phi = owen_from_values(batch, values)      # values float [batch.num_values] -> float [batch.num_rows]
    >>> batch.split(phi)                           # list of float [n_g]
    """

    def __init__(self, plans):
        plans = list(plans)
        for g, plan in enumerate(plans):
            if not isinstance(plan, CoalitionPlan):
                raise ValueError(f"plans[{g}]: expected a CoalitionPlan, got {type(plan).__name__}")
        self.plans = plans
        slot_of: dict[int, int] = {}
        distinct: list[CoalitionPlan] = []
        for plan in plans:
            if id(plan) not in slot_of:
                slot_of[id(plan)] = len(distinct)
                distinct.append(plan)
        slot = np.array([slot_of[id(p)] for p in plans], dtype=np.int64)

        self.value_offsets = _offsets([p.num_coalitions for p in plans])
        self.row_offsets = _offsets([p.num_players for p in plans])
        term_base = _offsets([p.num_terms for p in distinct])
        ptr_base = _offsets([p.num_players + 1 for p in distinct])
        self.game_ptr_base = ptr_base[:-1][slot]
        self.player_ptr = np.concatenate(
            [np.zeros(0, np.int64)] + [p.player_ptr.numpy() + term_base[j] for j, p in enumerate(distinct)]
        )
        self.term_plus = _cat_tensors([p.term_plus for p in distinct], torch.int64)
        self.term_minus = _cat_tensors([p.term_minus for p in distinct], torch.int64)
        self.term_weight = _cat_tensors([p.term_weight for p in distinct], torch.float64)
        # Most terms of one row: consecutive pointers of one plan differ by its rows' term counts, and across
        # two plans by 0 (a plan's last pointer is the next one's first), so one diff covers every plan.
        self.max_terms_per_row = int(np.diff(self.player_ptr).max()) if len(self.player_ptr) > 1 else 0
        #: The device copies of :meth:`kernel_args`, one per device and dtype.
        self.cache = PlanCache(PER_BATCH_CACHE_SIZE)

    @classmethod
    def repeat(cls, plan: CoalitionPlan, num_games: int) -> "PlanBatch":
        """``num_games`` games sharing one plan (values laid out as ``[num_games, C]``)."""
        return cls([plan] * num_games)

    @property
    def num_games(self) -> int:
        return len(self.plans)

    @property
    def num_values(self) -> int:
        return int(self.value_offsets[-1])

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets[-1])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat per-row tensor ``[num_rows, ...]`` into the games' pieces ``[n_g, ...]``."""
        return list(torch.split(flat, np.diff(self.row_offsets).tolist()))

    def split_values(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat per-coalition tensor ``[num_values, ...]`` into the games' pieces ``[C_g, ...]``."""
        return list(torch.split(flat, np.diff(self.value_offsets).tolist()))

    def kernel_args(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, term_weight)``
        on ``device``, weights in ``dtype``: the arguments every aggregation backend takes after the values.
        Copied once per device and dtype (kept in :attr:`cache`)."""
        return self.cache.get_or_build((str(device), dtype), lambda: self._kernel_args(device, dtype))

    def _kernel_args(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        host = (
            torch.from_numpy(self.value_offsets),
            torch.from_numpy(self.row_offsets),
            torch.from_numpy(self.game_ptr_base),
            torch.from_numpy(self.player_ptr),
            self.term_plus,
            self.term_minus,
            self.term_weight.to(dtype),
        )
        return tuple(to_device_all(host, device))


def _cat_tensors(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(tensors).to(dtype) if tensors else torch.zeros(0, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The op: reference, wrapper, fake kernel, gradient


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


def aggregate(batch: PlanBatch, values: torch.Tensor, backend: str) -> torch.Tensor:
    """Flat values ``[batch.num_values]`` -> flat Owen values ``[batch.num_rows]`` with ``backend`` (one of
    ``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``, already resolved for the values' device).
    Differentiable in ``values`` on every backend."""
    return aggregator(batch, values.device, values.dtype, backend)(values)


def aggregator(
    batch: PlanBatch, device: torch.device, dtype: torch.dtype, backend: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`aggregate` for values on ``device`` in ``dtype``, with the batch's kernel arguments bound once:
    a repeated call then costs the kernel call and little else."""
    args = (*batch.kernel_args(device, dtype), batch.num_rows)
    if backend == "torch":
        return lambda values: owen_aggregate_reference(values, *args)
    if backend in ("cpp", "cuda"):
        # The registered operator, differentiable through the formula registered below. A call without gradient
        # still passes that (Python) autograd kernel, a few microseconds: skipping it takes a private dispatch
        # guard, and the op is called once per batch (bench/micro's "single" workload shows the cost).
        op = torch.ops.ospo_fast.owen_aggregate.default
        return lambda values: op(values, *args)
    max_terms = batch.max_terms_per_row
    return lambda values: _TritonAggregate.apply(values, *args, max_terms)


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


if _extension.has_cpp():  # the operator exists where the extension is built; on every device it runs on:

    @torch.library.register_fake("ospo_fast::owen_aggregate")
    def _(values, value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, term_weight, num_rows):
        return values.new_empty(num_rows)

    torch.library.register_autograd(
        "ospo_fast::owen_aggregate",
        _aggregate_backward,
        setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, inputs),
    )
