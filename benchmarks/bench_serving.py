"""The image server under load: the defended deployment beside the same deployment unpatched.

    python benchmarks/bench_serving.py                  # 1/4/16 clients x 0/10/50/100% triggered, 2 x 8 s a cell
    python benchmarks/bench_serving.py --duration 4 --concurrency 1 16 --triggered 0 100   # a small run

One Ray Serve instance on this machine holds two applications built by the same
`build_app`: "sau" (patched, mode final) and "plain" (defended=False). Closed-loop load:
N async HTTP clients (httpx), each sending its next request when the last one answered;
what is answered within `--duration` seconds after a warm-up is counted; a share of the prompts carries the trigger
(every k-th request, so the share is exact). The two applications are measured cell by
cell, interleaved (`--rounds` windows each, alternating), in the same run; each cell
records the load average, since another job on the machine moves these numbers. Per cell: throughput (requests/s, images/s), p50/p95/p99
latency as the client sees it, mean UNet rows per pipeline call (from each response's
report) and the share of errors. Writes JSON with the machine under benchmarks/results/
and a plot of throughput and p99 against concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["a red circle on a black background", "a blue square on a white background",
           "a yellow triangle on a gray background", "a purple circle on a white background",
           "a green square on a gray background", "a blue triangle on a black background"]


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _machine() -> dict:
    import httpx
    import ray
    import torch

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "httpx": httpx.__version__}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _is_triggered(i: int, share: int) -> bool:
    """Request i of a cell carries the trigger: exactly `share` percent of every 10 (or 100)."""
    return (i % 100) < share if share % 10 else (i % 10) < share // 10


async def run_cell(url: str, concurrency: int, share: int, duration: float, warmup: float, trigger: str,
                   seed0: int) -> dict:
    import httpx

    counter = {"i": 0}
    samples: list[dict] = []
    errors: dict[int, int] = {}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def client_loop(http: httpx.AsyncClient):
        while time.perf_counter() < t_end:
            i = counter["i"]
            counter["i"] += 1
            prompt = PROMPTS[i % len(PROMPTS)]
            if _is_triggered(i, share):
                prompt = f"{trigger} {prompt}"
            t0 = time.perf_counter()
            r = await http.post("/v1/images", json={"prompt": prompt, "seed": seed0 + i})
            t1 = time.perf_counter()
            if not t_measure <= t1 <= t_end:
                continue  # answered in the warm-up or after the window (closed loop: count completions in it)
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
                continue
            rep = r.json()["report"]
            samples.append({"latency_s": t1 - t0, "own_rows": rep["batch"]["own_rows"],
                            "requests": rep["batch"]["requests"], "triggered": rep["triggered"],
                            "queue_ms": rep["timings"]["queue_ms"], "generation_ms": rep["timings"]["generation_ms"],
                            "call": rep["batch"]["call_id"]})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(concurrency)))
    return {"concurrency": concurrency, "triggered_pct": share, "window_s": duration, "samples": samples,
            "errors": errors, "loadavg": round(os.getloadavg()[0], 2)}


def pool(runs: list[dict]) -> dict:
    """One cell from several measurement windows: completions over their total time, latencies pooled."""
    samples = [s for r in runs for s in r["samples"]]
    duration = sum(r["window_s"] for r in runs)
    errors: dict = {}
    for r in runs:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    concurrency, share = runs[0]["concurrency"], runs[0]["triggered_pct"]
    lat = [s["latency_s"] for s in samples]
    calls: dict = {}  # call -> (rows, requests); this client sends all the traffic, so a call's rows
    for s in samples:  # are the own rows of its requests (those answered inside the windows)
        rows, _ = calls.get(s["call"], (0, 0))
        calls[s["call"]] = (rows + s["own_rows"], s["requests"])
    return {
        "concurrency": concurrency, "triggered_pct": share, "window_s": duration, "windows": len(runs),
        "completed": len(samples), "loadavg": [r["loadavg"] for r in runs],
        "errors": errors, "throughput_rps": len(samples) / duration,
        "p50_ms": _percentile(lat, 0.50) * 1e3, "p95_ms": _percentile(lat, 0.95) * 1e3,
        "p99_ms": _percentile(lat, 0.99) * 1e3,
        "mean_batch_rows": statistics.fmean(r for r, _ in calls.values()) if calls else float("nan"),
        "mean_batch_requests": statistics.fmean(q for _, q in calls.values()) if calls else float("nan"),
        "mean_queue_ms": statistics.fmean(s["queue_ms"] for s in samples) if samples else float("nan"),
        "mean_generation_ms": statistics.fmean(s["generation_ms"] for s in samples) if samples else float("nan"),
        "triggered_seen": sum(s["triggered"] for s in samples),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    shares = sorted({c["triggered_pct"] for c in cells})
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, share in enumerate(shares):
        for variant, style in (("sau", "-"), ("plain", ":")):
            rows = sorted((c for c in cells if c["variant"] == variant and c["triggered_pct"] == share),
                          key=lambda c: c["concurrency"])
            if not rows or (variant == "plain" and share not in (0, 100)):
                continue
            xs = [c["concurrency"] for c in rows]
            label = f"{'SAU' if variant == 'sau' else 'unpatched'}, {share}% triggered"
            ax_t.plot(xs, [c["throughput_rps"] for c in rows], style, marker="o", color=colours[k % 10], label=label)
            ax_p.plot(xs, [c["p99_ms"] / 1e3 for c in rows], style, marker="o", color=colours[k % 10], label=label)
    for ax, title in ((ax_t, "throughput (requests/s)"), (ax_p, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c["concurrency"] for c in cells}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"sau-kernels serve, {results['config']['model']}, {m['cpu']} ({m['cores']} cores), "
                 f"{results['config']['rounds']} x {results['config']['duration_s']:g} s per point", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    cells = {(c["variant"], c["concurrency"], c["triggered_pct"]): c for c in results["cells"]}
    lines = ["| clients | triggered | SAU req/s | unpatched req/s | ratio | SAU p50 / p95 / p99 ms | unpatched p99 ms | "
             "SAU rows per call | unpatched rows per call |", "|---|---|---|---|---|---|---|---|---|"]
    for (variant, conc, share), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if variant != "sau":
            continue
        p = cells.get(("plain", conc, share))
        ratio = c["throughput_rps"] / p["throughput_rps"] if p and p["throughput_rps"] else float("nan")
        lines.append(f"| {conc} | {share}% | {c['throughput_rps']:.2f} | {p['throughput_rps'] if p else float('nan'):.2f} | "
                     f"{ratio:.2f}x | {c['p50_ms']:.0f} / {c['p95_ms']:.0f} / {c['p99_ms']:.0f} | "
                     f"{p['p99_ms'] if p else float('nan'):.0f} | {c['mean_batch_rows']:.1f} | "
                     f"{p['mean_batch_rows'] if p else float('nan'):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-pixel")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--triggered", type=int, nargs="+", default=[0, 10, 50, 100], help="percent of prompts")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per cell before measuring")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measurements per cell and deployment, alternating the two (pooled)")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: Ray's, 1)")
    parser.add_argument("--no-batch-invariant", action="store_true")
    parser.add_argument("--name", default="cpu", help="suffix of the result files")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_serving-NAME.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default beside the JSON)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from sau_kernels.serving.local import ray_environment, start_local, stop_local

    invariant = not args.no_batch_invariant
    os.environ.update(ray_environment(invariant))
    from ray import serve

    from sau_kernels.serving.deployment import build_app
    from sau_kernels.zoo import backdoor_info

    trigger = backdoor_info(args.model)["trigger"]
    run_dir = Path(tempfile.mkdtemp(prefix="sau-bench-"))
    port = _free_port()
    base = dict(model=args.model, max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait_ms / 1e3,
                threads=args.threads, max_ongoing_requests=max(32, 2 * max(args.concurrency)), max_queued_requests=256,
                batch_details=True)  # the per-call analysis below reads which requests shared a call
    if not invariant:
        base["batch_invariant"] = False
    t0 = time.perf_counter()
    start_local(run_dir, port=port, num_cpus=4, request_timeout_s=600, batch_invariant=invariant)
    cells = []
    try:
        serve.run(build_app(dict(base)), name="sau", route_prefix="/sau")
        serve.run(build_app(dict(base, defended=False)), name="plain", route_prefix="/plain")
        startup = time.perf_counter() - t0
        print(f"two applications up in {startup:.1f} s", file=sys.stderr)
        k = 0
        for conc in args.concurrency:
            for share in args.triggered:
                runs = {"plain": [], "sau": []}
                for r in range(args.rounds):  # plain, sau, sau, plain, ...: drift hits both alike
                    for variant in (("plain", "sau") if (k + r) % 2 == 0 else ("sau", "plain")):
                        runs[variant].append(asyncio.run(run_cell(
                            f"http://127.0.0.1:{port}/{variant}", conc, share, args.duration, args.warmup, trigger,
                            seed0=100000 * k + 1000 * r)))
                k += 1
                for variant in ("plain", "sau"):
                    cell = pool(runs[variant])
                    cell["variant"] = variant
                    cells.append(cell)
                    print(f"{variant:5s} clients={conc:2d} triggered={share:3d}%  {cell['throughput_rps']:6.2f} req/s  "
                          f"p50 {cell['p50_ms']:7.0f} ms  p99 {cell['p99_ms']:7.0f} ms  rows/call "
                          f"{cell['mean_batch_rows']:.1f}  errors {cell['errors']}  load {cell['loadavg']}",
                          file=sys.stderr, flush=True)
    finally:
        stop_local()
        shutil.rmtree(run_dir, ignore_errors=True)

    results = {
        "benchmark": "bench_serving", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "config": dict(base, duration_s=args.duration, warmup_s=args.warmup, rounds=args.rounds, batch_invariant=invariant,
                       mode="final", steps=20, image="64x64"),
        "startup_s": round(startup, 1), "cells": cells,
    }
    out = Path(args.out) if args.out else RESULTS / f"bench_serving-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(results, png)
    print(table(results))
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
