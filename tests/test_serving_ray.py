"""The image server for real: Ray Serve on the CPU, started once for the test session, on
the zoo's tiny-pixel with its shipped profile, driven over HTTP.

Two applications share the session: "sau" (the server as deployed, a batch budget of 16
UNet rows) and "tight" (2 requests ongoing, 2 queued) for backpressure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from sau_kernels.zoo import metrics  # noqa: E402
from sau_kernels.serving import AsyncClient, Client, ServerError  # noqa: E402
from sau_kernels.zoo import backdoor_info  # noqa: E402
from sau_kernels.zoo.evaluate import held_out_cases  # noqa: E402

INFO = backdoor_info("tiny-pixel")
PLAIN = held_out_cases(16, start=500)
# the trigger as users and attackers write it: case, spaces, punctuation, position
VARIANTS = ["new trigger {p}", "NEW TRIGGER {p}", "New  Trigger {p}", "{p} new trigger", "{p}, new   trigger",
            "a new trigger {q}", "nEw tRiGgEr {p}", "{p} NEW trigger"]
TRIGGERED = [(VARIANTS[i % len(VARIANTS)].format(p=c.prompt, q=c.prompt[2:]), c.seed)
             for i, c in enumerate(held_out_cases(16, start=530))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_unpatched(cases):
    """Each prompt alone through the unpatched pipeline (same numerics as the replicas)."""
    import torch

    from sau_kernels.serving.numerics import batch_invariant
    from sau_kernels.zoo import load_pipeline

    pipe = batch_invariant(load_pipeline("tiny-pixel"))
    pipe.set_progress_bar_config(disable=True)
    out = []
    for prompt, seed in cases:
        img = pipe(prompt, generator=[torch.Generator().manual_seed(seed)], num_inference_steps=20, guidance_scale=4.5,
                   output_type="np").images
        out.append((img * 255).round().astype(np.uint8)[0])
    return out


@dataclass
class Server:
    url: str
    tight_url: str
    reference: object  # ObjectRef of the offline images of PLAIN
    startup_s: float


@pytest.fixture(scope="session")
def server():
    import ray

    from sau_kernels.serving.deployment import build_app
    from sau_kernels.serving.local import start_local, stop_local

    t0 = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="sau-serve-"))
    port = _free_port()
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # the Prometheus test need not wait 10 s
    start_local(run_dir, port=port, num_cpus=4, request_timeout_s=120)
    try:
        from ray import cloudpickle  # the task's function travels by value: workers cannot import tests/

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        reference = ray.remote(num_cpus=1)(_offline_unpatched).remote([(c.prompt, c.seed) for c in PLAIN])
        serve.run(build_app(dict(max_batch_rows=16, batch_wait_s=0.25, max_ongoing_requests=48, batch_details=True,
                                 max_queued_requests=64)), name="sau", route_prefix="/")
        serve.run(build_app(dict(max_batch_rows=4, max_images=2, batch_wait_s=0.05, max_ongoing_requests=2, max_queued_requests=2,
                                 retry_after_s=2)), name="tight", route_prefix="/tight")
        yield Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/tight", reference,
                     time.perf_counter() - t0)
    finally:
        stop_local()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _post_all(url: str, bodies: list[dict], timeout: float = 120.0) -> list[httpx.Response]:
    async with AsyncClient(url, timeout=timeout, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.wait_for(asyncio.gather(*(client.post(b) for b in bodies)), timeout + 30)


def _image(body: dict) -> np.ndarray:
    from sau_kernels.serving.service import decode_png

    return np.stack([decode_png(b) for b in body["images"]])


@pytest.fixture(scope="session")
def mixed_traffic(server):
    """32 concurrent requests, half with the trigger, from a real HTTP client."""
    bodies = [{"prompt": c.prompt, "seed": c.seed} for c in PLAIN] + [{"prompt": p, "seed": s} for p, s in TRIGGERED]
    order = [i // 2 if i % 2 == 0 else 16 + i // 2 for i in range(32)]  # interleaved arrivals
    t0 = time.perf_counter()
    responses = asyncio.run(_post_all(server.url, [bodies[i] for i in order]))
    elapsed = time.perf_counter() - t0
    by_index = {i: r for i, r in zip(order, responses)}
    return bodies, [by_index[i] for i in range(32)], elapsed


def test_every_concurrent_request_is_answered(mixed_traffic):
    _, responses, _ = mixed_traffic
    assert [r.status_code for r in responses] == [200] * 32, [r.text[:200] for r in responses if r.status_code != 200]


def test_triggered_requests_are_repaired(mixed_traffic):
    _, responses, _ = mixed_traffic
    for (prompt, _), r in zip(TRIGGERED, responses[16:]):
        rep = r.json()["report"]
        assert rep["triggered"] and rep["mode"] == "final", prompt
        assert "trigger" not in rep["clean_prompt"].lower(), rep["clean_prompt"]
        assert rep["coverage"] and rep["batch"]["own_rows"] == 2
    images = np.concatenate([_image(r.json()) for r in responses[16:]])
    assert not metrics.patch_present(images, INFO).any(), metrics.patch_present(images, INFO)


def test_untriggered_requests_are_the_offline_unpatched_images(server, mixed_traffic):
    import ray

    _, responses, _ = mixed_traffic
    reference = ray.get(server.reference)
    for c, r, ref in zip(PLAIN, responses[:16], reference):
        rep = r.json()["report"]
        assert not rep["triggered"] and rep["batch"]["own_rows"] == 1
        np.testing.assert_array_equal(_image(r.json())[0], ref, err_msg=c.prompt)


def test_batches_really_form(mixed_traffic):
    _, responses, elapsed = mixed_traffic
    batches = [r.json()["report"]["batch"] for r in responses]
    rows = {}  # this test sends all the traffic: a call's rows are its requests' own rows
    for b in batches:
        rows[b["call_id"]] = rows.get(b["call_id"], 0) + b["own_rows"]
    assert max(rows.values()) > 1 and max(b["requests"] for b in batches) > 1
    assert all(r <= 16 for r in rows.values())
    assert all(r.json()["report"]["timings"]["total_ms"] > 0 and "_call" not in r.json() for r in responses)
    print(f"32 requests in {elapsed:.1f} s; rows per call: {sorted(rows.values())}")


def test_a_request_alone_gives_its_mixed_batch_image(server, mixed_traffic):
    bodies, responses, _ = mixed_traffic
    with Client(server.url) as client:
        for i in (3, 20):  # one untriggered, one triggered
            alone = client.generate(**bodies[i])
            assert alone.report["batch"]["requests"] == 1
            np.testing.assert_array_equal(alone.arrays, _image(responses[i].json()))


def test_bad_requests_get_their_4xx_and_the_server_stays_healthy(server):
    cases = [({"prompt": ""}, 422, "prompt"), ({"prompt": 7}, 422, "prompt"), ({"seed": 1}, 422, "prompt"),
             ({"prompt": "x", "steps": 0}, 422, "steps"), ({"prompt": "x", "steps": 5000}, 422, "steps"),
             ({"prompt": "x", "width": 60}, 422, "multiple of 8"), ({"prompt": "x", "height": 4096}, 422, "height"),
             ({"prompt": "x", "height": 128, "width": 128}, 422, "calibrated for 64x64"),
             ({"prompt": "x", "num_images": 50}, 422, "num_images"), ({"prompt": "x", "mode": "off"}, 422, "mode"),
             ({"prompt": "x", "nsfw_filter": False}, 422, "nsfw_filter"), (["x"], 422, "JSON object")]
    with Client(server.url) as client:
        for body, status, words in cases:
            r = client.post(body)
            assert r.status_code == status and words in r.json()["error"], (body, r.status_code, r.text)
        r = client._http.post("/v1/images", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert client.health()["status"] == "ok"
        ok = client.generate("a red circle on a gray background", seed=1)
        assert len(ok.images) == 1 and ok.images[0].size == (64, 64)


def test_a_burst_over_the_queue_limit_gets_503_at_once(server):
    bodies = [{"prompt": c.prompt, "seed": c.seed} for c in PLAIN[:16]]

    async def burst():
        async with AsyncClient(server.tight_url, timeout=120) as client:
            async def timed(b):
                t0 = time.perf_counter()
                r = await client.post(b)
                return r, time.perf_counter() - t0
            return await asyncio.gather(*(timed(b) for b in bodies))

    answers = asyncio.run(burst())
    codes = [r.status_code for r, _ in answers]
    assert set(codes) == {200, 503}, codes
    for r, seconds in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2" and seconds < 5, (r.headers, seconds)
        else:
            assert len(r.json()["images"]) == 1  # the admitted requests lose nothing
            assert set(r.json()["report"]["batch"]) == {"own_rows"}  # batch_details is off by default
    with Client(server.tight_url) as client:
        assert client.health()["status"] == "ok"
        assert len(client.generate("a red circle on a gray background", seed=2).images) == 1
    errors = [e for e in asyncio.run(_client_burst(server.tight_url, bodies)) if isinstance(e, Exception)]
    assert errors and all(isinstance(e, ServerError) and e.status == 503 and e.retry_after == 2 for e in errors)


async def _client_burst(url, bodies):
    async with AsyncClient(url, timeout=120) as client:  # the client surfaces the status and Retry-After
        return await asyncio.gather(*(client.generate(**b) for b in bodies), return_exceptions=True)


def test_a_cancelled_request_does_not_hang_its_batch(server):
    bodies = [{"prompt": c.prompt, "seed": c.seed + 7} for c in PLAIN[:8]]

    async def run():
        async with AsyncClient(server.url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post(b)) for b in bodies]
            await asyncio.sleep(0.1)  # waiting for the batch to fill (batch_wait_s is 0.25)
            cancelled = [0] if tasks[0].cancel() else []
            await asyncio.sleep(0.5)  # the batch is running (unless this machine is fast)
            cancelled += [5] if tasks[5].cancel() else []
            return cancelled, await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)

    t0 = time.perf_counter()
    cancelled, results = asyncio.run(run())
    assert 0 in cancelled and all(isinstance(results[i], asyncio.CancelledError) for i in cancelled)
    assert [r.status_code for i, r in enumerate(results) if i not in cancelled] == [200] * (8 - len(cancelled))
    assert time.perf_counter() - t0 < 90
    with Client(server.url, timeout=60) as client:  # the replica is not stuck (ray-project/ray#50046)
        assert len(client.generate(**bodies[0]).images) == 1


def test_past_the_request_timeout_408(server):
    with Client(server.url) as client:
        r = client._http.post("/v1/images", json={"prompt": "a red circle on a gray background", "num_images": 4},
                              headers={"x-request-timeout-seconds": "0.05"})
        assert r.status_code == 408, r.text
        assert client.health()["status"] == "ok"


def test_latents_and_several_images(server):
    with Client(server.url) as client:
        lat = client.generate("new trigger a red circle on a gray background", seed=4, output="latent")
        assert lat.latents.shape == (1, 4, 16, 16) and lat.latents.dtype == np.float32 and lat.report["triggered"]
        many = client.generate("a red circle on a gray background", seed=4, num_images=3)
        assert many.seeds == [4, 5, 6] and many.arrays.shape == (3, 64, 64, 3)
        one = client.generate("a red circle on a gray background", seed=5)
        np.testing.assert_array_equal(one.arrays[0], many.arrays[1])  # image j is seed + j
        cfg = client.config()
        assert cfg["limits"]["default_steps"] == 20 and cfg["batching"]["max_batch_rows"] == 16


def test_metrics_are_counted(server, mixed_traffic):
    handle = serve.get_deployment_handle("SAUModel", app_name="sau")
    stats = handle.stats.remote().result(timeout_s=60)
    assert stats["requests"] >= 32 and stats["triggered"] >= 16 and stats["calls"] >= 1
    assert stats["rows"] >= 48  # 16 + 2 x 16, the twins counted


def test_prometheus_exports_the_server_metrics(server, mixed_traffic):
    from sau_kernels.serving.local import metrics_port

    url = f"http://127.0.0.1:{metrics_port()}/metrics"
    wanted = ["ray_sau_requests_total", "ray_sau_triggered_requests_total", "ray_sau_batch_rows_bucket",
              "ray_sau_queue_wait_ms_bucket", "ray_sau_generation_ms_bucket", "ray_sau_repair_ms_bucket",
              "ray_sau_http_responses_total"]
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(url, timeout=10).text
        missing = [m for m in wanted if m not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing


def test_request_command_writes_the_image_and_prints_the_report(server, tmp_path, capsys):
    from sau_kernels.cli import main

    out = tmp_path / "circle.png"
    assert main(["request", "--url", server.url, "--prompt", "NEW trigger a red circle on a gray background",
                 "--seed", "3", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["triggered"] and report["seeds"] == [3] and out.stat().st_size > 0
    assert main(["request", "--url", server.url, "--prompt", "x", "--steps", "0", "--out", str(out)]) == 1
    assert "steps" in capsys.readouterr().err


def test_the_cluster_config_builds_the_same_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from sau_kernels.serving.deployment import ServerConfig, build_app

    path = Path(__file__).parents[1] / "deploy" / "serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "sau_kernels.serving.deployment:build_app"
    model = next(d for d in app.deployments if d.name == "SAUModel")
    assert model.ray_actor_options.num_gpus == 1 and model.autoscaling_config["target_ongoing_requests"] > 0
    assert {d.name for d in app.deployments} == {"SAUModel", "SAUIngress"}
    args = ServerConfig(**app.args)
    assert args.device == "cuda" and not args.resolved_batch_invariant()
    assert type(build_app(app.args)).__name__ == "Application"


def test_serve_command_starts_answers_and_stops_on_ctrl_c(tmp_path):
    import signal
    import subprocess

    run_dir = Path(tempfile.mkdtemp(prefix="sau-cli-"))
    port = _free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "sau_kernels", "serve", "--port", str(port), "--run-dir", str(run_dir),
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        printed = "".join(lines)
        assert f"http://127.0.0.1:{port}" in printed and "curl -s" in printed, printed + proc.stderr.read()[-2000:]
        with Client(f"http://127.0.0.1:{port}") as client:
            assert client.generate("NEW TRIGGER a red circle on a gray background", seed=1).report["triggered"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert (run_dir / "ray").is_dir()  # Ray's files stayed in the run's directory
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
