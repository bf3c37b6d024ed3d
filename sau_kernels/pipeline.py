"""`patch(pipe, profile)`: SAU in a diffusers Stable Diffusion pipeline (docs/method.md, section 5).

A request, from prompt to image (docs/engine.md):

1. `request.defended_call` binds the arguments as the pipeline's own `__call__` would and refuses
   the ones the defence cannot honour (`supported.py`), on every call;
2. the screen (`screening.py`) reads every text field for each profile's trigger;
3. the planner (`planner.py`) turns the verdict into rows: the user's, plus one clean twin
   per repaired row (or the clean prompt in place of the triggered one);
4. `execution.py` runs the plan through the pipeline's own `__call__`, the repair inside its
   sampling loop (`hooks.py`), and returns the user's rows with the call's report
   (`report.py`) as `output.sau_report`.

The patch swaps the pipeline object's class for a subclass whose `__call__` wraps the
original (same signature and docstring) and never replaces the UNet or its attention
processors (xformers, SDPA and custom processors survive; `torch.compile(pipe.unet)` and
model offload keep working).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field

import torch

from .profile import ProfileMismatchError, TriggerProfile
from .report import SAUReport, SuspectOutputError, last_report
from .request import check_schedule
from .screening import TriggerMatcher, screen_prompts, trigger_token_ids
from .modes import COMPOSITES, MODES, OUTPUT_CHECKS
from .supported import PipelineSpec, UnsupportedPipelineError, spec_for
from .tokenizer_locks import encoding

# What measurement on held-out prompts and seeds chose (docs/results.md); the op's own
# defaults stay the paper's.
DEFAULT_REPAIR = dict(similarity="difference", gate=0.3)
__all__ = ["patch", "unpatch", "patched", "is_patched", "call_unpatched", "SAUConfig", "SAUReport",
           "SuspectOutputError", "UnsupportedPipelineError"]


@dataclass(frozen=True)
class SAUConfig:
    """How a patched pipeline defends itself.

    mode: "final" repairs the final latents (the authors' code); "per_step" repairs x_t
        after every sampling step with the profile's per-step statistics (the paper's text);
        "per_step_eps" keeps one trajectory, adds only the clean twin's conditional rows to
        each UNet call and repairs the guided noise prediction; "strip" generates the
        triggered prompt with the trigger cut out and nothing else (the baseline: 1x cost).
        Whatever the mode, a prompt whose trigger does not paint a fixed pattern (the
        profile's `fixed_pattern` is False: a style backdoor) is generated from its clean
        text alone.
    composite: None decodes the repaired latents (the paper); "pixel" keeps the repaired
        image only on the latent pixels the repair changed (upsampled, feathered outwards)
        and the poisoned image elsewhere (mode "final").
    backend: the repair op's backend ("auto", "reference", "cpp", "triton", "cuda").
    on_embeds: "raise" (a call with prompt_embeds cannot be screened) or "pass" (let it
        through unscreened; the report says so).
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


@dataclass
class _State:
    config: SAUConfig
    profiles: list[TriggerProfile]  # one per trigger, tensors on the pipeline's device
    matchers: list[TriggerMatcher]  # built once per trigger: the screen's canonical form of it
    original_class: type
    spec: PipelineSpec
    signature: inspect.Signature
    checks: list  # per profile: its output-check signature (weights, clean_mean, norm, threshold), or None
    unchecked_why: str | None = None  # what output_check="flag" cannot check on any call, and why
    global_profiles: set = field(default_factory=set)  # indexes of the profiles without a fixed pattern (styles)
    detector: object = None  # a TriggerDetector: scores each prompt (a known trigger's match: its clean twin)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    """A subclass of the pipeline's class with the defended __call__ (the original's signature
    and docstring), same name (so that save_pretrained, repr and model_index.json are unchanged)."""
    if cls not in _PATCHED_CLASSES:
        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            from .request import defended_call

            return defended_call(self, *args, **kwargs)

        members = {
            "__call__": __call__, "__module__": cls.__module__, "_sau_original_class": cls,
            "sau_report": property(last_report, doc="This thread's last SAUReport from this pipeline (or None)."),
        }
        if hasattr(cls, "encode_prompt"):
            @functools.wraps(cls.encode_prompt)
            def encode_prompt(self, *args, **kwargs):
                with encoding(self):  # the tokenizer may be shared with another thread's pipeline
                    return cls.encode_prompt(self, *args, **kwargs)

            members["encode_prompt"] = encode_prompt
        sub = type(cls.__name__, (cls,), members)
        sub.__qualname__ = cls.__qualname__
        sub.__doc__ = cls.__doc__
        _PATCHED_CLASSES[cls] = sub
    return _PATCHED_CLASSES[cls]


def is_patched(pipe) -> bool:
    return getattr(pipe, "_sau_state", None) is not None


def call_unpatched(pipe, *args, **kwargs):
    """Call the pipeline as if it were not patched (calibration uses this)."""
    cls = pipe._sau_state.original_class if is_patched(pipe) else type(pipe)
    return cls.__call__(pipe, *args, **kwargs)


def _as_profiles(profile, detect) -> list[TriggerProfile]:
    if profile is None and detect is not None:
        return []
    items = list(profile) if isinstance(profile, (list, tuple)) else [profile]
    if not items or profile is None:
        raise ValueError("patch() needs at least one trigger profile, or a trigger detector (detect=...)")
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


def _check_detector(pipe, detect) -> None:
    if detect is None:
        return
    from .detect import TriggerDetector

    if not isinstance(detect, TriggerDetector):
        raise TypeError(f"detect must be a sau_kernels.TriggerDetector, got {type(detect).__name__}")
    if detect.pipe is not pipe:
        raise ValueError("the trigger detector was made for another pipeline object: calibrate or load it with "
                         "this one (TriggerDetector.calibrate(pipe, base) or TriggerDetector.load(path, pipe, base))")


def _check_options(profiles, mode, composite, on_embeds, output_check, repair_params, spec) -> None:
    from .ops import repair

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
    allowed = set(inspect.signature(repair).parameters) - {"z_p", "z_c", "delta", "act", "backend", "out",
                                                          "return_coverage"}
    unknown = set(repair_params) - allowed
    if unknown:
        raise TypeError(f"unknown repair parameters {sorted(unknown)}; expected some of {sorted(allowed)}")
    if mode == "per_step_eps" and not spec.per_step_eps:
        raise ValueError("mode 'per_step_eps' needs a UNet without added conditioning (not SDXL); "
                         "use 'final' or 'per_step'")
    for p in profiles:
        if mode == "per_step" and not p.has_per_step:
            raise ValueError(f"mode 'per_step' needs a profile calibrated with per_step=True ({p.trigger!r} is not)")
        if mode == "per_step_eps" and not p.has_per_step_eps:
            raise ValueError(f"mode 'per_step_eps' needs a profile calibrated with per_step_eps=True "
                             f"({p.trigger!r} is not)")


def _output_check(profile):
    """(weights, clean_mean, norm, threshold) of the profile's output check on its device, or
    None where it has none, or its signature is empty (no pixel of act above the region)."""
    from .output_check import signature

    if profile.output_check_threshold is None:
        return None
    weights, clean_mean, norm = signature(profile)
    return (weights, clean_mean, norm, profile.output_check_threshold) if float(norm) > 0 else None


def patch(pipe, profile: TriggerProfile | str | list | None = None, *, detect=None, mode: str = "final",
          composite: str | None = None, backend: str = "auto", on_embeds: str = "raise", output_check: str = "flag",
          allow_mismatch: bool = False, feather_sigma: float = 0.5, **repair_params):
    """Defend `pipe` against the trigger of `profile` (or of each profile of a list, for a
    model with several backdoors); returns `pipe` (patched in place).

    Supported: StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline, StableDiffusionXLPipeline; any other class raises
    `UnsupportedPipelineError`. Each call returns its `SAUReport` as `output.sau_report`.
    output_check: "flag" scores every output, the screened-through ones included, against
    each profile's trigger signature (`sau_kernels.output_check`) and marks the suspects in
    the report; "raise" raises `SuspectOutputError` instead of returning them (and refuses
    to patch where a profile has no usable output check, or there is none); "off".
    The signature holds at the profiles' latent size only: at another size an untriggered
    call's outputs go unchecked ("flag": `report.output_check_skipped` says why, and a
    warning) or the call is refused ("raise": `ProfileMismatchError` at its first step).
    Patching twice is harmless (the second patch replaces the first); `unpatch(pipe)`
    restores the pipeline exactly. repair_params are those of `sau_kernels.repair`;
    unnamed ones take the measured defaults `DEFAULT_REPAIR`, then the op's.
    detect: a `sau_kernels.TriggerDetector` calibrated for this pipeline (docs/detect.md):
    every prompt is scored (one a profile's trigger matches: its clean twin); a flagged one is generated from
    the prompt with the localised trigger cut out (its record in the report's "detected"),
    and one the detector cannot localise raises `DetectionError`. With `detect`, `profile`
    may be None.
    """
    from .hooks import hook_unet
    from .ops import available_backends, repair

    profiles = _as_profiles(profile, detect)
    _check_detector(pipe, detect)
    unpatch(pipe)
    original = type(pipe)
    spec = spec_for(original)
    _check_options(profiles, mode, composite, on_embeds, output_check, repair_params, spec)
    for p in profiles:
        p.check_pipeline(pipe, allow_mismatch=allow_mismatch)
        trig_ids = trigger_token_ids(pipe.tokenizer, p.trigger)
        if trig_ids != list(p.trigger_ids) and not allow_mismatch:
            raise ProfileMismatchError(
                f"the pipeline's tokenizer reads trigger {p.trigger!r} as {trig_ids}, the profile's as "
                f"{list(p.trigger_ids)}: was the profile made with another tokenizer?")
    check_schedule(pipe, mode, profiles)  # the scheduler now; every call checks it and its step count again
    matchers = [p.matcher() for p in profiles]
    if matchers:
        _warn_if_common(matchers)
    device = pipe._execution_device
    if backend != "auto" and backend not in available_backends(device):
        raise ValueError(f"repair backend {backend!r} is not available on {device}: "
                         f"available are {available_backends(device)}")
    params = dict(DEFAULT_REPAIR) | repair_params
    dev_profiles = [p.to(device) for p in profiles]
    if dev_profiles:  # validate the parameters now, not at the first triggered request
        z = torch.zeros(1, *profiles[0].latent_shape, device=device)
        repair(z, z, dev_profiles[0].delta, dev_profiles[0].act, backend=backend, **params)
    checks = [None if output_check == "off" else _output_check(p) for p in dev_profiles]
    unchecked = [p.trigger for p, c in zip(profiles, checks) if c is None]
    unchecked_why = None
    if output_check != "off" and (unchecked or not profiles):
        unchecked_why = (f"the profiles for {unchecked} carry no usable output check (calibrated before it existed, "
                         "or their signature did not separate clean from poisoned outputs)" if unchecked
                         else "there are no profiles, so no trigger signature to score (the detector scores prompts "
                              "only)")
    if output_check == "raise" and unchecked_why:
        # "raise" promises that no output carrying a trigger's signature is returned: it
        # cannot keep that promise for a trigger whose signature it cannot score
        raise ValueError(f"output_check='raise' cannot check every output: {unchecked_why}; use "
                         "output_check='flag' (the report says what went unchecked) or 'off'")
    config = SAUConfig(mode=mode, composite=composite, backend=backend, on_embeds=on_embeds, repair=params,
                       feather_sigma=feather_sigma, output_check=output_check)
    if mode == "per_step_eps":
        hook_unet(pipe.unet)  # installed once now: a call only switches it on in its own thread
    pipe._sau_state = _State(config=config, profiles=dev_profiles, matchers=matchers, original_class=original,
                             spec=spec, signature=inspect.signature(original.__call__), checks=checks,
                             unchecked_why=unchecked_why,
                             global_profiles={k for k, p in enumerate(profiles) if not p.fixed_pattern},
                             detector=detect)
    pipe.__class__ = _patched_class(original)
    return pipe


def unpatch(pipe):
    """Restore a patched pipeline exactly; a no-op on an unpatched one. Returns `pipe`."""
    from .hooks import unhook_unet

    state = getattr(pipe, "_sau_state", None)
    if state is not None:
        pipe.__class__ = state.original_class
        del pipe._sau_state
        if state.config.mode == "per_step_eps":
            unhook_unet(pipe.unet)
    return pipe


@contextlib.contextmanager
def patched(pipe, profile: TriggerProfile | str, **patch_kwargs):
    """`patch(pipe, profile, **patch_kwargs)` for the duration of a `with` block. On exit,
    whatever happened inside, the pipeline is back as it was: unpatched, or patched as
    before the block."""
    before = getattr(pipe, "_sau_state", None)
    patch(pipe, profile, **patch_kwargs)
    try:
        yield pipe
    finally:
        unpatch(pipe)
        if before is not None:
            from .hooks import hook_unet

            pipe._sau_state = before
            pipe.__class__ = _patched_class(before.original_class)
            if before.config.mode == "per_step_eps":
                hook_unet(pipe.unet)
