"""The repair kernels at the big shapes, once each, for Nsight Compute.

    ncu --profile-from-start off --kernel-name regex:repair --section SpeedOfLight \
        --section MemoryWorkloadAnalysis python3 benchmarks/ncu_repair.py
    python3 benchmarks/ncu_repair.py --dry-run        (CPU, tiny shapes: checks the script)

Every backend is warmed up first (Triton compiles), then the profiled region (between
cudaProfilerStart and cudaProfilerStop) runs each kernel once per shape, so that ncu replays
exactly those launches. benchmarks/gpu_check.sh runs it when ncu is on the PATH.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sau_kernels as sk  # noqa: E402

SHAPES = [((256, 4, 128, 128), torch.float16), ((64, 4, 128, 128), torch.float32)]
DRY = [((2, 4, 16, 16), torch.float32)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    opts = ap.parse_args()
    device = "cpu" if opts.dry_run else "cuda"
    backends = [b for b in ("cpp" if opts.dry_run else "", "triton", "cuda") if b in sk.available_backends(device)]
    cases = []
    for shape, dtype in (DRY if opts.dry_run else SHAPES):
        g = torch.Generator().manual_seed(0)
        z_c = torch.randn(*shape, generator=g)
        args = [t.to(device) for t in ((z_c + torch.randn(*shape, generator=g)).to(dtype), z_c.to(dtype),
                                       torch.randn(*shape[1:], generator=g), torch.rand(*shape[2:], generator=g))]
        cases.append((shape, dtype, args, torch.empty_like(args[0])))
    for b in backends:
        for shape, dtype, args, out in cases:
            for coverage in (False, True):  # warm up: compile, register
                sk.repair(*args, backend=b, out=out, return_coverage=coverage)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        for shape, dtype, args, out in cases:
            sk.repair(*args, backend=b, out=out)
            print(f"profiled: {b} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}")
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
