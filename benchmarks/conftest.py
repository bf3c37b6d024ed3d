"""Prints the repair benchmark's table (medians, ratio to the eager reference) and saves it as JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _machine(device: str) -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    try:
        from bench_repair import DEVICE, PROVIDERS, RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    machine = _machine(DEVICE)
    tr = terminalreporter
    tr.section("sau repair: median time, speedup over eager reference")
    tr.write_line(f"machine: {machine}")
    header = f"{'shape':<14} {'dtype':<8} " + " ".join(f"{p:>22}" for p in PROVIDERS)
    tr.write_line(header)
    for (shape, dtype), by_provider in RESULTS.items():
        ref = by_provider.get("reference", {}).get("median_s")
        cells = []
        for p in PROVIDERS:
            r = by_provider.get(p)
            if r is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = f"{ref / r['median_s']:.1f}x" if ref else "?"
            cells.append(f"{r['median_s'] * 1e6:>12.1f} us {ratio:>7}")
        tr.write_line(f"{'x'.join(map(str, shape)):<14} {dtype:<8} " + " ".join(cells))

    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"bench_repair_{DEVICE}.json"
    rows = [{"shape": list(shape), "dtype": dtype, "provider": p, **r}
            for (shape, dtype), by_provider in RESULTS.items() for p, r in by_provider.items()]
    path.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    tr.write_line(f"saved {path}")
