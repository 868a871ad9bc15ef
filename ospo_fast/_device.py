"""Moving host tensors to a device without synchronising a GPU stream."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Bytes: each array of a bundle starts on its own cache line of the staging buffer (and of the device copy).
_BUNDLE_ALIGN = 64


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


def to_device_all(arrays: Sequence[torch.Tensor | np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Every one of ``arrays`` (host numpy arrays or CPU tensors, any shapes and dtypes) on ``device``.

    To a GPU they travel together: packed into one pinned staging buffer and copied with one non-blocking
    transfer, then viewed on the device. One pinned allocation and one copy instead of one of each per
    array: the device half of an evaluation starts by waiting on these copies, so their host time is on
    its critical path. Elsewhere, :func:`to_device` of each (no copy on the CPU).
    """
    if device.type != "cuda":
        return [to_device(x, device) for x in arrays]
    tensors = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in arrays]
    staging, starts = _stage(tensors, pin=True)
    # The caching host allocator keeps the staging block until the copy is done, so it may go out of scope.
    return _unstage(staging.to(device, non_blocking=True), tensors, starts)


def _stage(tensors: Sequence[torch.Tensor], pin: bool) -> tuple[torch.Tensor, list[int]]:
    """One uint8 host buffer holding every CPU tensor's bytes, each at a multiple of ``_BUNDLE_ALIGN``; and
    where each starts."""
    hosts = [np.ascontiguousarray(t.numpy()) for t in tensors]
    starts, total = [], 0
    for a in hosts:
        starts.append(total)
        total += -(-a.nbytes // _BUNDLE_ALIGN) * _BUNDLE_ALIGN
    staging = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    staging_bytes = staging.numpy()
    for a, start in zip(hosts, starts):
        staging_bytes[start : start + a.nbytes] = a.reshape(-1).view(np.uint8)
    return staging, starts


def _unstage(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], starts: Sequence[int]) -> list[torch.Tensor]:
    """Views of a staged ``buffer`` (or its copy on a device) with each tensor's dtype and shape."""
    return [
        buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for t, start in zip(tensors, starts)
    ]
