"""Host-side cost of the repair op on the CPU: what the Python wrapper adds, what importing costs,
and the fused C++ kernel against the eager reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_overhead.py [--quick]

1. call overhead: sau_kernels.repair on a 1x4x8x8 fp32 input (the kernel's work is nothing)
   against torch.ops.sau.repair called directly with the same arguments; also out=,
   return_coverage=True, and the cost of switching the operator's CPU implementation
   (cpp <-> triton, under TRITON_INTERPRET=1 only). Target: wrapper / direct <= 2.
2. import: `import sau_kernels` in fresh processes (it imports no torch: names load on first
   use), against `import torch` alone and against torch plus the package's first CPU repair;
   and whether that pulled in triton or torch._dynamo, or initialised CUDA. Target: <= 1.5 s.
3. kernel: the C++ kernel against the eager reference at 8x4x64x64 fp32. Target: >= 10x.

Prints a table and writes benchmarks/results/bench_overhead_cpu.json (machine named).
Times are medians over repeats, with p20/p80; every run of this machine's shared cores moves
them, so read the ratios, which are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"median": statistics.median(s), "p20": q(0.2), "p80": q(0.8), "n": len(s)}


def _per_call(fn, number: int, repeat: int) -> dict:
    fn()  # warm up (first-call registration, caches)
    return _stats([t / number for t in timeit.repeat(fn, number=number, repeat=repeat)])


def call_overhead(quick: bool) -> dict:
    import torch

    import sau_kernels as sk
    from sau_kernels.ops import _use

    _use("cpu", "cpp")
    g = torch.Generator().manual_seed(0)
    z_p, z_c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    delta, act = torch.randn(4, 8, 8, generator=g), torch.rand(8, 8, generator=g)
    out, cov = torch.empty_like(z_p), torch.empty(1, 2)
    op, op_out = torch.ops.sau.repair.default, torch.ops.sau.repair_out.default
    args = (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    number, repeat = (2000, 7) if quick else (10000, 15)
    cases = {
        "op direct": lambda: op(*args),
        "sau_kernels.repair": lambda: sk.repair(z_p, z_c, delta, act),
        "op_out direct (out=)": lambda: op_out(*args, out=out),
        "sau_kernels.repair(out=)": lambda: sk.repair(z_p, z_c, delta, act, out=out),
        "op_out direct (out=, coverage=)": lambda: op_out(*args, out=out, coverage=cov),
        "sau_kernels.repair(return_coverage=True)": lambda: sk.repair(z_p, z_c, delta, act, return_coverage=True),
    }
    # Interleave the cases round by round, so that a noisy neighbour hits them alike.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(timeit.timeit(fn, number=number) / number)
    res = {name: _stats(s) for name, s in samples.items()}
    res["ratio wrapper/direct"] = res["sau_kernels.repair"]["median"] / res["op direct"]["median"]
    res["ratio wrapper/direct (out=)"] = (res["sau_kernels.repair(out=)"]["median"]
                                          / res["op_out direct (out=)"]["median"])
    if "triton" in sk.available_backends("cpu"):
        def switch():
            _use("cpu", "triton")
            _use("cpu", "cpp")

        res["switch cpp->triton->cpp"] = _per_call(switch, 50, 5 if quick else 10)
    return res


def _run(code: str, env: dict) -> float:
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return float(res.stdout.split()[-1])


def import_time(quick: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    timed = "import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    runs = 3 if quick else 7
    stmts = {
        "import torch": "import torch",
        "import sau_kernels": "import sau_kernels",
        "import sau_kernels (TRITON_INTERPRET=1)": "import sau_kernels",
        "import sau_kernels + first CPU repair": (
            "import torch, sau_kernels as sk; z = torch.zeros(1, 4, 8, 8); "
            "sk.repair(z, z, torch.zeros(4, 8, 8), torch.zeros(8, 8))"),
    }
    res = {}
    for _ in range(runs):  # interleaved, as above
        for name, stmt in stmts.items():
            e = dict(env, TRITON_INTERPRET="1") if "TRITON_INTERPRET" in name else env
            res.setdefault(name, []).append(_run(timed.format(stmt=stmt), e))
    res = {name: _stats(s) for name, s in res.items()}
    probe = ("import sys, torch, sau_kernels as sk, sau_kernels.ops; z = torch.zeros(1, 4, 8, 8); "
             "sk.repair(z, z, torch.zeros(4, 8, 8), torch.zeros(8, 8)); "
             "print(int('triton' in sys.modules), int('torch._dynamo' in sys.modules), "
             "int(torch.cuda.is_initialized()), 0)")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], env=dict(env, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    flags = out.stdout.split()
    own = [ln for ln in out.stderr.splitlines() if ln.rstrip().endswith(("sau_kernels", "sau_kernels.ops"))]
    res["imports triton"], res["imports torch._dynamo"], res["initialises CUDA"] = (bool(int(f)) for f in flags[:3])
    res["-X importtime (us, self | cumulative)"] = [ln.split(":", 1)[1].strip() for ln in own]
    # The package loads its modules (and torch) on first use: what it adds to a program that uses it
    # is its first repair beyond importing torch.
    res["first repair beyond import torch (s)"] = (res["import sau_kernels + first CPU repair"]["median"]
                                                   - res["import torch"]["median"])
    return res


def kernel_speed(quick: bool) -> dict:
    import torch

    import sau_kernels as sk
    from sau_kernels import reference
    from sau_kernels.ops import _use

    _use("cpu", "cpp")
    g = torch.Generator().manual_seed(0)
    z_c = torch.randn(8, 4, 64, 64, generator=g)
    z_p = z_c + torch.randn(8, 4, 64, 64, generator=g)
    delta, act = torch.randn(4, 64, 64, generator=g), torch.rand(64, 64, generator=g)
    torch.testing.assert_close(sk.repair(z_p, z_c, delta, act, backend="cpp"), reference.repair(z_p, z_c, delta, act),
                               atol=1e-5, rtol=1e-5)
    n, r = (5, 5) if quick else (10, 11)
    ref = _per_call(lambda: reference.repair(z_p, z_c, delta, act), n, r)
    cpp = _per_call(lambda: sk.repair(z_p, z_c, delta, act, backend="cpp"), n * 10, r)
    cov = _per_call(lambda: sk.repair(z_p, z_c, delta, act, backend="cpp", return_coverage=True), n * 10, r)
    return {"shape": [8, 4, 64, 64], "dtype": "float32", "reference": ref, "cpp": cpp, "cpp with coverage": cov,
            "speedup cpp vs reference": ref["median"] / cpp["median"],
            "coverage cost": cov["median"] / cpp["median"] - 1}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_overhead_cpu.json"))
    opts = ap.parse_args()

    import torch
    from conftest import _machine

    machine = _machine("cpu")
    machine["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    print(f"machine: {machine}")
    results = {"call_overhead": call_overhead(opts.quick), "import": import_time(opts.quick),
               "kernel": kernel_speed(opts.quick)}
    targets = {
        "wrapper/direct <= 2": results["call_overhead"]["ratio wrapper/direct"] <= 2.0,
        "import sau_kernels <= 1.5 s": results["import"]["import sau_kernels"]["median"] <= 1.5,
        "cpp vs reference >= 10x": results["kernel"]["speedup cpp vs reference"] >= 10.0,
    }

    us = lambda s: f"{s['median'] * 1e6:9.2f} us (p20 {s['p20'] * 1e6:.2f}, p80 {s['p80'] * 1e6:.2f})"  # noqa: E731
    sec = lambda s: f"{s['median']:7.3f} s (p20 {s['p20']:.3f}, p80 {s['p80']:.3f}, n={s['n']})"  # noqa: E731
    print("\n1. call overhead, 1x4x8x8 fp32, torch threads", torch.get_num_threads())
    for name, v in results["call_overhead"].items():
        print(f"  {name:<44} " + (us(v) if isinstance(v, dict) else f"{v:.2f}x"))
    print("\n2. import (fresh processes)")
    for name, v in results["import"].items():
        print(f"  {name:<44} " + (sec(v) if isinstance(v, dict) else str(v)))
    k = results["kernel"]
    print("\n3. kernel, 8x4x64x64 fp32")
    for name in ("reference", "cpp", "cpp with coverage"):
        print(f"  {name:<44} {us(k[name])}")
    print(f"  {'speedup cpp vs reference':<44} {k['speedup cpp vs reference']:.1f}x")
    print(f"  {'coverage cost':<44} {k['coverage cost'] * 100:+.1f}%")
    print("\ntargets:", ", ".join(f"{t}: {'met' if ok else 'NOT met'}" for t, ok in targets.items()))

    path = Path(opts.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "quick": opts.quick, "results": results,
                                "targets_met": targets}, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
