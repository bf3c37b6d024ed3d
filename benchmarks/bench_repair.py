"""The repair op, every provider side by side in one run (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/bench_repair.py      (or: make bench)

Providers: reference (eager), compile (torch.compile of the reference), cpp, and on a GPU
triton and cuda. benchmarks/conftest.py prints the medians with the ratio to the eager
reference and writes benchmarks/results/bench_repair_<device>.json.

Environment: SAU_BENCH_DEVICE=cpu|cuda (default: cuda when available), SAU_BENCH_THREADS=N
(torch.set_num_threads; default: torch's choice).
"""

from __future__ import annotations

import os

import pytest
import torch

import sau_kernels as sk
from sau_kernels import reference

DEVICE = os.environ.get("SAU_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("SAU_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SAU_BENCH_THREADS"]))

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (4, 4, 128, 128)]
DTYPES = [torch.float32, torch.float16]
PROVIDERS = ["reference", "compile", "cpp", "triton", "cuda"]

# (shape, dtype name) -> provider -> stats; read by benchmarks/conftest.py.
RESULTS: dict[tuple, dict[str, dict]] = {}

_compiled = torch.compile(reference.repair, dynamic=False)


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    z_c = torch.randn(B, C, H, W, generator=g)
    z_p = z_c + torch.randn(B, C, H, W, generator=g)
    delta, act = torch.randn(C, H, W, generator=g), torch.rand(H, W, generator=g)
    return [t.to(DEVICE) for t in (z_p.to(dtype), z_c.to(dtype), delta, act)]


def _runner(provider, args):
    if provider == "reference":
        return lambda: reference.repair(*args)
    if provider == "compile":
        return lambda: _compiled(*args)
    return lambda: sk.repair(*args, backend=provider)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_repair(benchmark, provider, shape, dtype):
    if provider in ("reference", "compile"):
        pass  # run everywhere
    elif provider not in sk.available_backends(DEVICE) or (provider == "triton" and DEVICE == "cpu"):
        pytest.skip(f"{provider} does not run compiled on {DEVICE}")
    args = _inputs(shape, dtype)
    fn = _runner(provider, args)
    # Same output as the reference (loosely: this is a benchmark, the tests are strict).
    torch.testing.assert_close(fn(), reference.repair(*args), atol=1e-2, rtol=1e-2)
    if DEVICE == "cuda":
        run = fn

        def fn():
            run()
            torch.cuda.synchronize()

    benchmark.group = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(provider=provider, device=DEVICE)
    benchmark(fn)

    data = sorted(benchmark.stats.stats.data)
    q = lambda f: data[min(len(data) - 1, int(f * len(data)))]  # noqa: E731
    moved = 3 * args[0].numel() * args[0].element_size() + (args[2].numel() + args[3].numel()) * 4
    RESULTS.setdefault((shape, str(dtype).removeprefix("torch.")), {})[provider] = {
        "median_s": benchmark.stats.stats.median,
        "p20_s": q(0.2),
        "p80_s": q(0.8),
        "rounds": len(data),
        "gb_per_s": moved / benchmark.stats.stats.median / 1e9,
    }
