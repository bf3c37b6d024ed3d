"""The model side of the server without Ray: validate, plan, run a batch of requests.

`ImageService` holds one (patched) pipeline. `validate` turns a JSON body into an
`ImageRequest` (or a `RequestError` with the status to answer), `plan` screens it and
counts its UNet rows, `run` executes a batch: requests grouped by the parameters a call
must share, one pipeline call per group, and a result or an error for every request
(a call that fails is retried request by request, so one bad request fails alone).
The Ray deployment (`deployment.py`) is a thin shell around this class.
"""

from __future__ import annotations

import base64
import io
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import ValidationError

from . import batching
from .schemas import MAX_SEED, ImageRequest, Limits

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["RequestError", "ImageService", "call_pipeline", "validation_message"]


class RequestError(Exception):
    """A request the server refuses or could not serve, with the HTTP status to answer."""

    def __init__(self, status: int, message: str, detail: Any = None, refused: bool = False):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail
        self.refused = refused  # the defence refused the prompt (not a malformed request, not a failure)

    def to_json(self) -> dict:
        out = {"error": self.message, "status": self.status}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


def validation_message(err: ValidationError) -> tuple[str, list[dict]]:
    """One line naming each bad field, and pydantic's details (JSON-safe)."""
    details = []
    for e in err.errors(include_url=False, include_context=False, include_input=False):
        loc = ".".join(str(p) for p in e["loc"]) or "request"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        details.append({"field": loc, "message": msg, "type": e["type"]})
    return "; ".join(f"{d['field']}: {d['message']}" for d in details), details


# The server-only part of a response body: the accounting of the pipeline call it ran in.
CALL_KEY = "_call"


def client_body(body: dict) -> dict:
    """A response body as a client gets it: without the call's accounting (CALL_KEY)."""
    return {k: v for k, v in body.items() if k != CALL_KEY}


def call_pipeline(pipe, kwargs: dict):
    """The engine contract, in one place: a (patched) pipeline call -> (images, report).

    The report is the call's own `SAUReport` (`out.sau_report`), or, from an engine that
    keeps it on the pipeline, `pipe.sau_report` read right after the call in the same
    thread; None for an unpatched pipeline."""
    out = pipe(**kwargs)
    report = getattr(out, "sau_report", None) or getattr(pipe, "sau_report", None)
    return out.images, report


@dataclass
class _Call:
    id: str
    rows: int
    detector_rows: int
    requests: int
    images: int
    generation_ms: float
    screening_ms: float
    repair_ms: float
    started: float


