"""Build sau_kernels' extension: always the C++ CPU kernel, the CUDA kernel too when possible.

Everything else (metadata, dependencies, package data) is in pyproject.toml. Install with
`pip install --no-build-isolation -e .[test]` once torch is in the environment: build
isolation would fetch a fresh torch (a multi-GB CUDA build) and build against it.

Environment:
  FORCE_CUDA=1           build the CUDA kernel even if torch reports no CUDA
                         (e.g. no GPU visible at build time); needs CUDA_HOME.
  SAU_SKIP_CUDA_BUILD=1  never build the CUDA kernel.
  MAX_JOBS=N             parallel compile jobs (torch.utils.cpp_extension).
"""

import os
import subprocess
import tempfile

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    if os.environ.get("SAU_SKIP_CUDA_BUILD") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    """-fopenmp if the C++ compiler takes it: at::parallel_for runs serially without it."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                           check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return []
    return ["-fopenmp"]


def _extension():
    omp = _openmp_flags()
    # -fno-math-errno lets the compiler vectorise sqrtf; no -ffast-math, which
    # would reorder the fp32 arithmetic the backends must agree on.
    cxx_flags = ["-O3", "-fno-math-errno"] + omp
    sources = ["csrc/sau_repair_cpu.cpp"]
    if not _want_cuda():
        return CppExtension("sau_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=omp)
    return CUDAExtension(
        "sau_kernels._C",
        sources + ["csrc/sau_repair_cuda_op.cpp", "csrc/sau_repair_cuda.cu"],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=omp,
    )


# Metadata, dependencies, packages and package data are in pyproject.toml; setup.py adds only
# the compiled extension, which needs torch's build helpers.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
