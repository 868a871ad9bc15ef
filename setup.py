"""Builds ospo_fast and its extension ospo_fast._C.

The C++ CPU operators are always built. The CUDA operators are added when the installed torch has CUDA
and nvcc is found (CUDA_HOME), or when OSPO_FAST_BUILD_CUDA=1 forces them; OSPO_FAST_BUILD_CUDA=0 skips
them. Without a visible GPU to read an architecture from, the CUDA kernels are built for
DEFAULT_CUDA_ARCH_LIST (Ampere and Hopper) unless TORCH_CUDA_ARCH_LIST says otherwise.

The extension is built against the torch already installed, so install torch first, then
``pip install --no-build-isolation .`` (or ``-e .``). pip's default isolated build would fetch another torch
(a CUDA build of several GB) into a throw-away environment and build against that one; setup.py stops at once
with the command to use instead.
"""

import glob
import os
import sys

NO_ISOLATION = (
    "ospo_fast builds its C++/CUDA extension against the torch you have installed, and this build cannot see "
    "it (pip builds in an isolated environment unless told otherwise). Install torch first, then run:\n\n"
    "    pip install --no-build-isolation .        (or -e . for a development install)\n"
)

try:
    import torch
except ImportError:
    sys.exit(NO_ISOLATION)

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

#: Architectures of the CUDA kernels when no GPU is visible at build time (A100 and H100/H200 class).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def want_cuda() -> bool:
    forced = os.environ.get("OSPO_FAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    sources = ["csrc/owen_aggregate.cpp", "csrc/varlen_attention.cpp", "csrc/encoder_rows.cpp"]
    if not want_cuda():
        return CppExtension("ospo_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch reads the architecture of the visible GPU; with none it would fail (IndexError) in its flags.
        print(f"ospo_fast: no GPU visible, building the CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCH_LIST} "
              "(set TORCH_CUDA_ARCH_LIST to choose, or OSPO_FAST_BUILD_CUDA=0 to skip CUDA)", file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    sources += ["csrc/owen_aggregate_cuda.cpp"] + sorted(glob.glob("csrc/*.cu"))
    return CUDAExtension(
        "ospo_fast._C",
        sources,
        define_macros=[("OSPO_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["ospo_fast", "ospo_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
