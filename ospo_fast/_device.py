"""Moving host tensors to a device without synchronising a GPU stream."""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``. A host tensor goes to a GPU through pinned memory with a non-blocking copy: a
    plain ``.to("cuda")`` of pageable memory synchronises the stream, which would stall the pipeline."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
