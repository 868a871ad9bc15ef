"""Builds ospo_fast and its extension ospo_fast._C.

The C++ CPU operators are always built. The CUDA operators are added when the installed torch has CUDA
and nvcc is found (CUDA_HOME), or when OSPO_FAST_BUILD_CUDA=1 forces them; OSPO_FAST_BUILD_CUDA=0 skips
them. Install after torch: ``pip install --no-build-isolation -e .``.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


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
