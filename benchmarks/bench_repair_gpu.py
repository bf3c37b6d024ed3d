"""GPU timings of the repair op with triton.testing.do_bench (CUDA-event timing, L2 flushed).

    python3 benchmarks/bench_repair_gpu.py [--quick]

For each shape: eager reference, torch.compile of the reference, triton and cuda (each first
checked against the eager output), plus two floors measured in the same run: a device-to-
device copy moving the same bytes as the op (read z_p and z_c, write out) and an empty kernel
launch. Prints microseconds, effective GB/s and ratios; writes bench_repair_gpu.json to $OUT
if set, else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sau_kernels as sk  # noqa: E402
from sau_kernels import reference  # noqa: E402

SHAPES = [((1, 4, 64, 64), torch.float16), ((8, 4, 64, 64), torch.float16),
          ((4, 4, 128, 128), torch.float32), ((256, 4, 128, 128), torch.float16)]


@triton.jit
def _empty_kernel(x_ptr):
    pass


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    z_c = torch.randn(B, C, H, W, generator=g)
    z_p = z_c + torch.randn(B, C, H, W, generator=g)
    delta, act = torch.randn(C, H, W, generator=g), torch.rand(H, W, generator=g)
    return [t.cuda() for t in (z_p.to(dtype), z_c.to(dtype), delta, act)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_repair_gpu: no CUDA device")
        return 1
    warmup, rep = (5, 20) if opts.quick else (25, 100)  # milliseconds, do_bench's units
    # The spec's arithmetic is fp32: keep the eager reference's convolutions out of TF32.
    torch.backends.cudnn.allow_tf32 = False
    backends = [b for b in ("triton", "cuda") if b in sk.available_backends("cuda")]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"backends: {backends}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    compiled = None if opts.quick else torch.compile(reference.repair, dynamic=False)

    scratch = torch.empty(1, device="cuda")
    empty_us = do_bench(lambda: _empty_kernel[(1,)](scratch), warmup=warmup, rep=rep) * 1e3
    rows, failures = [], []
    for shape, dtype in SHAPES:
        args = _inputs(shape, dtype)
        moved = 3 * args[0].numel() * args[0].element_size() + (args[2].numel() + args[3].numel()) * 4
        src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_us = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep) * 1e3  # reads + writes `moved`
        expected = reference.repair(*args)
        fns = {"eager": lambda: reference.repair(*args)}
        if compiled is not None:
            fns["compile"] = lambda: compiled(*args)
        for b in backends:
            fns[b] = lambda b=b: sk.repair(*args, backend=b)
        timings = {}
        for name, fn in fns.items():
            got = fn()
            torch.cuda.synchronize()
            # Loose on purpose (fp16 storage, values of order 1): tests/test_gpu.py is the strict check.
            if not torch.allclose(got.float(), expected.float(), atol=2e-2, rtol=1e-2):
                failures.append(f"{name} {shape} {dtype}: max err {(got.float() - expected.float()).abs().max():.3g}")
            timings[name] = do_bench(fn, warmup=warmup, rep=rep) * 1e3
        for name, us in timings.items():
            rows.append({
                "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "provider": name,
                "us": us, "gb_per_s": moved / us / 1e3, "vs_eager": timings["eager"] / us,
                "vs_compile": timings["compile"] / us if "compile" in timings else None,
                "x_copy": us / copy_us, "x_empty_launch": us / empty_us,
                "copy_us": copy_us, "empty_launch_us": empty_us,
            })

    print(f"\nempty kernel launch: {empty_us:.1f} us")
    print(f"{'shape':<16} {'dtype':<8} {'provider':<8} {'us':>10} {'GB/s':>8} {'vs eager':>9} "
          f"{'vs compile':>10} {'x copy':>7} {'x launch':>8}")
    for r in rows:
        vc = f"{r['vs_compile']:.2f}x" if r["vs_compile"] else "-"
        print(f"{'x'.join(map(str, r['shape'])):<16} {r['dtype']:<8} {r['provider']:<8} {r['us']:>10.1f} "
              f"{r['gb_per_s']:>8.1f} {r['vs_eager']:>8.2f}x {vc:>10} {r['x_copy']:>6.2f}x {r['x_empty_launch']:>7.1f}x")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    (out_dir / "bench_repair_gpu.json").write_text(
        json.dumps({"machine": machine, "results": rows, "failures": failures}, indent=1) + "\n")
    for f in failures:
        print("MISMATCH", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
