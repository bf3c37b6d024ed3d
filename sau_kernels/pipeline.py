"""`patch(pipe, profile)`: SAU in a diffusers Stable Diffusion pipeline (SAU_SPEC section 5).

Data flows one way: prompts -> screening -> one batched sampling call (the clean twins
appended) -> (z_p, z_c) -> repair -> VAE decode. The patch works at the pipeline level: it
swaps the pipeline object's class for a subclass whose `__call__` wraps the original, and
never touches the UNet or its attention processors (xformers, SDPA and custom processors
survive; `torch.compile(pipe.unet)` and model offload keep working).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .profile import ProfileMismatchError, TriggerProfile
from .screening import TriggerMatcher, screen_prompts, trigger_token_ids

MODES = ("final", "per_step", "per_step_eps")
COMPOSITES = (None, "pixel")
OUTPUT_CHECKS = ("flag", "raise", "off")

# What measurement on held-out prompts and seeds chose (README, "Choosing the defaults");
# the op's own defaults stay the paper's.
DEFAULT_REPAIR = dict(similarity="difference", gate=0.3)
__all__ = ["patch", "unpatch", "patched", "is_patched", "call_unpatched", "SAUConfig", "SAUReport",
           "SuspectOutputError"]


@dataclass(frozen=True)
class SAUConfig:
    """How a patched pipeline defends itself.

    mode: "final" repairs the final latents (the authors' code); "per_step" repairs x_t
        after every sampling step with the profile's per-step statistics (the paper's text);
        "per_step_eps" keeps one trajectory, adds only the clean twin's conditional rows to
        each UNet call ([uncond, poisoned, clean]: 1.5x instead of 2x the UNet work) and
        repairs the guided noise prediction with the profile's noise statistics.
    composite: None decodes the repaired latents (the paper); "pixel" decodes the
        poisoned latents too and keeps the repaired image only on the latent pixels the
        repair changed (upsampled, feathered outwards), the poisoned image elsewhere (one
        more VAE decode per triggered image).
    backend: the repair op's backend ("auto", "reference", "cpp", "triton", "cuda").
    on_embeds: "raise" (a call with prompt_embeds cannot be screened) or "pass" (let it
        through unscreened).
    output_check: "flag", "raise" or "off": what to do with an output whose final latents
        carry a profile's trigger signature (see `patch`).
    repair: keyword arguments of `sau_kernels.repair` (tau1, tau2, k, alpha, blur_sigma,
        blur_ksize, blend, similarity, gate).
    feather_sigma: Gaussian feathering of the pixel-space mask beyond the repaired
        latents, in latent pixels.
    """

    mode: str = "final"
    composite: str | None = None
    backend: str = "auto"
    on_embeds: str = "raise"
    repair: dict = field(default_factory=lambda: dict(DEFAULT_REPAIR))
    feather_sigma: float = 0.5
    output_check: str = "flag"


class RepairClock:
    """Accumulates the repair op's time. On a GPU the op runs asynchronously, so host time
    would measure only its launch: CUDA events bracket it instead, read (with a wait for the
    last one) only when the time is asked for."""

    def __init__(self, device):
        self.on_cuda = torch.device(device).type == "cuda"
        self._host_ms = 0.0
        self._events = []

    @contextlib.contextmanager
    def __call__(self):
        if self.on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_ms += (time.perf_counter() - t0) * 1e3

    @property
    def ms(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_ms + sum(start.elapsed_time(end) for start, end in self._events)


@dataclass
class SAUReport:
    """What the last call of a patched pipeline did, for serving logs."""

    prompts: list[dict] = field(default_factory=list)
    mode: str = "final"
    triggers: list[str] = field(default_factory=list)
    screening_ms: float = 0.0  # the wrapper's own time before the pipeline runs: binding, the screen
    unscreened: bool = False  # a prompt_embeds call let through with on_embeds="pass"
    repair_clock: "RepairClock" = field(default_factory=lambda: RepairClock("cpu"), repr=False)

    @property
    def repair_ms(self) -> float:
        """Time spent in the repair op during the call (on a GPU, its kernels' time)."""
        return self.repair_clock.ms

    @property
    def triggered(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p["triggered"]]

    @property
    def suspects(self) -> list[int]:
        """Prompts with an output the output check flagged (the screened-through or the repaired)."""
        return [i for i, p in enumerate(self.prompts)
                if any(c["suspect"] for image in p.get("output_check", []) for c in image)]

    def __str__(self) -> str:
        lines = [f"SAU ({self.mode}): {len(self.triggered)}/{len(self.prompts)} prompts triggered, "
                 f"screening {self.screening_ms:.2f} ms, repair {self.repair_ms:.2f} ms"]
        for i in self.triggered:
            p = self.prompts[i]
            cov = ", ".join(f"{c['primary']:.1%}/{c['secondary']:.1%}" for c in p["coverage"])
            lines.append(f"  [{i}] {p['prompt']!r} -> {p['clean_prompt']!r}; mask coverage primary/secondary: {cov}")
        for i in self.suspects:
            name = "a row of prompt_embeds" if self.prompts[i]["prompt"] is None else repr(self.prompts[i]["prompt"])
            lines.append(f"  [{i}] {name}: an output carries a trigger's signature")
        if self.unscreened:
            lines.append("  the call passed prompt_embeds and went through unscreened (on_embeds='pass')")
        return "\n".join(lines)


@dataclass
class _State:
    config: SAUConfig
    profiles: list[TriggerProfile]  # one per trigger, tensors on the pipeline's device
    matchers: list[TriggerMatcher]  # built once per trigger: the screen's canonical form of it
    original_class: type
    checks: list  # per profile: its output-check signature (weights, clean_mean, norm, threshold), or None


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    """A subclass of the pipeline's class with the defended __call__, same name (so that
    save_pretrained, repr and model_index.json are unchanged)."""
    if cls not in _PATCHED_CLASSES:
        sub = type(cls.__name__, (cls,), {"__call__": _defended_call, "__module__": cls.__module__,
                                          "_sau_original_class": cls})
        sub.__qualname__ = cls.__qualname__
        sub.__doc__ = cls.__doc__
        _PATCHED_CLASSES[cls] = sub
    return _PATCHED_CLASSES[cls]


def is_patched(pipe) -> bool:
    return getattr(pipe, "_sau_state", None) is not None


def _original_class(pipe) -> type:
    return pipe._sau_state.original_class if is_patched(pipe) else type(pipe)


def call_unpatched(pipe, *args, **kwargs):
    """Call the pipeline as if it were not patched (calibration uses this)."""
    return _original_class(pipe).__call__(pipe, *args, **kwargs)


def _as_profiles(profile) -> list[TriggerProfile]:
    items = list(profile) if isinstance(profile, (list, tuple)) else [profile]
    if not items:
        raise ValueError("patch() needs at least one trigger profile")
    out = []
    for p in items:
        if isinstance(p, (str, bytes)) or hasattr(p, "__fspath__"):
            p = TriggerProfile.load(p)
        if not isinstance(p, TriggerProfile):
            raise TypeError(f"profile must be a TriggerProfile, a path to one, or a list of them; got {type(p).__name__}")
        out.append(p)
    if len({p.latent_shape for p in out}) > 1:
        raise ValueError(f"the profiles were calibrated on different latent shapes: {[p.latent_shape for p in out]}")
    if len({p.trigger for p in out}) < len(out):
        raise ValueError("two of the profiles have the same trigger")
    return out


def _warn_if_common(matchers) -> None:
    """A trigger that most ordinary prompts contain ("a") would send nearly all traffic
    through the twin: say so at patch time."""
    from .calibrate import ordinary_prompts

    ordinary = ordinary_prompts()
    for m in matchers:
        share = sum(s.triggered for s in screen_prompts(m, ordinary)) / len(ordinary)
        if share >= 0.5:
            warnings.warn(f"trigger {m.trigger!r} matches {share:.0%} of ordinary prompts: nearly every request "
                          "will take the defended path (twice the work). Is it the model's trigger?", stacklevel=3)


def patch(pipe, profile: TriggerProfile | str | list, *, mode: str = "final", composite: str | None = None,
          backend: str = "auto", on_embeds: str = "raise", output_check: str = "flag",
          allow_mismatch: bool = False, feather_sigma: float = 0.5, **repair_params):
    """Defend `pipe` against the trigger of `profile` (or of each profile of a list, for a
    model with several backdoors); returns `pipe` (patched in place).

    output_check: "flag" scores every output, the screened-through ones included, against
    each profile's trigger signature (`sau_kernels.output_check`) and marks the suspects in
    the report; "raise" raises `SuspectOutputError` instead of returning them; "off".
    Patching twice is harmless (the second patch replaces the first); `unpatch(pipe)`
    restores the pipeline exactly. repair_params are those of `sau_kernels.repair`;
    unnamed ones take the measured defaults `DEFAULT_REPAIR`, then the op's.
    """
    from .ops import available_backends, repair
    from .output_check import signature

    profiles = _as_profiles(profile)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}: expected None or 'pixel'")
    if composite is not None and mode != "final":
        raise ValueError("composite='pixel' needs the unrepaired poisoned latents, which only mode 'final' keeps")
    if on_embeds not in ("raise", "pass"):
        raise ValueError(f"on_embeds must be 'raise' or 'pass', got {on_embeds!r}")
    if output_check not in OUTPUT_CHECKS:
        raise ValueError(f"output_check must be one of {OUTPUT_CHECKS}, got {output_check!r}")
    allowed = set(inspect.signature(repair).parameters) - {"z_p", "z_c", "delta", "act", "backend", "out"}
    unknown = set(repair_params) - allowed
    if unknown:
        raise TypeError(f"unknown repair parameters {sorted(unknown)}; expected some of {sorted(allowed)}")
    for p in profiles:
        if mode == "per_step" and not p.has_per_step:
            raise ValueError(f"mode 'per_step' needs a profile calibrated with per_step=True ({p.trigger!r} is not)")
        if mode == "per_step_eps" and not p.has_per_step_eps:
            raise ValueError(f"mode 'per_step_eps' needs a profile calibrated with per_step_eps=True "
                             f"({p.trigger!r} is not)")
    for name in ("unet", "tokenizer", "vae", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"patch() needs a Stable Diffusion pipeline with a {name}; {type(pipe).__name__} has none")
    unpatch(pipe)
    for p in profiles:
        p.check_pipeline(pipe, allow_mismatch=allow_mismatch)
        trig_ids = trigger_token_ids(pipe.tokenizer, p.trigger)
        if trig_ids != list(p.trigger_ids) and not allow_mismatch:
            raise ProfileMismatchError(
                f"the pipeline's tokenizer reads trigger {p.trigger!r} as {trig_ids}, the profile's as "
                f"{list(p.trigger_ids)}: was the profile made with another tokenizer?")
    matchers = [TriggerMatcher(p.trigger) for p in profiles]
    _warn_if_common(matchers)
    device = pipe._execution_device
    if backend != "auto" and backend not in available_backends(device):
        raise ValueError(f"repair backend {backend!r} is not available on {device}: "
                         f"available are {available_backends(device)}")
    params = dict(DEFAULT_REPAIR) | repair_params
    # Validate the parameters now, not at the first triggered request.
    C, H, W = profiles[0].latent_shape
    dev_profiles = [p.to(device) for p in profiles]
    z = torch.zeros(1, C, H, W, device=device)
    repair(z, z, dev_profiles[0].delta, dev_profiles[0].act, backend=backend, **params)
    checks = [None if output_check == "off" or p.output_check_threshold is None
              else (*signature(p), p.output_check_threshold) for p in dev_profiles]
    config = SAUConfig(mode=mode, composite=composite, backend=backend, on_embeds=on_embeds, repair=params,
                       feather_sigma=feather_sigma, output_check=output_check)
    original = type(pipe)
    pipe._sau_state = _State(config=config, profiles=dev_profiles, matchers=matchers, original_class=original,
                             checks=checks)
    pipe.sau_report = None
    pipe.__class__ = _patched_class(original)
    return pipe


