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
from dataclasses import dataclass, field

import torch

from .profile import ProfileMismatchError, TriggerProfile
from .screening import screen_prompts, trigger_token_ids

MODES = ("final", "per_step", "per_step_eps")
COMPOSITES = (None, "pixel")

# What measurement on held-out prompts and seeds chose (README, "Choosing the defaults");
# the op's own defaults stay the paper's.
DEFAULT_REPAIR = dict(similarity="difference", gate=0.3)

__all__ = ["patch", "unpatch", "patched", "is_patched", "call_unpatched", "SAUConfig", "SAUReport"]


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
    screening_ms: float = 0.0  # the wrapper's own time before the pipeline runs: binding, token scan
    repair_clock: "RepairClock" = field(default_factory=lambda: RepairClock("cpu"), repr=False)

    @property
    def repair_ms(self) -> float:
        """Time spent in the repair op during the call (on a GPU, its kernels' time)."""
        return self.repair_clock.ms

    @property
    def triggered(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p["triggered"]]

    def __str__(self) -> str:
        lines = [f"SAU ({self.mode}): {len(self.triggered)}/{len(self.prompts)} prompts triggered, "
                 f"screening {self.screening_ms:.2f} ms, repair {self.repair_ms:.2f} ms"]
        for i in self.triggered:
            p = self.prompts[i]
            cov = ", ".join(f"{c['primary']:.1%}/{c['secondary']:.1%}" for c in p["coverage"])
            lines.append(f"  [{i}] {p['prompt']!r} -> {p['clean_prompt']!r}; mask coverage primary/secondary: {cov}")
        return "\n".join(lines)


@dataclass
class _State:
    config: SAUConfig
    profile: TriggerProfile  # tensors on the pipeline's device
    trigger_ids: list[int]
    original_class: type


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


def patch(pipe, profile: TriggerProfile | str, *, mode: str = "final", composite: str | None = None,
          backend: str = "auto", on_embeds: str = "raise", allow_mismatch: bool = False,
          feather_sigma: float = 0.5, **repair_params):
    """Defend `pipe` against the trigger of `profile`; returns `pipe` (patched in place).

    Patching twice is harmless (the second patch replaces the first); `unpatch(pipe)`
    restores the pipeline exactly. repair_params are those of `sau_kernels.repair`;
    unnamed ones take the measured defaults `DEFAULT_REPAIR`, then the op's.
    """
    from .ops import available_backends, repair

    if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
        profile = TriggerProfile.load(profile)
    if not isinstance(profile, TriggerProfile):
        raise TypeError(f"profile must be a TriggerProfile or a path to one, got {type(profile).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}: expected None or 'pixel'")
    if composite is not None and mode != "final":
        raise ValueError("composite='pixel' needs the unrepaired poisoned latents, which only mode 'final' keeps")
    if on_embeds not in ("raise", "pass"):
        raise ValueError(f"on_embeds must be 'raise' or 'pass', got {on_embeds!r}")
    allowed = set(inspect.signature(repair).parameters) - {"z_p", "z_c", "delta", "act", "backend", "out"}
    unknown = set(repair_params) - allowed
    if unknown:
        raise TypeError(f"unknown repair parameters {sorted(unknown)}; expected some of {sorted(allowed)}")
    if mode == "per_step" and not profile.has_per_step:
        raise ValueError("mode 'per_step' needs a profile calibrated with per_step=True")
    if mode == "per_step_eps" and not profile.has_per_step_eps:
        raise ValueError("mode 'per_step_eps' needs a profile calibrated with per_step_eps=True")
    for name in ("unet", "tokenizer", "vae", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"patch() needs a Stable Diffusion pipeline with a {name}; {type(pipe).__name__} has none")
    unpatch(pipe)
    profile.check_pipeline(pipe, allow_mismatch=allow_mismatch)
    trig_ids = trigger_token_ids(pipe.tokenizer, profile.trigger)
    if trig_ids != list(profile.trigger_ids) and not allow_mismatch:
        raise ProfileMismatchError(
            f"the pipeline's tokenizer reads trigger {profile.trigger!r} as {trig_ids}, the profile's as "
            f"{list(profile.trigger_ids)}: was the profile made with another tokenizer?")
    device = pipe._execution_device
    if backend != "auto" and backend not in available_backends(device):
        raise ValueError(f"repair backend {backend!r} is not available on {device}: "
                         f"available are {available_backends(device)}")
    params = dict(DEFAULT_REPAIR) | repair_params
    # Validate the parameters now, not at the first triggered request.
    C, H, W = profile.latent_shape
    dev_profile = profile.to(device)
    z = torch.zeros(1, C, H, W, device=device)
    repair(z, z, dev_profile.delta, dev_profile.act, backend=backend, **params)
    config = SAUConfig(mode=mode, composite=composite, backend=backend, on_embeds=on_embeds, repair=params,
                       feather_sigma=feather_sigma)
    original = type(pipe)
    pipe._sau_state = _State(config=config, profile=dev_profile, trigger_ids=trig_ids, original_class=original)
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
    report = SAUReport(mode=cfg.mode)
    self.sau_report = report

    prompt = a["prompt"]
    if prompt is None:
        if a.get("prompt_embeds") is not None and cfg.on_embeds == "raise":
            raise ValueError(
                "this call passes prompt_embeds instead of text, which SAU cannot screen for the trigger; "
                "pass the prompt text, or patch(..., on_embeds='pass') to let such calls through unscreened")
        return original(self, **a)

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    screened = screen_prompts(self.tokenizer, prompts, state.trigger_ids)
    report.screening_ms = (time.perf_counter() - t0) * 1e3
    triggered = [i for i, s in enumerate(screened) if s.triggered]
    report.prompts = [{"prompt": s.prompt, "triggered": s.triggered, "occurrences": s.occurrences,
                       "clean_prompt": s.clean_prompt, "coverage": []} for s in screened]
    if not triggered:
        return original(self, **a)  # untriggered traffic: exactly the unpatched pipeline
    return _defended_generation(self, state, a, prompts, screened, triggered, report)


