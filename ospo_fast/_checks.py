"""Argument checks shared by the public functions (kernels trust their inputs; these run once, at the boundary)."""

from __future__ import annotations

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
