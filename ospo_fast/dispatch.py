"""Which implementation runs each op: the one place where a backend is chosen.

:func:`resolve` turns ``(op, choice, device, dtype)`` into the implementation that runs:

==============  ===============================  ==========================================================
op              a caller may ask for              ``"auto"`` picks
==============  ===============================  ==========================================================
``aggregation`` auto, torch, cpp, cuda, triton    cuda (CUDA kernels built) or triton on CUDA; cpp on the CPU
                                                  where built; else torch (``aggregation.py``)
``loss``        auto, torch, triton               triton on CUDA where installed, else torch (``loss.py``)
``packing``     auto, torch, triton               triton on CUDA where installed, else torch
``pooling``     auto, runs, segments, triton      runs on the CPU; triton on CUDA where installed, else segments
``attention``   auto, flash, sdpa                 flash (varlen) on CUDA in fp16/bf16 where available; cpp
                                                  (the extension's varlen kernel) in float32 on the CPU where
                                                  built; else sdpa (per run of equal lengths)
``norm``        auto                              triton (fused residual add, LayerNorm and cast) in reduced
                                                  precision on CUDA where installed; cpp (row LayerNorm) in
                                                  float32 on the CPU where built; else torch
``activation``  auto                              cpp (bias + GELU in one pass) in float32 on the CPU where
                                                  built; else torch
==============  ===============================  ==========================================================

An explicit choice is honoured or refused: a ValueError names the argument, what the choice needs and what
was found. An automatic choice is logged once per (op, device type, implementation) on the ``ospo_fast``
logger at INFO, so a run's log says which kernels it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension

_log = logging.getLogger("ospo_fast")

_REDUCED = (torch.float16, torch.bfloat16)


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _float32_cpu(device: torch.device, dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32


def _auto_aggregation(device, dtype) -> str:
    if _on_cuda(device):
        if _extension.has_cuda_kernels():
            return "cuda"
        return "triton" if _extension.has_triton() else "torch"
    return "cpp" if device.type == "cpu" and _extension.has_cpp() else "torch"


def _auto_triton_on_cuda(device, dtype) -> str:
    # Triton on the CPU is the interpreter: a test tool, never an automatic choice.
    return "triton" if _on_cuda(device) and _extension.has_triton() else "torch"


def _auto_pooling(device, dtype) -> str:
    if not _on_cuda(device):
        return "runs"  # a CPU batch has a handful of distinct lengths: one view per run
    return "triton" if _extension.has_triton() else "segments"


def _auto_attention(device, dtype) -> str:
    if _on_cuda(device) and dtype in _REDUCED and _extension.flash_varlen() is not None:
        return "flash"
    if _float32_cpu(device, dtype) and _extension.has_cpp():
        return "cpp"
    return "sdpa"


def _auto_norm(device, dtype) -> str:
    if _on_cuda(device) and dtype in _REDUCED and _extension.has_triton():
        return "triton"
    return "cpp" if _float32_cpu(device, dtype) and _extension.has_cpp() else "torch"


def _auto_activation(device, dtype) -> str:
    return "cpp" if _float32_cpu(device, dtype) and _extension.has_cpp() else "torch"


@dataclass(frozen=True)
class Op:
    """One dispatched op: the choices a caller may pass (``"auto"`` first), the tensors whose device
    decides (as error messages name them), and the automatic choice ``auto(device, dtype) -> name``."""

    choices: tuple[str, ...]
    tensors: str
    auto: Callable[[torch.device, torch.dtype | None], str]


OPS: dict[str, Op] = {
    "aggregation": Op(("auto", "torch", "cpp", "cuda", "triton"), "values", _auto_aggregation),
    "loss": Op(("auto", "torch", "triton"), "logits", _auto_triton_on_cuda),
    "packing": Op(("auto", "torch", "triton"), "token ids", _auto_triton_on_cuda),
    "pooling": Op(("auto", "runs", "segments", "triton"), "hidden states", _auto_pooling),
    "attention": Op(("auto", "flash", "sdpa"), "encoder weights", _auto_attention),
    "norm": Op(("auto",), "hidden states", _auto_norm),
    "activation": Op(("auto",), "hidden states", _auto_activation),
}


def choices(op: str) -> tuple[str, ...]:
    """What a caller may pass for ``op`` (``"auto"`` first)."""
    return OPS[op].choices


def check_choice(op: str, choice, arg: str = "backend") -> str:
    """``choice`` when it is one of ``op``'s choices (whatever the device), else ValueError naming ``arg``."""
    if choice not in OPS[op].choices:
        raise ValueError(f"{arg}: expected one of {OPS[op].choices}, got {choice!r}")
    return choice


def refusal(arg: str, choice, needs: str, found: str) -> ValueError:
    """The error of an explicit choice that cannot be honoured: ``arg=choice needs ...; found``."""
    return ValueError(f"{arg}={choice!r} {needs}; {found}")


def _unmet(choice: str, device: torch.device, dtype, tensors: str) -> tuple[str, str] | None:
    """(what ``choice`` needs, what was found instead), or None when it can run here."""
    where = f"the {tensors} are on {device}"
    if choice == "cpp":
        if device.type != "cpu":
            return "runs on CPU tensors", where
        if not _extension.has_cpp():
            return ("needs the compiled extension ospo_fast._C",
                    f"it is not built ({_extension.extension_error()}): reinstall with "
                    "`pip install --no-build-isolation -e .`")
    elif choice == "cuda":
        if not _on_cuda(device):
            return "runs on CUDA tensors", where
        if not _extension.has_cuda_kernels():
            return ("needs ospo_fast._C built with CUDA kernels",
                    "it was built without them: rebuild with a CUDA torch and nvcc (or OSPO_FAST_BUILD_CUDA=1)")
    elif choice == "triton":
        if not _extension.has_triton():
            return "needs triton", "it is not installed (pip install triton)"
        if not _on_cuda(device) and not _extension.triton_interpreted():
            return "runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1", where
    elif choice == "flash":
        if not _on_cuda(device) or dtype not in _REDUCED or _extension.flash_varlen() is None:
            return ("needs flash-attn or torch >= 2.9 (torch.nn.attention.varlen), a CUDA device and dtype "
                    "torch.float16 or torch.bfloat16",
                    f"got {device.type} and {dtype} (flash varlen "
                    f"{'available' if _extension.flash_varlen() is not None else 'not installed'})")
    return None


_logged: set[tuple[str, str, str]] = set()  # (op, device type, implementation) already logged


def _log_once(op: str, device: torch.device, name: str) -> None:
    key = (op, device.type, name)
    if key not in _logged:
        _logged.add(key)
        _log.info("ospo_fast: %s on %s runs %s (chosen automatically)", op, device.type, name)


def resolve(op: str, choice: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
            arg: str = "backend") -> str:
    """The implementation of ``op`` that runs for ``choice`` on tensors of ``device`` (and ``dtype``, for
    the encoder's ops): ``choice`` itself when it is explicit and can run here, else ValueError naming
    ``arg`` (the caller's name for the choice); for ``"auto"`` the fastest available (module docstring),
    logged once. Never synchronises a GPU stream: it reads devices, dtypes and what is installed."""
    spec = OPS[op]
    check_choice(op, choice, arg)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if choice == "auto":
        name = spec.auto(device, dtype)
        _log_once(op, device, name)
        return name
    unmet = _unmet(choice, device, dtype, spec.tensors)
    if unmet is not None:
        raise refusal(arg, choice, *unmet)
    return choice
