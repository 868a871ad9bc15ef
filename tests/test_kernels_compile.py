"""Every Triton kernel compiles for NVIDIA GPUs (sm_80, sm_90), here, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler refuses; this runs
``scripts/compile_triton_kernels.py`` in a process of its own (the interpreter flag unset) and requires
every kernel to build a cubin.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_nvidia_gpus():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--arch", "80", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert len(lines) >= 2 * 12 and all(" ok (" in line for line in lines), run.stdout  # 12 kernel variants, 2 targets
