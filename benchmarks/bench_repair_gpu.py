"""GPU timings of the repair op with triton.testing.do_bench (CUDA-event timing, L2 flushed).

    python3 benchmarks/bench_repair_gpu.py [--quick]
    python3 benchmarks/bench_repair_gpu.py --dry-run     (CPU: tiny shapes, checks the script itself)

Three parts, each provider first checked against the eager reference:

1. throughput per shape: eager reference, torch.compile of the reference, triton and cuda
   (and each with return_coverage=True; "cuda-general": the CUDA launcher's general kernel,
   chosen by inputs one element off 16 bytes, beside the vectorised one), against a device-to-device copy moving the same
   bytes as the op (read z_p and z_c, write out) and an empty kernel launch. The big shapes
   (256x4x128x128 fp16, 64x4x128x128 fp32) say how close the kernels are to the copy floor.
2. call overhead at SD size (1x4x64x64 fp16): sau_kernels.repair, torch.ops.sau.repair called
   directly, and a CUDA graph replaying the out= op, each in units of an empty launch.
3. CUDA-graph replay of the out= op against a graph replaying the same bytes' copy, per shape.

Prints microseconds, effective GB/s and ratios; writes bench_repair_gpu.json to $OUT if set,
else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sau_kernels as sk  # noqa: E402
from sau_kernels import reference  # noqa: E402

THROUGHPUT = [((1, 4, 64, 64), torch.float16), ((8, 4, 64, 64), torch.float16),
              ((4, 4, 128, 128), torch.float32), ((64, 4, 128, 128), torch.float32),
              ((256, 4, 128, 128), torch.float16)]
OVERHEAD = ((1, 4, 64, 64), torch.float16)
GRAPHS = [((1, 4, 64, 64), torch.float16), ((64, 4, 128, 128), torch.float32),
          ((256, 4, 128, 128), torch.float16)]
DRY = [((2, 4, 16, 16), torch.float32), ((1, 4, 24, 20), torch.float16)]


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    z_c = torch.randn(B, C, H, W, generator=g)
    z_p = z_c + torch.randn(B, C, H, W, generator=g)
    delta, act = torch.randn(C, H, W, generator=g), torch.rand(H, W, generator=g)
    return [t.to(device) for t in (z_p.to(dtype), z_c.to(dtype), delta, act)]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a storage one element off 16 bytes: the CUDA launcher then runs its
    general kernel instead of the vectorised one (same math), for an A/B of the two."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].view(t.shape).copy_(t)


def _moved(args) -> int:
    """Bytes the op must move at least: read z_p and z_c, write out (delta and act once)."""
    return 3 * args[0].numel() * args[0].element_size() + (args[2].numel() + args[3].numel()) * 4


def _timer(dry: bool, warmup: int, rep: int):
    if not dry:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup, rep=rep) * 1e3  # ms -> us

    def cpu_timer(fn):  # the dry run's stand-in: median of a few wall-clock calls
        fn()
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
        return statistics.median(samples)

    return cpu_timer


def _close(got, expected) -> bool:
    # Loose on purpose (fp16 storage, values of order 1): tests/test_gpu.py is the strict check.
    return torch.allclose(got.float().cpu(), expected.float().cpu(), atol=2e-2, rtol=1e-2)


def _graph(fn, device):
    """A CUDA graph replaying fn (warmed up off the capture stream), or None on the CPU."""
    if device != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes: checks this script only")
    opts = ap.parse_args()
    dry = opts.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("bench_repair_gpu: no CUDA device (use --dry-run to check the script on the CPU)")
        return 1
    warmup, rep = (5, 20) if opts.quick else (25, 100)  # milliseconds, do_bench's units
    bench = _timer(dry, warmup, rep)
    # The spec's arithmetic is fp32: keep the eager reference's convolutions out of TF32.
    torch.backends.cudnn.allow_tf32 = False
    backends = [b for b in ("cpp", "triton", "cuda") if b in sk.available_backends(device)]
    if dry:
        import triton

        print(f"DRY RUN on the CPU (timings meaningless): torch {torch.__version__}, triton {triton.__version__}")
    else:
        import triton

        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"backends: {backends}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    compiled = None if (opts.quick or dry) else torch.compile(reference.repair, dynamic=False)

    if dry:
        def empty_launch():
            pass
    else:
        @triton.jit
        def _empty_kernel(x_ptr):
            pass

        scratch = torch.empty(1, device=device)

        def empty_launch():
            _empty_kernel[(1,)](scratch)

    empty_us = bench(empty_launch)
    rows, failures = [], []

    # 1. throughput
    for shape, dtype in (DRY if dry else THROUGHPUT):
        args = _inputs(shape, dtype, device)
        moved = _moved(args)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_us = bench(lambda: dst.copy_(src))  # reads + writes `moved` bytes in all
        expected = reference.repair(*args)
        fns = {"eager": lambda: reference.repair(*args)}
        if compiled is not None:
            fns["compile"] = lambda: compiled(*args)
        for b in backends:
            fns[b] = lambda b=b: sk.repair(*args, backend=b)
            fns[f"{b}+cov"] = lambda b=b: sk.repair(*args, backend=b, return_coverage=True)[0]
        if "cuda" in backends:  # the general kernel on the same values (inputs off 16 bytes)
            general = [_misaligned(a) for a in args[:2]] + args[2:]
            fns["cuda-general"] = lambda: sk.repair(*general, backend="cuda")
        timings = {}
        for name, fn in fns.items():
            got = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if not _close(got, expected):
                failures.append(f"{name} {shape} {dtype}: max err {(got.float().cpu() - expected.float().cpu()).abs().max():.3g}")
            timings[name] = bench(fn)
        for name, us in timings.items():
            rows.append({
                "part": "throughput", "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                "provider": name, "us": us, "gb_per_s": moved / us / 1e3, "vs_eager": timings["eager"] / us,
                "vs_compile": timings["compile"] / us if "compile" in timings else None,
                "x_copy": us / copy_us, "x_empty_launch": us / empty_us,
                "copy_us": copy_us, "copy_gb_per_s": moved / copy_us / 1e3, "empty_launch_us": empty_us,
            })

    # 2. call overhead at SD size: wrapper, direct operator, graph replay
    shape, dtype = DRY[0] if dry else OVERHEAD
    args = _inputs(shape, dtype, device)
    out = torch.empty_like(args[0])
    op_args = (*args, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    overhead = {}
    for b in [b for b in backends if b != "cpp" or dry]:
        sk.repair(*args, backend=b)  # registers b as the operator's implementation
        overhead[f"{b} sau_kernels.repair"] = bench(lambda: sk.repair(*args, backend=b))
        overhead[f"{b} torch.ops.sau.repair"] = bench(lambda: torch.ops.sau.repair.default(*op_args))
        overhead[f"{b} sau_kernels.repair(out=)"] = bench(lambda: sk.repair(*args, backend=b, out=out))
        g = _graph(lambda: torch.ops.sau.repair_out.default(*op_args, out=out), device)
        if g is not None:
            overhead[f"{b} graph replay (out=)"] = bench(g.replay)
    for name, us in overhead.items():
        rows.append({"part": "overhead", "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                     "provider": name, "us": us, "x_empty_launch": us / empty_us, "empty_launch_us": empty_us})

    # 3. CUDA-graph replay of the out= op against a graph of the same bytes' copy
    for shape, dtype in ([] if dry else GRAPHS):
        args = _inputs(shape, dtype, device)
        out = torch.empty_like(args[0])
        moved = _moved(args)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        g_copy = _graph(lambda: dst.copy_(src), device)
        copy_us = bench(g_copy.replay)
        op_args = (*args, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
        for b in [b for b in backends if b != "cpp"]:
            sk.repair(*args, backend=b)
            g = _graph(lambda: torch.ops.sau.repair_out.default(*op_args, out=out), device)
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            if not _close(out, reference.repair(*args)):
                failures.append(f"graph {b} {shape} {dtype}: replay differs from the reference")
            us = bench(g.replay)
            rows.append({"part": "graph", "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                         "provider": f"{b} graph", "us": us, "gb_per_s": moved / us / 1e3,
                         "x_copy": us / copy_us, "copy_us": copy_us, "copy_gb_per_s": moved / copy_us / 1e3})

    windows = {}
    if "triton" in backends:  # what the autotuner chose per key (shape, blur, mode, dtypes)
        from sau_kernels import triton_repair

        windows = {str(key): str(config) for key, config in triton_repair._repair_tuned.cache.items()}
        for key, config in windows.items():
            print(f"triton window for {key}: {config}")

    print(f"\nempty kernel launch: {empty_us:.1f} us")
    print(f"{'part':<10} {'shape':<16} {'dtype':<8} {'provider':<30} {'us':>10} {'GB/s':>8} {'vs eager':>9} "
          f"{'x copy':>7} {'x launch':>8}")
    for r in rows:
        gb = f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else "-"
        ve = f"{r['vs_eager']:.2f}x" if "vs_eager" in r else "-"
        xc = f"{r['x_copy']:.2f}x" if "x_copy" in r else "-"
        xl = f"{r['x_empty_launch']:.1f}x" if "x_empty_launch" in r else "-"
        print(f"{r['part']:<10} {'x'.join(map(str, r['shape'])):<16} {r['dtype']:<8} {r['provider']:<30} "
              f"{r['us']:>10.1f} {gb:>8} {ve:>9} {xc:>7} {xl:>8}")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    if dry:
        out_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"gpu": torch.cuda.get_device_name() if not dry else "none (dry run)", "torch": torch.__version__,
               "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    path = out_dir / ("bench_repair_gpu_dry.json" if dry else "bench_repair_gpu.json")
    path.write_text(json.dumps({"machine": machine, "results": rows, "triton_windows": windows, "failures": failures}, indent=1) + "\n")
    print(f"saved {path}")
    for f in failures:
        print("MISMATCH", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