class ImageService:
    """One pipeline behind the server (patched with `profiles` unless `defended=False`)."""

    def __init__(self, pipe, profiles=None, *, detector=None, mode: str = "final", modes: Sequence[str] | None = None,
                 defended: bool = True, max_batch_rows: int = 16, limits: dict | None = None, name: str = "",
                 batch_details: bool = False):
        import sau_kernels
        from sau_kernels.modes import MODES

        self.pipe, self.name, self.defended = pipe, name, defended
        # which requests shared a call, and how many: off by default, since the row budget
        # counts twins, so who shares a call tells a client whether a neighbour was triggered
        self.batch_details = batch_details
        self.profiles = list(profiles or [])
        self.detector = detector if defended else None
        if defended and not self.profiles and detector is None:
            raise ValueError("a defended server needs a trigger profile, a trigger detector, or both "
                             "(or defended=False)")
        modes = tuple(modes or (mode,))
        if mode not in modes:
            modes = (mode, *modes)
        else:
            modes = (mode, *[m for m in modes if m != mode])
        if defended:
            unknown = [m for m in modes if m not in MODES]
            if unknown:
                raise ValueError(f"unknown defence modes {unknown}: this engine offers {list(MODES)}")
            for m in reversed(modes):  # each mode's own checks now (profile statistics), the default last
                sau_kernels.patch(pipe, self.profiles or None, detect=self.detector, mode=m)
        self.mode = mode if defended else None
        self.matchers = [p.matcher() for p in self.profiles] if defended else []
        self.max_batch_rows = max_batch_rows
        if self.detector is not None:
            # the detector's probe calls (scoring every prompt, a flagged one's ablations) hold
            # no more UNet rows than a generation call may: the budget bounds memory for both
            self.detector.probe_batch = min(self.detector.probe_batch, max_batch_rows)
        self.limits = self._limits(modes, limits or {})
        worst = self.limits.max_images * (max(batching.TRIGGERED_ROWS[m] for m in modes) if defended else 1)
        if worst > max_batch_rows:
            raise ValueError(f"max_batch_rows={max_batch_rows} cannot hold a request of {self.limits.max_images} "
                             f"triggered images ({worst} rows): raise it or lower max_images")

    @classmethod
    def load(cls, model: str = "tiny-pixel", profiles: Sequence[str] | None = None, *, device: str = "cpu",
             dtype: str = "fp32", batch_invariant: bool | None = None, threads: int | None = None,
             defended: bool = True, warmup: bool = True, base: str | None = None, detector: str | None = None,
             **kwargs) -> "ImageService":
        """Load a zoo model by name or a local diffusers folder (its shipped profile by default,
        none when a `detector` file is given: then `base`, the model it was fine-tuned from, too)."""
        from sau_kernels.profile import TriggerProfile
        from sau_kernels.zoo import load_pipeline, model_dir

        from .numerics import batch_invariant as make_invariant

        if (detector is None) != (base is None):
            raise ValueError("a trigger detector needs the base model it was calibrated against: give detector "
                             "and base together")
        if batch_invariant is None:
            batch_invariant = torch.device(device).type == "cpu"
        pipes = [load_pipeline(m, device=device, dtype=DTYPES[dtype]) for m in (model, base) if m is not None]
        for p in pipes:
            p.set_progress_bar_config(disable=True)
            if batch_invariant:  # the base too: a detector's score must not depend on its batch
                make_invariant(p, threads=threads)
        if not batch_invariant and threads:
            torch.set_num_threads(threads)
        pipe = pipes[0]
        if profiles:
            loaded = [TriggerProfile.load(p) for p in profiles]
        else:
            shipped = model_dir(model) / "sau_profile.safetensors"
            if not shipped.is_file() and defended and detector is None:
                raise FileNotFoundError(f"{model!r} ships no trigger profile ({shipped}): pass one, or a detector")
            loaded = [TriggerProfile.load(shipped)] if shipped.is_file() and detector is None else []
        det = None
        if detector is not None and defended:
            from sau_kernels.detect import TriggerDetector

            det = TriggerDetector.load(detector, pipe, pipes[1])
        service = cls(pipe, loaded, detector=det, defended=defended, name=str(model), **kwargs)
        if warmup:
            service.warmup()
        return service

    def warmup(self) -> None:
        """One call per offered mode, a triggered prompt among them: the first call of a
        process pays one-time set-up (seconds on the CPU), which no request should."""
        prompts = ["a red circle"] + ([f"{self.profiles[0].trigger} a red circle"] if self.profiles and self.defended
                                      else [])
        for mode in self.limits.modes[::-1]:
            items = [self.plan({"prompt": p, "seed": 0, **({"mode": mode} if self.defended else {})}) for p in prompts]
            for r in self.run(items):
                # a warm-up prompt the detector refuses has still paid the set-up of its probe
                if isinstance(r, RequestError) and not r.refused:
                    raise RuntimeError(f"warm-up call failed: {r.message}")

    def _limits(self, modes, overrides: dict) -> Limits:
        pipe = self.pipe
        vsf = pipe.vae_scale_factor
        fields = dict(modes=modes if self.defended else ("none",), defended=self.defended,
                      default_height=pipe.unet.config.sample_size * vsf, default_width=pipe.unet.config.sample_size * vsf)
        if self.profiles:
            p = self.profiles[0]
            _, h, w = p.latent_shape
            fields.update(default_steps=p.num_inference_steps, default_guidance_scale=p.guidance_scale,
                          default_height=h * vsf, default_width=w * vsf)
            if self.defended:  # the profile (and the output check) hold for its latent shape only
                fields["sizes"] = ((h * vsf, w * vsf),)
                if any(m != "final" for m in modes):
                    fields["steps"] = (p.num_inference_steps,)
        fields.update(overrides)
        return Limits(**fields)

    # --- requests ---------------------------------------------------------------------------

    def validate(self, data: Any) -> ImageRequest:
        if not isinstance(data, dict):
            raise RequestError(422, f"the body must be a JSON object, got {type(data).__name__}")
        try:
            return ImageRequest.model_validate(data, context={"limits": self.limits})
        except ValidationError as e:
            message, details = validation_message(e)
            raise RequestError(422, message, details) from None

    def plan(self, request: ImageRequest | dict, arrived: float | None = None,
             request_id: str | None = None) -> batching.Planned:
        if not isinstance(request, ImageRequest):
            request = self.validate(request)
        req = request.resolved(self.limits, seed=secrets.randbelow(MAX_SEED - 64))
        if req.seed + req.num_images - 1 > MAX_SEED:
            raise RequestError(422, f"seed: seed + num_images - 1 must be at most {MAX_SEED}")
        if self.defended:
            from sau_kernels.screening import screen_prompts

            for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
                twin_error = next((s.twin_error for s in screen_prompts(self.matchers, [text or ""]) if s.twin_error),
                                  None)
                if twin_error:
                    raise RequestError(422, f"{field}: {twin_error}")
        (rows, triggered), = batching.count_rows(self.matchers, [req.prompt], [req.num_images], req.mode,
                                                 [req.negative_prompt])
        key = batching.GroupKey(steps=req.steps, guidance_scale=float(req.guidance_scale), height=req.height,
                                width=req.width, mode=req.mode, output_type="latent" if req.output == "latent" else "pil")
        return batching.Planned(id=request_id or uuid.uuid4().hex, prompt=req.prompt, negative_prompt=req.negative_prompt,
                                seed=req.seed, num_images=req.num_images, key=key, rows=rows, triggered=triggered,
                                arrived=time.monotonic() if arrived is None else arrived, output=req.output)

    def generate(self, data: dict) -> dict:
        """One request on its own (offline use and tests): the response body, or RequestError raised."""
        (result,) = self.run([self.plan(data)])
        if isinstance(result, RequestError):
            raise result
        return client_body(result)

    # --- batches ----------------------------------------------------------------------------

    def run(self, items: Sequence[batching.Planned]) -> list[dict | RequestError]:
        """Every request of a Serve batch: its response body (with the call's accounting under
        CALL_KEY, which `client_body` drops), or its RequestError."""
        results: list = [None] * len(items)
        serve_rows = batching.total_rows(items)
        for group in batching.group_by_key(items):
            members = [items[i] for i in group]
            for chunk in batching.split_by_rows([it.rows for it in members], self.max_batch_rows):
                for i, res in zip(chunk, self._run_call([members[j] for j in chunk], serve_rows)):
                    results[group[i]] = res
        return results

    def _run_call(self, items: list[batching.Planned], serve_rows: int) -> list[dict | RequestError]:
        try:
            return self._call(items, serve_rows)
        except Exception as e:  # noqa: BLE001 - every request gets an answer
            from sau_kernels.detect import DetectionError

            if len(items) > 1:  # find the request that fails; the others still get their images
                return [r for it in items for r in self._run_call([it], serve_rows)]
            if isinstance(e, DetectionError):
                return [RequestError(422, f"prompt: {e}", {"refused_by": "detector"}, refused=True)]
            status = 422 if isinstance(e, (ValueError, TypeError)) else 500
            return [RequestError(status, f"{type(e).__name__}: {e}")]

    def _rows_scored(self) -> int:
        return self.detector.rows_scored if self.detector is not None else 0

    def _ensure_mode(self, mode: str | None) -> None:
        if self.defended and mode != self.mode:
            import sau_kernels

            sau_kernels.patch(self.pipe, self.profiles or None, detect=self.detector, mode=mode)
            self.mode = mode

    def _call(self, items: list[batching.Planned], serve_rows: int) -> list[dict]:
        key = items[0].key
        self._ensure_mode(key.mode)
        kwargs = batching.pipeline_kwargs(items)
        started = time.monotonic()
        scored_before = self._rows_scored()
        t0 = time.perf_counter()
        images, report = call_pipeline(self.pipe, kwargs)
        generation_ms = (time.perf_counter() - t0) * 1e3
        call = _Call(id=uuid.uuid4().hex[:12], rows=batching.total_rows(items),
                     detector_rows=self._rows_scored() - scored_before, requests=len(items),
                     images=len(kwargs["prompt"]), generation_ms=generation_ms,
                     screening_ms=float(getattr(report, "screening_ms", 0.0) or 0.0),
                     repair_ms=float(getattr(report, "repair_ms", 0.0) or 0.0), started=started)
        return [self._response(it, images[sl], report, sl, call, serve_rows)
                for it, sl in zip(items, batching.image_slices(items))]

    def _response(self, it: batching.Planned, images, report, sl: slice, call: _Call, serve_rows: int) -> dict:
        entries = report.prompts[sl] if report is not None else []
        coverage = [dict(c, image=j) for j, e in enumerate(entries) for c in e.get("coverage", [])]
        # each image's verdict per trigger, without its score: an attacker would tune a spelling
        # of the trigger until its output scores just under the check's threshold
        output_check = [[{"trigger": c["trigger"], "suspect": c["suspect"]} for c in img]
                        for e in entries for img in e.get("output_check", [])]
        body = {
            "id": it.id, "seed": it.seed, "seeds": batching.image_seeds(it.seed, it.num_images),
            "report": {
                "triggered": any(e.get("triggered") for e in entries),
                "clean_prompt": next((e.get("clean_prompt") for e in entries if e.get("triggered")), None),
                "detected": _client_detection(entries[0].get("detected") if entries else None),
                "coverage": coverage, "output_check": output_check,
                "suspect": any(c.get("suspect") for img in output_check for c in img),
                "unscreened": bool(getattr(report, "unscreened", False)),
                "defended": self.defended, "mode": getattr(report, "mode", it.key.mode) if self.defended else None,
                "timings": {"queue_ms": round((call.started - it.arrived) * 1e3, 3),
                            "generation_ms": round(call.generation_ms, 3)},
                "batch": {"own_rows": it.rows} | ({"requests": call.requests, "images": call.images, "call_id": call.id}
                                                  if self.batch_details else {}),
            },
            # The call's own accounting, for the server's metrics (`client_body` drops it): its
            # rows, the detector's and the repair's time would tell one client whether another
            # client's prompt in the same call carried a trigger.
            CALL_KEY: {"id": call.id, "requests": call.requests, "images": call.images, "rows": call.rows, "serve_rows": serve_rows, "detector_rows": call.detector_rows,
                       "screening_ms": round(call.screening_ms, 3), "repair_ms": round(call.repair_ms, 3)},
        }
        if it.key.output_type == "latent":
            z = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
            body["latents"] = {"shape": list(z.shape), "dtype": "float32",
                               "data_base64": base64.b64encode(z.tobytes()).decode()}
            body["images"] = []
        else:
            body["images"] = [encode_png(im) for im in images]
        return body


def _client_detection(record: dict | None) -> dict | None:
    """The detector's record as a client may see it: flagged or not, and what was cut. The
    scores stay on the server (an attacker would tune a spelling of the trigger to sit just
    under the threshold); None without a detector."""
    if record is None:
        return None
    flagged = "spans" in record
    shown = ("removed", "spans", "cut_from", "clean_prompt", "scored") if flagged else ("scored",)
    return {"flagged": flagged, **{k: record[k] for k in shown if k in record}}


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def decode_latents(latents: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(latents["data_base64"]), dtype="<f4").reshape(latents["shape"])
