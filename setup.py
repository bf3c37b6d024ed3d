"""Build sau_kernels: always the C++ CPU extension, CUDA too when possible.

Install with `pip install --no-build-isolation -e .[test]` (torch must already be
in the environment: build isolation would fetch a multi-GB CUDA torch).

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
from setuptools import find_packages, setup
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


setup(
    name="sau_kernels",
    version="0.1.0",
    description="Spatial Attention Unlearning (SAU) for diffusers Stable Diffusion pipelines: "
    "fused repair kernels against text-trigger backdoors",
    packages=find_packages(include=["sau_kernels", "sau_kernels.*"]),
    # The model zoo's tiny models and the calibration prompts ship as package data.
    package_data={"sau_kernels": ["zoo/**/*", "data/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "diffusers",
        "transformers",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "kornia", "pytest-benchmark", "triton", "matplotlib"],
        # The HTTP server (sau_kernels.serving): tested with ray 2.60.0, fastapi 0.165, httpx 0.29.
        "serve": ["ray[serve]>=2.60,<2.61", "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["sau-kernels = sau_kernels.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