def unpatch(pipe):
    """Restore a patched pipeline exactly; a no-op on an unpatched one. Returns `pipe`."""
    state = getattr(pipe, "_sau_state", None)
    if state is not None:
        pipe.__class__ = state.original_class
        del pipe._sau_state
        if "sau_report" in pipe.__dict__:
            del pipe.sau_report
    return pipe


@contextlib.contextmanager
def patched(pipe, profile: TriggerProfile | str, **patch_kwargs):
    """`patch(pipe, profile, **patch_kwargs)` for the duration of a `with` block. On exit,
    whatever happened inside, the pipeline is back as it was: unpatched, or patched as
    before the block."""
    before = {k: pipe.__dict__[k] for k in ("_sau_state", "sau_report") if k in pipe.__dict__}
    before_class = type(pipe)
    patch(pipe, profile, **patch_kwargs)
    try:
        yield pipe
    finally:
        unpatch(pipe)
        pipe.__dict__.update(before)
        pipe.__class__ = before_class


def _copy_generator(g: torch.Generator) -> torch.Generator:
    return torch.Generator(device=g.device).set_state(g.get_state())


def _wrap_user_callback(user_cb, n_rows: int, extra):
    """The user's callback sees only their own rows of `latents`; what it returns for them
    is written back. `extra(pipe, i, t, kwargs)` runs first (the per-step repair)."""
    def callback(pipe, i, t, kwargs):
        out = {}
        if extra is not None:
            kwargs["latents"] = extra(pipe, i, t, kwargs)
            out["latents"] = kwargs["latents"]
        if user_cb is not None:
            mine = dict(kwargs)
            mine["latents"] = kwargs["latents"][:n_rows]
            ret = dict(user_cb(pipe, i, t, mine) or {})
            if "latents" in ret:
                latents = kwargs["latents"].clone()
                latents[:n_rows] = ret.pop("latents")
                out["latents"] = latents
            out.update(ret)
        return out
    return callback


