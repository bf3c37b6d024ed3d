"""The CUDA kernel's own code (csrc/sau_repair_cuda.cu), run on the CPU by tests/cuda_emu/emulate.cpp
and compared with the reference: tiles, halos, reflection and strides are checked without a GPU.
Needs g++ and CUDA's headers (nvcc's toolkit); skipped otherwise."""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sau_kernels import reference

from repair_helpers import assert_matches_reference, make_inputs

ROOT = Path(__file__).resolve().parents[1]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # SauDType


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").exists():
            return Path(c) / "include"
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    include, cxx = _cuda_include(), shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs g++ and CUDA headers")
    lib = tmp_path_factory.mktemp("emu") / "libsauemu.so"
    subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include}",
                    str(ROOT / "tests" / "cuda_emu" / "emulate.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def run_emulated(lib, z_p, z_c, delta, act, out, *, coverage=None, tau1=0.5, tau2=0.3, k=12.0, alpha=1.0,
                 blur_sigma=0.2, blur_ksize=5, blend="convex", similarity="latent", gate=None):
    delta, act = delta.float().contiguous(), act.float().contiguous()
    sizes = (ctypes.c_int64 * 4)(*z_p.shape)
    cov_strides = coverage.stride() if coverage is not None else (0, 0)
    strides = (ctypes.c_int64 * 14)(*z_p.stride(), *z_c.stride(), *out.stride(), *cov_strides)
    f = ctypes.c_float
    vectorised = ctypes.c_int(-1)
    rc = lib.sau_emu_repair(
        DTYPE_CODES[z_p.dtype], ctypes.c_void_p(z_p.data_ptr()), ctypes.c_void_p(z_c.data_ptr()),
        ctypes.c_void_p(delta.data_ptr()), ctypes.c_void_p(act.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_void_p(None if coverage is None else coverage.data_ptr()), sizes, strides, f(tau1), f(tau2), f(k), f(alpha), f(blur_sigma), blur_ksize,
        {"convex": 0, "paper": 1}[blend], {"latent": 0, "difference": 1}[similarity],
        int(gate is not None), f(0.0 if gate is None else gate), ctypes.byref(vectorised))
    assert rc == 0, f"emulated launch failed ({rc})"
    return bool(vectorised.value)  # which kernel the launcher's choice ran


SHAPES = [(1, 4, 64, 64), (3, 4, 37, 53), (1, 8, 20, 11), (1, 3, 33, 70), "smallest"]
BLUR = [(1, 0.2), (3, 2.0), (5, 0.2), (7, 2.0), (31, 6.0)]
GRID = list(itertools.product(SHAPES, DTYPE_CODES, ("convex", "paper"), ("latent", "difference"), (None, 0.45), BLUR))
SAMPLE = random.Random(1).sample(GRID, 30)


@pytest.mark.parametrize("case", SAMPLE, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_cuda_kernel_matches_reference(emu, case):
    shape, dtype, blend, similarity, gate, (ksize, sigma) = case
    if shape == "smallest":
        shape = (2, 4, ksize // 2 + 1, ksize // 2 + 1)
    if min(shape[2:]) <= ksize // 2:
        shape = shape[:2] + (max(shape[2], ksize // 2 + 1), max(shape[3], ksize // 2 + 1))
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=similarity, gate=gate, seed=len(SAMPLE))
    params = dict(blend=blend, similarity=similarity, gate=gate, blur_ksize=ksize, blur_sigma=sigma)
    coverage = torch.full((shape[0], 2), float("nan"))
    out = torch.full_like(z_p, float("nan"))
    run_emulated(emu, z_p, z_c, delta, act, out, coverage=coverage, **params)
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, **params), dtype, label=str(case))
    # Counted in the kernel's mask pass (tile pixels only, not the halo): the reference's masks exactly.
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act, **params)), case


def test_cuda_kernel_without_coverage(emu):
    for shape in ((2, 4, 37, 45), (2, 4, 37, 44)):  # the general kernel, the vectorised one
        z_p, z_c, delta, act = make_inputs(shape, seed=2)
        out = torch.full_like(z_p, float("nan"))
        assert run_emulated(emu, z_p, z_c, delta, act, out, gate=0.4) == (shape[3] % 4 == 0)
        assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, gate=0.4), torch.float32)


# The vectorised kernel: 16-byte loads along W, so W a multiple of 8 halves or 4 floats;
# tiles of 64 x 32 (the second shape ends mid-tile both ways, the third is one vector wide).
VEC_SHAPES = [(2, 4, 40, 96), (1, 3, 33, 64), (2, 4, 9, 8), (1, 4, 64, 64)]
VEC_GRID = list(itertools.product(VEC_SHAPES, DTYPE_CODES, (1, 3, 5, 7)))


@pytest.mark.parametrize("case", VEC_GRID, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_vectorised_cuda_kernel_matches_reference(emu, case):
    shape, dtype, ksize = case
    rng = random.Random(str(case))
    params = dict(blend=rng.choice(["convex", "paper"]), similarity=rng.choice(["latent", "difference"]),
                  gate=rng.choice([None, 0.45]), blur_ksize=ksize, blur_sigma=rng.choice([0.2, 2.0]))
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=params["similarity"], gate=params["gate"], seed=7)
    coverage = torch.full((shape[0], 2), float("nan"))
    out = torch.full_like(z_p, float("nan"))
    assert run_emulated(emu, z_p, z_c, delta, act, out, coverage=coverage, **params), "took the general kernel"
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, **params), dtype, label=str(case))
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act, **params)), case


def test_the_general_kernel_takes_what_vectors_cannot_load(emu):
    z_p, z_c, delta, act = make_inputs((1, 4, 16, 24), torch.float16, seed=4)
    # W of 20 halves: not a whole number of 16-byte vectors
    narrow = [t[..., :20].contiguous() for t in (z_p, z_c, delta, act)]
    out = torch.full_like(narrow[0], float("nan"))
    assert not run_emulated(emu, *narrow, out)
    assert_matches_reference(out, reference.repair(*narrow), torch.float16)
    # the same values one element into their storage: no row starts on 16 bytes
    shifted = torch.empty(z_p.numel() + 1, dtype=z_p.dtype)[1:].view_as(z_p).copy_(z_p)
    out = torch.full_like(z_p, float("nan"))
    assert not run_emulated(emu, shifted, z_c, delta, act, out)
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act), torch.float16)
    # a blur wider than the vectorised kernel's halo
    out = torch.full_like(z_p, float("nan"))
    assert not run_emulated(emu, z_p, z_c, delta, act, out, blur_ksize=9, blur_sigma=2.0)
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, blur_ksize=9, blur_sigma=2.0),
                             torch.float16)
