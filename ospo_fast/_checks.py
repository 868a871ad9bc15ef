"""Argument checks shared by the public functions (kernels trust their inputs; these run once, at the boundary)."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import torch


def as_real_tensor(x, name: str, integers_to: torch.dtype = torch.float64) -> torch.Tensor:
    """``x`` as a real floating tensor: float64 stays float64, other floats become float32, integers
    ``integers_to``. Raises ValueError naming ``name`` for anything that is not real numbers."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: expected a float tensor, got {type(x).__name__} ({exc})") from None
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32 if x.is_floating_point() else integers_to)


def check_int(value, name: str, low: int, high: int | None = None, expected: str | None = None) -> int:
    """``value`` as a Python int in ``[low, high]`` (no upper bound when ``high`` is None). numpy integers
    pass; bools and floats do not. The error names ``name`` and says what was expected (``expected``
    overrides the generated description, e.g. to name a constant)."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
    if not ok or value < low or (high is not None and value > high):
        if expected is None:
            if high is not None:
                expected = f"an int in [{low}, {high}]"
            else:
                expected = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def check_number(value, name: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a finite Python float in the interval from ``low`` to ``high`` (each end closed unless
    ``*_open``). Bools, NaN and infinities are refused with an error naming ``name`` and the interval."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    ok = ok and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = (("(" if low_open or low == -math.inf else "[") + f"{low}, "
                    + (f"{high})" if high_open or high == math.inf else f"{high}]"))
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return float(value)


def check_choice(value, name: str, allowed) -> str:
    """``value`` if it is one of ``allowed``; else an error naming ``name`` and the choices."""
    if not isinstance(value, Hashable) or value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return value
