"""Host arrays to the device in one transfer (``ospo_fast._device.to_device_all``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ospo_fast as of


def test_host_arrays_staged_in_one_buffer_come_back_whole():
    """The one-transfer bundle of a device half (``to_device_all``): every array, of any dtype and shape (odd
    sizes, empty, 2-D, strided), is found unchanged in its aligned place of the staging buffer."""
    from ospo_fast._device import _BUNDLE_ALIGN, _stage, _unstage

    rng = np.random.default_rng(5)
    arrays = [
        rng.integers(-(1 << 40), 1 << 40, size=int(rng.integers(0, 40))),
        rng.standard_normal(7).astype(np.float32),
        np.zeros(0, dtype=np.int32),
        rng.standard_normal((3, 5)),
        rng.integers(0, 2, size=13).astype(bool),
        rng.integers(0, 1 << 30, size=(9, 4)).astype(np.int32)[:, 1],  # not contiguous
        np.arange(1, dtype=np.int64),
    ]
    tensors = [torch.from_numpy(a) for a in arrays]
    staging, starts = _stage(tensors, pin=False)
    assert all(s % _BUNDLE_ALIGN == 0 for s in starts)
    back = _unstage(staging, tensors, starts)
    for a, t in zip(arrays, back):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)
    assert of._device.to_device_all(arrays, torch.device("cpu"))[3].data_ptr() == tensors[3].data_ptr()  # CPU: no copy


@pytest.mark.gpu
def test_host_arrays_go_to_cuda_in_one_transfer_without_sync():
    from ospo_fast._device import to_device_all

    rng = np.random.default_rng(6)
    arrays = ([rng.integers(0, 1000, size=n) for n in (0, 1, 17, 1000)]
              + [rng.standard_normal((4, 3)).astype(np.float32)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device_all(arrays, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, t in zip(arrays, got):
        assert t.is_cuda and np.array_equal(t.cpu().numpy(), a)