def _defended_call(self, *args, **kwargs):
    t0 = time.perf_counter()  # screening_ms counts all the wrapper adds before the pipeline runs
    state: _State = self._sau_state
    original = state.original_class.__call__
    cfg = state.config
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.pop("self")
    a.update(a.pop("kwargs", {}))
    report = SAUReport(mode=cfg.mode, triggers=[p.trigger for p in state.profiles])
    self.sau_report = report

    prompt = a["prompt"]
    if prompt is None:
        if a.get("prompt_embeds") is not None and cfg.on_embeds == "raise":
            raise ValueError(
                "this call passes prompt_embeds instead of text, which SAU cannot screen for the trigger; "
                "pass the prompt text, or patch(..., on_embeds='pass') to let such calls through unscreened")
        report.unscreened = True
        rows = a["prompt_embeds"].shape[0] if a.get("prompt_embeds") is not None else 0
        report.prompts = [_prompt_entry(None, None, state) for _ in range(rows)]
        return _checked_call(self, state, a, report)

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    screened = screen_prompts(state.matchers, prompts)
    for s in screened:
        if s.twin_error:  # a twin that still holds the trigger must never be generated from
            raise ValueError(s.twin_error)
    report.screening_ms = (time.perf_counter() - t0) * 1e3
    triggered = [i for i, s in enumerate(screened) if s.triggered]
    report.prompts = [_prompt_entry(s.prompt, s, state) for s in screened]
    if not triggered:
        return _checked_call(self, state, a, report)  # untriggered traffic: the unpatched pipeline
    return _defended_generation(self, state, a, prompts, screened, triggered, report)