@torch.no_grad()
def _defended_generation(self, state: _State, a: dict, prompts, screened, triggered, report: SAUReport):
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    from .ops import repair

    original = state.original_class.__call__
    cfg, profile = state.config, state.profile
    n = a["num_images_per_prompt"] or 1
    B = len(prompts)
    device = self._execution_device
    report.repair_clock = RepairClock(device)  # only triggered calls run the op
    vsf = self.vae_scale_factor
    height = a["height"] or self.unet.config.sample_size * vsf
    width = a["width"] or self.unet.config.sample_size * vsf
    shape = (self.unet.config.in_channels, height // vsf, width // vsf)
    profile.check_call(shape, type(self.scheduler).__name__, a["num_inference_steps"], per_step=cfg.mode != "final")
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
    clean_prompts = [screened[i].clean_prompt for i in triggered]
    output_type, return_dict = a["output_type"], a["return_dict"]
    a["output_type"], a["return_dict"] = "latent", True
    user_cb = a["callback_on_step_end"]
    a["latents"] = latents

    if cfg.mode == "per_step_eps":
        # One trajectory; the clean twins only add conditional rows to each UNet call.
        neg = a["negative_prompt"]
        twin_neg = [neg[i] for i in triggered] if isinstance(neg, (list, tuple)) else neg
        twin_embeds, _ = self.encode_prompt(clean_prompts, device, n, False, twin_neg, clip_skip=a["clip_skip"])
        last = {}

        def repair_eps(i, g_p, g_c):
            with report.repair_clock():
                out = repair(g_p, g_c, profile.eps_delta_steps[i], profile.eps_act_steps[i], backend=cfg.backend,
                             **cfg.repair)
            last.update(g_p=g_p, g_c=g_c, step=i)
            return out

        if user_cb is not None:
            a["callback_on_step_end"] = _wrap_user_callback(user_cb, B * n, None)
        with TwinConditioning(self, twin_embeds, poison_rows, a["guidance_scale"], repair_eps):
            z = original(self, **a).images
        mask_src = (last["g_p"], last["g_c"], profile.eps_delta_steps[-1], profile.eps_act_steps[-1])
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
                with report.repair_clock():
                    x[poison_rows] = repair(x[poison_rows], x[twin_rows], profile.delta_steps[i],
                                            profile.act_steps[i], backend=cfg.backend, **cfg.repair)
                return x

        if user_cb is not None or per_step_repair is not None:
            inputs = list(a["callback_on_step_end_tensor_inputs"] or [])
            if user_cb is not None and hasattr(user_cb, "tensor_inputs"):
                inputs = list(user_cb.tensor_inputs)
            if "latents" not in inputs:
                inputs.append("latents")
            a["callback_on_step_end"] = _wrap_user_callback(user_cb, B * n, per_step_repair)
            a["callback_on_step_end_tensor_inputs"] = inputs

        final = original(self, **a).images
        z = final[: B * n].clone()
        z_p, z_c = final[poison_rows], final[twin_rows]
        if cfg.mode == "final":
            with report.repair_clock():
                z[poison_rows] = repair(z_p, z_c, profile.delta, profile.act, backend=cfg.backend, **cfg.repair)
            mask_src = (z_p, z_c, profile.delta, profile.act)
        else:
            mask_src = (z_p, z_c, profile.delta_steps[-1], profile.act_steps[-1])

    weights = _mask_weights(*mask_src, cfg.repair)  # for the report, and the composite
    for k, i in enumerate(triggered):
        for j in range(n):
            r = k * n + j
            report.prompts[i]["coverage"].append({
                "primary": float(weights["M1"][r].mean()), "secondary": float(weights["M2"][r].mean()),
            })

    if output_type == "latent":
        images, nsfw = z, None
    else:
        scale = self.vae.config.scaling_factor
        decoded = self.vae.decode(z / scale, return_dict=False, generator=generator)[0]
        if cfg.composite == "pixel":
            poisoned = self.vae.decode(z_p / scale, return_dict=False, generator=generator)[0]
            mask = _pixel_mask(weights["w"], decoded.shape[-2:], cfg.feather_sigma * vsf).to(decoded.dtype)
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
