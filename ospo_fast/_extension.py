"""Loads the compiled extension ``ospo_fast._C`` and says which backends this install has.

``import ospo_fast`` calls :func:`_load`, which registers the operators, and the fake (meta) kernels of the
encoder's operators (``varlen_attention``, ``layer_norm_rows``, ``bias_gelu_``, called inline by
``ospo_fast.evaluate.encoder``). The aggregation operator's fake kernel and gradient are registered beside its
wrapper, in :mod:`ospo_fast.aggregation`. The package works without the extension (pure torch reference); a
missing build is reported once, as a warning, only when a backend that needs it is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.ospo_fast.*)
    except ImportError as exc:
        return None, str(exc)

    @torch.library.register_fake("ospo_fast::varlen_attention")
    def _(q, k, v, cu_seqlens, max_seqlen, scale, out, qkv_bias=None):
        return None

    @torch.library.register_fake("ospo_fast::layer_norm_rows")
    def _(x, weight, bias, eps, out):
        return None

    @torch.library.register_fake("ospo_fast::bias_gelu_")
    def _(x, bias):
        return None

    return _C, None


def extension_error() -> str | None:
    """Why ``ospo_fast._C`` could not be imported, or None when it was."""
    return _load()[1]


def has_cpp() -> bool:
    """The C++ CPU operators are built."""
    return _load()[0] is not None


def has_cuda_kernels() -> bool:
    """The CUDA operators are built and a CUDA device is visible."""
    module = _load()[0]
    return module is not None and bool(module.with_cuda) and torch.cuda.is_available()


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def flash_varlen():
    """A varlen flash-attention function ``f(q, k, v, cu_q, cu_k, max_q, max_k)``: flash-attn's where
    installed, else PyTorch's own (``torch.nn.attention.varlen``, torch >= 2.9); None when neither exists.
    Looked up once: a failed import is not cached by Python and costs about 25 us per layer otherwise."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
