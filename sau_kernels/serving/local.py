"""A Ray session on this machine for the server, its tests and its benchmark.

Ray is started for the session only: no dashboard, no usage statistics, token
authentication with a token made for the session (Ray 2.60 turns authentication on for
local clusters and would otherwise write a token into the home directory), and its
temporary files (sockets, logs, object spill) inside the given run directory.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from .numerics import BATCH_INVARIANT_ENV

# Ray's Unix sockets live under <temp dir>/session_<date>_<pid>/sockets/; a socket path
# must stay under 108 bytes.
MAX_TEMP_DIR = 60

__all__ = ["ray_environment", "start_local", "stop_local", "metrics_port"]


def ray_environment(batch_invariant: bool = True) -> dict[str, str]:
    """The environment a local session needs, set before Ray starts (its processes inherit it)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}
    if batch_invariant:
        env.update(BATCH_INVARIANT_ENV)
    return env


def start_local(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
                request_timeout_s: float | None = None, batch_invariant: bool = True,
                metrics_port: int | None = None, log_to_driver: bool = False) -> Path:
    """Start Ray and Serve's HTTP proxy for this process; returns Ray's temp dir.
    Prometheus metrics (Ray's and the server's, named ray_sau_*) are served on
    `metrics_port` (None: a free port, see `metrics_port()`)."""
    already = "ray" in sys.modules
    os.environ.update(ray_environment(batch_invariant))
    import ray
    from ray import serve

    if already:  # Ray read its configuration (the authentication mode) when it was imported
        from ray._raylet import Config

        Config.initialize("")
    run_dir = Path(run_dir).absolute()
    temp = run_dir / "ray"
    if len(str(temp)) > MAX_TEMP_DIR:
        raise ValueError(f"Ray's temp dir {temp} is {len(str(temp))} characters long; its socket paths would pass "
                         f"the 108-byte limit of Unix sockets: use a run directory under {MAX_TEMP_DIR - 4} characters")
    temp.mkdir(parents=True, exist_ok=True)
    extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
    ray.init(include_dashboard=False, _temp_dir=str(temp), num_cpus=num_cpus, log_to_driver=log_to_driver,
             configure_logging=True, logging_level="WARNING", **extra)
    http = {"host": host, "port": port}
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http)
    return temp


def metrics_port() -> int:
    """The port of this node's Prometheus endpoint (/metrics)."""
    import ray

    return ray._private.worker.global_worker.node.metrics_export_port


def stop_local() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