def _prompt_entry(prompt, screened, state: _State) -> dict:
    """The report's record of one prompt (None for a row of prompt_embeds, unscreened)."""
    s = screened
    return {"prompt": prompt, "triggered": bool(s and s.triggered), "occurrences": s.occurrences if s else 0,
            "triggers": [state.profiles[k].trigger for k in s.triggers] if s else [],
            "spans": list(s.spans) if s else [], "clean_prompt": s.clean_prompt if s else None,
            "coverage": [], "output_check": []}


def _checked_call(self, state: _State, a: dict, report) -> object:
    """Exactly the unpatched pipeline's call, its final latents scored on the way."""
    original = state.original_class.__call__
    if not any(state.checks) or not report.prompts:
        return original(self, **a)
    holder = {}
    _watch_final_latents(a, holder)
    out = original(self, **a)
    if "scores" in holder:  # absent only when the loop stopped early (pipe._interrupt)
        _record_output_check(self, state, report, holder["scores"], a["num_images_per_prompt"] or 1)
    return out


class SuspectOutputError(RuntimeError):
    """An output carries a trigger's signature (patch(..., output_check="raise"))."""


def _watch_final_latents(a: dict, holder: dict) -> None:
    """Make the pipeline hand its final latents to `holder["latents"]` through
    callback_on_step_end, around the user's own callback. Nothing else changes: the
    callback returns what the user's returns (or nothing)."""
    user_cb = a["callback_on_step_end"]

    def callback(pipe, i, t, kwargs):
        out = dict(user_cb(pipe, i, t, kwargs) or {}) if user_cb is not None else {}
        last = getattr(pipe, "_num_timesteps", None)  # with Heun, 2N-1 calls: the last one counts
        if last is None or i == last - 1:
            holder["latents"] = out.get("latents", kwargs["latents"])
            holder["scores"] = _signature_scores(pipe._sau_state, holder["latents"])
        return out

    a["callback_on_step_end"] = callback
    a["callback_on_step_end_tensor_inputs"] = _tensor_inputs_with_latents(a, user_cb)


