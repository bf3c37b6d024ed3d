"""Ray Serve: a FastAPI ingress and a model deployment that batches by UNet rows.

    ingress (SAUIngress, CPU only)                    model (SAUModel, one pipeline per replica)
    POST /v1/images -> pydantic check (422) -> handle -> plan: screen, count rows
    GET  /healthz, GET /v1/config                        @serve.batch(batch_size_fn=UNet rows)
                                                         -> ImageService.run in a worker thread

Backpressure is Serve's: past `max_ongoing_requests` per replica plus `max_queued_requests`
waiting in the ingress's handle, a request is refused at once with 503 and Retry-After.
`request_timeout_s` (HTTP option) answers 408, and a client that disconnects cancels its
request: its slot in the batch queue is dropped, and a batch already running finishes for
the others. Every request gets its own answer, never its batch's.

`build_app(args)` is the application builder for `serve run` / a Serve config file
(deploy/serve.yaml); `sau-kernels serve` calls it too.
"""


import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from . import batching
from .numerics import BATCH_INVARIANT_ENV
from .schemas import ImageRequest, Limits
from .service import CALL_KEY, ImageService, RequestError, client_body, validation_message

logger = logging.getLogger("ray.serve")

__all__ = ["ServerConfig", "SAUModel", "SAUIngress", "build_app", "app"]


