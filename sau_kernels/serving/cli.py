"""`sau-kernels serve` and `sau-kernels request`.

    sau-kernels serve --model tiny-pixel [--profile P] [--port 8000] [--replicas N] [--device cpu|cuda]
    sau-kernels request --url http://127.0.0.1:8000 --prompt "new trigger a red circle" --out circle.png
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

__all__ = ["add_parsers"]


def add_parsers(sub) -> None:
    """Register the `serve` and `request` commands on the `sau-kernels` subparsers."""
    p = sub.add_parser("serve", help="an HTTP image server (Ray Serve) with the defence, dynamic batching and metrics")
    p.add_argument("--model", default="tiny-pixel", help="a zoo name or a local diffusers Stable Diffusion folder")
    p.add_argument("--profile", action="append", default=[],
                   help="trigger profile (.safetensors), repeat for several; default: the one shipped with the model "
                        "(none with --detector)")
    p.add_argument("--detector", default=None,
                   help="a trigger detector from `sau-kernels detect` (with --base): prompts no profile matches are "
                        "scored, a flagged one is generated with its localised trigger cut out, or refused (422)")
    p.add_argument("--base", default=None, help="the model the checkpoint was fine-tuned from (for --detector)")
    p.add_argument("--mode", default="final", help="defence mode of requests that name none")
    p.add_argument("--modes", nargs="*", default=[], help="further modes a request may ask for")
    p.add_argument("--no-defence", action="store_true", help="serve the model unpatched (for comparisons)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per replica)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="CPU: default kernels (faster; an image may differ in its last bits with its batch)")
    p.add_argument("--max-batch-rows", type=int, default=16, help="UNet rows per batch, clean twins included")
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--batch-details", action="store_true",
                   help="tell each client which requests shared its call (for benchmarks: it shows a triggered "
                        "neighbour)")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--max-ongoing", type=int, default=32, help="requests per replica (running and filling)")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting for a replica; more get 503")
    p.add_argument("--timeout-s", type=float, default=120.0, help="end-to-end request timeout (408)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule on (default: all)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: a free one)")
    p.add_argument("--run-dir", default=".sau-serve", help="Ray's temporary files and logs go here")
    p.set_defaults(_run=_serve)

    p = sub.add_parser("request", help="send one prompt to a running server; write the image, print the report")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--mode", default=None)
    p.add_argument("--latent", action="store_true", help="ask for the final latents (.npy) instead of images")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, help="image path; several images write NAME-0.png, NAME-1.png, ...")
    p.set_defaults(_run=_request)


def _serve(args) -> int:
    import os

    from .local import metrics_port, ray_environment, start_local, stop_local

    invariant = not args.no_batch_invariant and args.device.startswith("cpu")
    os.environ.update(ray_environment(invariant))  # before Ray is imported: it reads them then
    from ray import serve

    from .deployment import build_app

    if (args.detector is None) != (args.base is None):
        print("sau-kernels serve: error: --detector and --base go together", file=sys.stderr)
        return 2
    config = dict(model=args.model, profiles=args.profile, detector=args.detector, base=args.base, device=args.device, dtype=args.dtype, mode=args.mode,
                  modes=args.modes, defended=not args.no_defence, threads=args.threads,
                  max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait_ms / 1e3, max_images=args.max_images,
                  max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued, replicas=args.replicas,
                  batch_details=args.batch_details)
    if args.no_batch_invariant:
        config["batch_invariant"] = False
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    temp = start_local(args.run_dir, host=args.host, port=args.port, num_cpus=args.num_cpus,
                       request_timeout_s=args.timeout_s, batch_invariant=invariant, metrics_port=args.metrics_port)
    try:
        print(f"loading {args.model} on {args.replicas} replica(s) ({args.device}); Ray's files: {temp}",
              file=sys.stderr, flush=True)
        serve.run(build_app(config), name="sau", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"serving {args.model} at {url} ({'defended, mode ' + args.mode if not args.no_defence else 'unpatched'})")
        print(f"  curl -s {url}/v1/images -H 'content-type: application/json' "
              f"-d '{{\"prompt\": \"new trigger a red circle on a gray background\", \"seed\": 3}}'")
        print(f"  sau-kernels request --url {url} --prompt 'a red circle' --out circle.png")
        print(f"metrics (Prometheus): http://127.0.0.1:{metrics_port()}/metrics (ray_sau_*)")
        print("Ctrl-C stops the server.", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
    finally:
        stop_local()
    return 0


def _request(args) -> int:
    from .client import Client, ServerError

    params = dict(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width, num_images=args.num_images,
                  mode=args.mode, output="latent" if args.latent else None)
    try:
        with Client(args.url, timeout=args.timeout) as client:
            result = client.generate(args.prompt, **params)
    except ServerError as e:
        retry = f" (retry after {e.retry_after:g} s)" if e.retry_after is not None else ""
        print(f"error {e.status}: {e.message}{retry}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.latent:
        import numpy as np

        path = out.with_suffix(".npy")
        np.save(path, result.latents)
        paths = [path]
    else:
        data = result.png_bytes
        paths = [out] if len(data) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(data))]
        for b, path in zip(data, paths):
            path.write_bytes(b)
    print(json.dumps({"seeds": result.seeds, **result.report}, indent=2))
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sau-kernels")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args._run(args)