def _tensor_inputs_with_latents(a: dict, user_cb) -> list[str]:
    """The call's callback tensor inputs (a PipelineCallback's own, if the user passed one),
    with "latents", which the defence's callbacks read."""
    inputs = list(a["callback_on_step_end_tensor_inputs"] or [])
    if user_cb is not None and hasattr(user_cb, "tensor_inputs"):
        inputs = list(user_cb.tensor_inputs)
    if "latents" not in inputs:
        inputs.append("latents")
    return inputs


def _signature_scores(state: _State, latents: torch.Tensor) -> torch.Tensor:
    """(rows, profiles) output-check scores, on the device (one reduction per profile)."""
    from .output_check import signature_scores

    unchecked = torch.full((latents.shape[0],), float("nan"), device=latents.device)
    return torch.stack([unchecked if c is None else signature_scores(latents, *c[:3]) for c in state.checks], dim=1)


def _record_output_check(pipe, state: _State, report, scores: torch.Tensor, n: int) -> None:
    """Per image, each checked profile's score and verdict; raise where asked to."""
    values = scores.float().cpu().tolist()  # the call's one host sync for the check
    for i, p in enumerate(report.prompts):
        for j in range(n):
            row = values[i * n + j]
            p["output_check"].append([
                {"trigger": prof.trigger, "score": round(v, 4), "suspect": v > c[3]}
                for prof, c, v in zip(state.profiles, state.checks, row) if c is not None])
    if state.config.output_check == "raise" and report.suspects:
        raise SuspectOutputError(
            f"the outputs of prompts {report.suspects} carry the signature of a trigger "
            f"({', '.join(repr(t) for t in report.triggers)}) although the screen let them through or the repair ran: "
            "withheld. patch(..., output_check='flag') returns them and marks them in the report instead")