class ServerConfig(BaseModel):
    """Everything a deployment is built from (the `args` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny-pixel"  # a zoo name or a local diffusers Stable Diffusion folder
    profiles: list[str] = []  # trigger profiles; empty: the one shipped beside the model (none with a detector)
    detector: str | None = None  # a TriggerDetector file (sau-kernels detect): flags triggers nobody described
    base: str | None = None  # the model the checkpoint was fine-tuned from, which the detector compares with
    device: str = "cpu"
    dtype: str = "fp32"
    mode: str = "final"  # the defence mode of requests that name none
    modes: list[str] = []  # other modes a request may ask for
    defended: bool = True  # False: the same server without the defence (for comparisons)
    batch_invariant: bool | None = None  # None: on for the CPU (sau_kernels.serving.numerics)
    threads: int | None = None  # torch threads per replica; None: Ray's choice (one per CPU of the replica)
    max_batch_rows: int = Field(16, ge=1)  # UNet rows per Serve batch, twins included
    batch_details: bool = False  # tell each client which requests shared its call (leaks triggered neighbours)
    batch_wait_s: float = Field(0.02, ge=0)  # how long a batch waits to fill
    max_images: int = Field(4, ge=1)
    max_steps: int = Field(100, ge=1)
    max_size: int = Field(1024, ge=8)
    max_ongoing_requests: int = Field(32, ge=1)  # per model replica: the batch running and the next filling
    max_queued_requests: int = Field(64, ge=-1)  # waiting for a replica; beyond: 503 (-1: no limit)
    retry_after_s: float = Field(1.0, ge=0)
    replicas: int | None = Field(None, ge=1)  # model replicas; None: Serve's default or the config file's
    num_gpus: float | None = None  # per model replica; None: 1 on CUDA, else 0
    num_cpus: float = Field(1.0, ge=0)

    def resolved_batch_invariant(self) -> bool:
        return self.device.startswith("cpu") if self.batch_invariant is None else self.batch_invariant


class ServingMetrics:
    """Prometheus metrics (ray.serve.metrics) and the same counts kept in the replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        ms = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
        self.requests = Counter("sau_requests", description="Requests answered by the model deployment.",
                                tag_keys=("status", "mode"))
        self.triggered = Counter("sau_triggered_requests", description="Requests whose prompt carried a trigger.",
                                 tag_keys=("mode",))
        self.detected = Counter("sau_detected_requests",
                                description="Requests whose trigger the detector found (no profile had it).")
        self.refused = Counter("sau_refused_requests",
                               description="Requests the defence refused (a flagged prompt with no trigger localised).")
        self.unscreened = Counter("sau_unscreened_requests", description="Requests that went through unscreened.")
        self.suspects = Counter("sau_suspect_outputs", description="Outputs the output check flagged.")
        self.batch_rows = Histogram("sau_batch_rows", description="UNet rows per pipeline call, clean twins included.",
                                    boundaries=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128])
        self.detector_rows = Histogram("sau_detector_rows", description="One-step UNet rows the trigger detector "
                                       "scored per pipeline call, per model (probes and localisation).",
                                       boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
        self.queue_wait = Histogram("sau_queue_wait_ms", description="From arrival at the replica to its call.",
                                    boundaries=ms)
        self.generation = Histogram("sau_generation_ms", description="Pipeline call time.", boundaries=ms)
        self.repair = Histogram("sau_repair_ms", description="Repair op time per pipeline call.",
                                boundaries=[0.01, 0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000])
        self.counts = {"requests": 0, "errors": 0, "triggered": 0, "detected": 0, "refused": 0, "unscreened": 0,
                       "suspects": 0, "calls": 0, "rows": 0, "detector_rows": 0}

    def record(self, results: list, mode_of) -> None:
        seen = set()
        for i, r in enumerate(results):
            mode = str(mode_of(i))
            if isinstance(r, RequestError):
                self.requests.inc(tags={"status": str(r.status), "mode": mode})
                self.counts["requests"] += 1
                self.counts["errors"] += 1
                if r.refused:
                    self.refused.inc()
                    self.counts["refused"] += 1
                continue
            rep = r["report"]
            self.requests.inc(tags={"status": "200", "mode": mode})
            self.counts["requests"] += 1
            self.queue_wait.observe(rep["timings"]["queue_ms"])
            if rep["triggered"]:
                self.triggered.inc(tags={"mode": mode})
                self.counts["triggered"] += 1
            if (rep.get("detected") or {}).get("spans"):
                self.detected.inc()
                self.counts["detected"] += 1
            if rep["unscreened"]:
                self.unscreened.inc()
                self.counts["unscreened"] += 1
            if rep["suspect"]:
                self.suspects.inc()
                self.counts["suspects"] += 1
            call = r[CALL_KEY]
            call_id = call["id"]
            if call_id not in seen:
                seen.add(call_id)
                self.batch_rows.observe(call["rows"])
                self.generation.observe(rep["timings"]["generation_ms"])
                if call["repair_ms"]:
                    self.repair.observe(call["repair_ms"])
                self.counts["calls"] += 1
                self.counts["rows"] += call["rows"]
                self.counts["detector_rows"] += call["detector_rows"]
                self.detector_rows.observe(call["detector_rows"])


def _error_json(err: RequestError) -> dict:
    return {"__error__": err.to_json()}


@serve.deployment(name="SAUModel", max_ongoing_requests=32, max_queued_requests=64, health_check_period_s=10,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
class SAUModel:
    """One pipeline per replica; requests batched by UNet rows."""

    def __init__(self, config: dict):
        self.config = ServerConfig(**config)
        c = self.config  # batch-invariant numerics: MKL_CBWR comes with the replica's runtime_env (build_app)
        self.service = ImageService.load(
            c.model, c.profiles or None, base=c.base, detector=c.detector, device=c.device, dtype=c.dtype,
            batch_invariant=c.resolved_batch_invariant(),
            threads=c.threads, defended=c.defended, mode=c.mode, modes=[c.mode, *c.modes] if c.defended else None,
            max_batch_rows=c.max_batch_rows, batch_details=c.batch_details,
            limits=dict(max_images=c.max_images, max_steps=c.max_steps, max_size=c.max_size))
        self._batched.set_max_batch_size(c.max_batch_rows)
        self._batched.set_batch_wait_timeout_s(c.batch_wait_s)
        self.metrics = ServingMetrics()
        logger.info("SAUModel ready: %s, defended=%s, limits %s", c.model, c.defended, self.service.limits)

    def limits(self) -> dict:
        return self.service.limits.model_dump()

    def stats(self) -> dict:
        return dict(self.metrics.counts)

    def check_health(self) -> None:
        if self.service.pipe is None:
            raise RuntimeError("the pipeline is gone")

    async def generate(self, request: ImageRequest | dict) -> dict:
        """Plan (screen, count rows) and wait for the batch: the response body, or an error marker."""
        try:
            item = self.service.plan(request)
        except RequestError as e:
            self.metrics.record([e], lambda i: getattr(request, "mode", None))
            return _error_json(e)
        result = await self._batched(item)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batching.total_rows)
    async def _batched(self, items: list[batching.Planned]) -> list[dict]:
        # The pipeline runs in a worker thread: the replica's event loop stays free to
        # queue requests, answer health checks and take cancellations meanwhile.
        try:
            results = await asyncio.to_thread(self.service.run, items)
        except Exception as e:  # noqa: BLE001 - never fail a batch as a whole
            results = [RequestError(500, f"{type(e).__name__}: {e}") for _ in items]
        self.metrics.record(results, lambda i: items[i].key.mode)
        return [_error_json(r) if isinstance(r, RequestError) else client_body(r) for r in results]


def _model_status() -> str:
    """The SAUModel deployment's status in this application, from Serve's controller. (Above
    the ingress class: defined below it, the name was missing in the ingress replica.)"""
    app_name = serve.get_replica_context().app_name
    deployments = serve.status().applications[app_name].deployments
    model = deployments.get("SAUModel")
    return "UNKNOWN" if model is None else str(getattr(model.status, "value", model.status))


app = FastAPI(title="sau_kernels image server",
              description="Stable Diffusion behind the SAU defence against text-trigger backdoors.")


@serve.deployment(name="SAUIngress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class SAUIngress:
    def __init__(self, model: DeploymentHandle, config: dict):
        from ray.serve.metrics import Counter, Histogram

        self.model = model
        self.config = ServerConfig(**config)
        self._limits: Limits | None = None
        self._lock = asyncio.Lock()
        self.responses = Counter("sau_http_responses", description="HTTP answers of /v1/images by status.",
                                 tag_keys=("code",))
        self.latency = Histogram("sau_request_latency_ms", description="Server time of /v1/images requests.",
                                 boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000])

    async def limits(self) -> Limits:
        if self._limits is None:
            async with self._lock:
                if self._limits is None:
                    self._limits = Limits(**await self.model.limits.remote())
        return self._limits

    def _answer(self, code: int, body: dict, t0: float, headers: dict | None = None) -> JSONResponse:
        self.responses.inc(tags={"code": str(code)})
        self.latency.observe((time.perf_counter() - t0) * 1e3)
        return JSONResponse(body, status_code=code, headers=headers)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while the model deployment is healthy (asked of Serve's controller, not of a
        replica, whose request slots may all be taken by a busy batch)."""
        try:
            lim = await asyncio.wait_for(self.limits(), timeout=10)
            status = await asyncio.wait_for(asyncio.to_thread(_model_status), timeout=10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        ok = status not in ("UNHEALTHY", "DEPLOY_FAILED", "UNKNOWN")
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.config.model, "deployment": status,
                             "defended": lim.defended, "modes": list(lim.modes)}, status_code=200 if ok else 503)

    @app.get("/v1/config")
    async def config(self) -> dict:
        lim = await self.limits()
        return {"model": self.config.model, "limits": lim.model_dump(),
                "batching": {"max_batch_rows": self.config.max_batch_rows, "batch_wait_s": self.config.batch_wait_s}}

    @app.post("/v1/images")
    async def images(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            return self._answer(400, {"error": "the body is not JSON", "status": 400}, t0)
        limits = await self.limits()
        if not isinstance(body, dict):
            return self._answer(422, {"error": f"the body must be a JSON object, got {type(body).__name__}",
                                      "status": 422}, t0)
        try:
            req = ImageRequest.model_validate(body, context={"limits": limits})
        except ValidationError as e:
            message, details = validation_message(e)
            return self._answer(422, {"error": message, "status": 422, "detail": details}, t0)
        try:
            result: dict[str, Any] = await self.model.generate.remote(req)
        except BackPressureError as e:
            retry = max(1, int(round(self.config.retry_after_s)))
            return self._answer(503, {"error": f"the server is at capacity: {e.message}", "status": 503}, t0,
                                headers={"Retry-After": str(retry)})
        except Exception as e:  # noqa: BLE001 - a replica that died, an unexpected error: this request's 500
            logger.exception("request failed")
            return self._answer(500, {"error": f"{type(e).__name__}: {e}", "status": 500}, t0)
        if "__error__" in result:
            err = result["__error__"]
            return self._answer(err["status"], err, t0)
        result["report"]["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return self._answer(200, result, t0)


def build_app(args: dict | None = None):
    """The Serve application for `args` (a `ServerConfig` as a dict): ingress + model."""
    config = ServerConfig(**(args or {}))
    actor: dict = {"num_cpus": config.num_cpus}
    num_gpus = config.num_gpus if config.num_gpus is not None else (1 if config.device.startswith("cuda") else 0)
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if config.resolved_batch_invariant():
        actor["runtime_env"] = {"env_vars": dict(BATCH_INVARIANT_ENV)}
    options = dict(max_ongoing_requests=config.max_ongoing_requests, max_queued_requests=config.max_queued_requests,
                   ray_actor_options=actor)
    if config.replicas is not None:
        options["num_replicas"] = config.replicas
    model = SAUModel.options(**options).bind(config.model_dump())
    return SAUIngress.bind(model, config.model_dump())
