"""What a client sends and gets back: pydantic models, checked before any work is queued.

`ImageRequest.model_validate(data, context={"limits": limits})` checks a request against
the server's `Limits` (a field out of range, a size that is not a multiple of 8 or above
the maximum, too many images, an unknown field or mode): a `pydantic.ValidationError`
whose messages name the field, which the server answers with 422.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_SEED = 2**63 - 1

__all__ = ["Limits", "ImageRequest", "Timings", "BatchInfo", "RequestReport", "Latents", "ImageResponse",
           "MAX_SEED"]


class Limits(BaseModel):
    """What a server accepts, and its defaults (from the model and its profile)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(100, ge=1)
    max_size: int = Field(1024, ge=8)
    max_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    modes: tuple[str, ...] = ("final",)  # the defence modes a request may ask for; the first is the default
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) pairs allowed, None: any
    steps: tuple[int, ...] | None = None  # step counts allowed, None: any up to max_steps
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    default_height: int = 512
    default_width: int = 512
    defended: bool = True


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    return ctx.get("limits") or Limits()


def _encodable(text: str) -> str:
    """Refuse a lone surrogate ("\\ud800" in JSON): no tokenizer can encode it, and it would
    fail the whole pipeline call it was batched into, not this request alone."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds {text[e.start]!r} at {e.start}, a lone surrogate that is no character") from None
    return text


class ImageRequest(BaseModel):
    """POST /v1/images. Omitted fields take the server's defaults (GET /v1/config)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image j of the request uses seed + j; "
                             "omitted: the server draws one and returns it")
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    num_images: int = Field(1, ge=1)
    output: Literal["png", "latent"] = "png"
    mode: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        limit = _limits(info).max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"prompt has {len(v)} characters, at most {limit} are accepted")
        return _encodable(v)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str | None, info: ValidationInfo) -> str | None:
        limit = _limits(info).max_prompt_chars
        if v is not None and len(v) > limit:
            raise ValueError(f"negative_prompt has {len(v)} characters, at most {limit} are accepted")
        return v if v is None else _encodable(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        lim = _limits(info)
        if v is not None and v > lim.max_steps:
            raise ValueError(f"steps is {v}, at most {lim.max_steps} are accepted")
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        if v % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8, got {v}")
        lim = _limits(info)
        if v > lim.max_size:
            raise ValueError(f"{info.field_name} is {v}, at most {lim.max_size} is accepted")
        return v

    @field_validator("num_images")
    @classmethod
    def _images(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v > lim.max_images:
            raise ValueError(f"num_images is {v}, at most {lim.max_images} per request are accepted")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None, info: ValidationInfo) -> str | None:
        lim = _limits(info)
        if v is not None:
            if not lim.defended:
                raise ValueError("this server runs the model without the defence: it takes no mode")
            if v not in lim.modes:
                raise ValueError(f"mode {v!r} is not served here; this server offers {list(lim.modes)}")
        return v

    @model_validator(mode="after")
    def _calibrated(self, info: ValidationInfo):
        lim = _limits(info)
        h, w = self.height or lim.default_height, self.width or lim.default_width
        if lim.sizes is not None and (h, w) not in lim.sizes:
            allowed = ", ".join(f"{a}x{b}" for a, b in lim.sizes)
            raise ValueError(f"height x width {h}x{w} is not served: the trigger profile was calibrated for {allowed}")
        steps = self.steps or lim.default_steps
        if lim.steps is not None and (self.mode or lim.modes[0]) != "final" and steps not in lim.steps:
            raise ValueError(f"steps {steps} in mode {self.mode or lim.modes[0]!r}: the profile's per-step "
                             f"statistics were taken at {' or '.join(map(str, lim.steps))} steps")
        return self

    def resolved(self, limits: Limits, seed: int) -> "ImageRequest":
        """This request with every default filled in (and `seed` if it had none)."""
        return self.model_copy(update=dict(
            seed=self.seed if self.seed is not None else seed,
            steps=self.steps or limits.default_steps,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else limits.default_guidance_scale,
            height=self.height or limits.default_height, width=self.width or limits.default_width,
            mode=(self.mode or limits.modes[0]) if limits.defended else None))


class Timings(BaseModel):
    queue_ms: float  # from arrival at the model replica to the start of its batch
    generation_ms: float  # the pipeline call it ran in
    total_ms: float = 0.0  # in the server, from arrival at the ingress to the response


class BatchInfo(BaseModel):
    # Only what says nothing about the other requests' prompts: the call's rows, the
    # detector's and the repair's time would tell whether another prompt was triggered, and
    # so would who shared the call (the row budget counts twins): those three come only from
    # a server configured with batch_details=True (benchmarks, tests).
    own_rows: int  # this request's UNet rows (per CFG branch), clean twins included
    requests: int | None = None  # requests in the pipeline call it ran in
    images: int | None = None  # images in that call
    call_id: str | None = None  # the call's id (requests that share it ran together)


class RequestReport(BaseModel):
    triggered: bool
    clean_prompt: str | None = None
    detected: dict | None = None  # with a detector: flagged, and what it cut (no score)
    coverage: list[dict] = []  # per repaired image: trigger, image, primary, secondary (mask shares)
    output_check: list[list[dict]] = []  # per image: each profile's trigger and verdict (no score)
    suspect: bool = False  # an output carries a trigger's signature
    unscreened: bool = False
    defended: bool = True
    mode: str | None = None
    timings: Timings
    batch: BatchInfo


class Latents(BaseModel):
    shape: list[int]
    dtype: str
    data_base64: str  # little-endian, C order


class ImageResponse(BaseModel):
    id: str
    seed: int
    seeds: list[int]
    images: list[str] = []  # base64 PNG, one per image (output "png")
    latents: Latents | None = None  # output "latent"
    report: RequestReport