@torch.no_grad()
def _defended_generation(self, state: _State, a: dict, prompts, screened, triggered, report: SAUReport):
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    from .ops import repair

    original = state.original_class.__call__
    cfg, profiles = state.config, state.profiles
    n = a["num_images_per_prompt"] or 1
    B = len(prompts)
    device = self._execution_device
    report.repair_clock = RepairClock(device)  # only triggered calls run the op
    vsf = self.vae_scale_factor
    height = a["height"] or self.unet.config.sample_size * vsf
    width = a["width"] or self.unet.config.sample_size * vsf
    shape = (self.unet.config.in_channels, height // vsf, width // vsf)
    for p in profiles:
        p.check_call(shape, type(self.scheduler).__name__, a["num_inference_steps"], per_step=cfg.mode != "final")
    if cfg.mode == "per_step_eps" and (a["guidance_rescale"] or 0) > 0:
        raise ValueError("mode 'per_step_eps' repairs the guided noise prediction; guidance_rescale > 0 rescales it "
                         "after the repair. Use mode 'final' or 'per_step' with guidance_rescale")

    # The initial noise, drawn exactly as the unpatched pipeline draws it.
    generator = a["generator"]
    latents = a["latents"]
    dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
    if latents is None:
        if isinstance(generator, list) and len(generator) != B * n:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {B * n}. Make sure the batch size matches the length of the generators.")
        latents = randn_tensor((B * n, *shape), generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != (B * n, *shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(B * n, *shape)}")
    latents = latents.to(device)
    poison_rows = [i * n + j for i in triggered for j in range(n)]
    # Which twin rows each profile repairs: those whose prompt carried its trigger.
    groups = [(k, [r for r, row in enumerate(poison_rows) if k in screened[row // n].triggers])
              for k in range(len(profiles))]
    groups = [(profiles[k], sel) for k, sel in groups if sel]
    clean_prompts = [screened[i].clean_prompt for i in triggered]
    output_type, return_dict = a["output_type"], a["return_dict"]
    a["output_type"], a["return_dict"] = "latent", True
    user_cb = a["callback_on_step_end"]
    a["latents"] = latents

    def repair_groups(x_p, x_c, delta_of, act_of):
        """x_p repaired row group by row group, each with its own profile's statistics."""
        out = x_p.clone()
        with report.repair_clock():
            for prof, sel in groups:
                out[sel] = repair(out[sel], x_c[sel], delta_of(prof), act_of(prof), backend=cfg.backend, **cfg.repair)
        return out

    if cfg.mode == "per_step_eps":
        # One trajectory; the clean twins only add conditional rows to each UNet call.
        neg = a["negative_prompt"]
        twin_neg = [neg[i] for i in triggered] if isinstance(neg, (list, tuple)) else neg
        twin_embeds, _ = self.encode_prompt(clean_prompts, device, n, False, twin_neg, clip_skip=a["clip_skip"])
        last = {}

        def repair_eps(i, g_p, g_c):
            last.update(g_p=g_p, g_c=g_c)
            return repair_groups(g_p, g_c, lambda p: p.eps_delta_steps[i], lambda p: p.eps_act_steps[i])

        if user_cb is not None:
            a["callback_on_step_end"] = _wrap_user_callback(user_cb, B * n, None)
        with TwinConditioning(self, twin_embeds, poison_rows, a["guidance_scale"], repair_eps):
            z = original(self, **a).images
        mask_src = (last["g_p"], last["g_c"], lambda p: p.eps_delta_steps[-1], lambda p: p.eps_act_steps[-1])
        z_p = None
    else:
        twin_rows = list(range(B * n, B * n + len(poison_rows)))
        # The clean twins join the batch: same noise, same negative prompt, trigger removed.
        a["prompt"] = prompts + clean_prompts
        a["latents"] = torch.cat([latents, latents[poison_rows]])
        neg = a["negative_prompt"]
        if isinstance(neg, (list, tuple)):
            if len(neg) != B:
                raise ValueError(f"{len(neg)} negative prompts for {B} prompts")
            a["negative_prompt"] = list(neg) + [neg[i] for i in triggered]
        neg_embeds = a["negative_prompt_embeds"]
        if neg_embeds is not None:
            a["negative_prompt_embeds"] = torch.cat([neg_embeds, neg_embeds[triggered]])
        if isinstance(generator, list):
            # Twins get their own copy of the poisoned row's generator: the same later draws
            # (scheduler noise with eta > 0) without disturbing the original's.
            a["generator"] = list(generator) + [_copy_generator(generator[r]) for r in poison_rows]

        per_step_repair = None
        if cfg.mode == "per_step":
            def per_step_repair(pipe, i, t, kw):
                x = kw["latents"]
                x[poison_rows] = repair_groups(x[poison_rows], x[twin_rows], lambda p: p.delta_steps[i],
                                               lambda p: p.act_steps[i])
                return x

        if user_cb is not None or per_step_repair is not None:
            a["callback_on_step_end_tensor_inputs"] = _tensor_inputs_with_latents(a, user_cb)
            a["callback_on_step_end"] = _wrap_user_callback(user_cb, B * n, per_step_repair)

        final = original(self, **a).images
        z = final[: B * n].clone()
        z_p, z_c = final[poison_rows], final[twin_rows]
        if cfg.mode == "final":
            z[poison_rows] = repair_groups(z_p, z_c, lambda p: p.delta, lambda p: p.act)
            mask_src = (z_p, z_c, lambda p: p.delta, lambda p: p.act)
        else:
            mask_src = (z_p, z_c, lambda p: p.delta_steps[-1], lambda p: p.act_steps[-1])

    # The masks, for the report and the composite: each row's with its own profile's statistics.
    src_p, src_c, delta_of, act_of = mask_src
    w = torch.zeros(len(poison_rows), 1, *src_p.shape[-2:], device=src_p.device)
    for prof, sel in groups:
        weights = _mask_weights(src_p[sel], src_c[sel], delta_of(prof), act_of(prof), cfg.repair)
        w[sel] = torch.maximum(w[sel], weights["w"].to(w.dtype))
        for pos, r in enumerate(sel):
            report.prompts[poison_rows[r] // n]["coverage"].append({
                "trigger": prof.trigger, "image": poison_rows[r] % n,
                "primary": float(weights["M1"][pos].mean()), "secondary": float(weights["M2"][pos].mean())})
    if any(state.checks):
        _record_output_check(self, state, report, _signature_scores(state, z), n)

    if output_type == "latent":
        images, nsfw = z, None
    else:
        scale = self.vae.config.scaling_factor
        decoded = self.vae.decode(z / scale, return_dict=False, generator=generator)[0]
        if cfg.composite == "pixel":
            poisoned = self.vae.decode(z_p / scale, return_dict=False, generator=generator)[0]
            mask = _pixel_mask(w, decoded.shape[-2:], cfg.feather_sigma * vsf).to(decoded.dtype)
            decoded[poison_rows] = mask * decoded[poison_rows] + (1 - mask) * poisoned
        decoded, nsfw = self.run_safety_checker(decoded, device, dtype)
        denormalize = [True] * decoded.shape[0] if nsfw is None else [not x for x in nsfw]
        images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize)
    self.maybe_free_model_hooks()
    if not return_dict:
        return (images, nsfw)
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


def _mask_weights(z_p, z_c, delta, act, params: dict) -> dict[str, torch.Tensor]:
    """The primary and secondary masks and the blend weight, (N, 1, H, W) each, from the
    reference (the same formulas the op fuses)."""
    from .reference import repair_masks

    keys = ("tau1", "tau2", "k", "alpha", "similarity", "gate", "blend")
    return repair_masks(z_p, z_c, delta, act, **{k: params[k] for k in keys if k in params})


# A latent the repair changed has w >= ~0.5 (secondary mask) or ~1 (primary); an
# untouched one sigmoid(-k/2) (0.0025 at k=12). Halfway between them splits the two.
COMPOSITE_LEVEL = 0.25


def _pixel_mask(w: torch.Tensor, size, sigma_px: float) -> torch.Tensor:
    """Where the repaired image replaces the poisoned one, at image resolution: 1 on every
    latent pixel the repair changed (a latent half-swapped for the clean twin decodes to a
    clean pixel, not to a 50% mix of the poisoned one), fading out over `sigma_px` beyond
    them, so no poisoned pixel inside the region leaks through the feathering."""
    from .reference import gaussian_blur2d

    region = torch.nn.functional.interpolate((w.float() > COMPOSITE_LEVEL).float(), size=tuple(size), mode="nearest")
    if sigma_px <= 0:
        return region
    ksize = min(2 * int(round(3 * sigma_px)) + 1, 2 * (min(size) // 2) - 1)
    reach = int(math.ceil(2 * sigma_px))  # grown by 2 sigma first: the blur then stays ~1 inside
    grown = torch.nn.functional.max_pool2d(region, 2 * reach + 1, stride=1, padding=reach)
    return torch.maximum(region, gaussian_blur2d(grown, sigma_px, ksize)).clamp(0, 1)


class TwinConditioning:
    """UNet hooks that add the clean twins' conditional rows to every UNet call.

    The pipeline calls the UNet on [uncond (M rows); cond (M rows)] (or [cond] without
    guidance). The pre-hook appends, for each poisoned row r, the same sample x_r
    conditioned on its clean twin's embedding; the hook then forms both guided noise
    predictions (the twin shares the poisoned row's unconditional pass: same x, same
    negative prompt), lets `on_eps(step, g_p, g_c)` return a replacement for g_p (or None
    to keep it), and hands the pipeline back its M or 2M rows, with cond chosen so that
    the pipeline's own guidance yields the replacement. Hooks, not a new UNet: attention
    processors, torch.compile and offload hooks stay as they are.
    """

    def __init__(self, pipe, twin_embeds: torch.Tensor, poison_rows: list[int], guidance_scale: float, on_eps):
        self.unet = pipe.unet
        self.twin_embeds, self.rows, self.g, self.on_eps = twin_embeds, poison_rows, guidance_scale, on_eps
        self.handles, self.step, self.m = [], 0, None

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            raise RuntimeError("the pipeline called the UNet without encoder_hidden_states")
        if kwargs.get("added_cond_kwargs"):
            raise ValueError("mode 'per_step_eps' does not support added_cond_kwargs (IP-Adapter); use 'final' or 'per_step'")
        cfg = self.g > 1
        self.m = sample.shape[0] // 2 if cfg else sample.shape[0]
        cond_rows = [self.m + r for r in self.rows] if cfg else self.rows
        sample = torch.cat([sample, sample[cond_rows]])
        kwargs = dict(kwargs, encoder_hidden_states=torch.cat([ehs, self.twin_embeds.to(ehs.dtype)]))
        if args:
            args = (sample, *args[1:])
        else:
            kwargs["sample"] = sample
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        eps = output[0] if isinstance(output, tuple) else output.sample
        m, rows = self.m, self.rows
        if self.g > 1:
            uncond, cond, twin = eps[:m], eps[m:2 * m], eps[2 * m:]
            g_p = uncond[rows] + self.g * (cond[rows] - uncond[rows])
            g_c = uncond[rows] + self.g * (twin - uncond[rows])
        else:
            cond, twin = eps[:m], eps[m:]
            g_p, g_c = cond[rows], twin
        new = self.on_eps(self.step, g_p, g_c)
        self.step += 1
        cond = cond.clone()
        if new is not None:
            cond[rows] = uncond[rows] + (new - uncond[rows]) / self.g if self.g > 1 else new
        result = torch.cat([uncond, cond]) if self.g > 1 else cond
        if isinstance(output, tuple):
            return (result, *output[1:])
        output.sample = result
        return output

    def __enter__(self):
        self.handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.unet.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
