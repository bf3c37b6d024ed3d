"""One call of a patched pipeline, from its arguments to the plan (docs/engine.md).

`defended_call` binds the arguments as the pipeline's own `__call__` would, refuses those
the defence cannot honour, screens every text field, asks the planner for the rows, checks
what can be checked before any work, and hands the plan to `execution.execute`. Arguments it
cannot read are left to the pipeline itself to reject, so that users see the errors they know.
"""

from __future__ import annotations

import functools
import json
import numbers
import time

import torch

from .planner import Plan, Unplannable, make_plan, prompt_actions, text_fields
from .profile import ProfileMismatchError
from .report import SAUReport, prompt_entry
from .screening import screen_prompts

__all__ = ["defended_call", "rows_for"]


def rows_for(pipe, prompts: list[str], num_images_per_prompt: int = 1, **text) -> int:
    """How many UNet rows per sampling step (before guidance doubles them) a patched `pipe`
    will run for these prompts, twins included, without running anything: what a server's
    batcher counts so that a burst of triggered requests cannot exceed its memory.
    `text`: the other text fields (negative_prompt=..., prompt_2=...), as the call gets them."""
    state = pipe._sau_state
    texts = text_fields({"prompt": list(prompts), **text}, state.spec)
    if texts is None:
        raise TypeError("prompts must be a non-empty list of strings")
    screens = {f: screen_prompts(state.matchers, texts[f]) for f in texts}
    _, _, twinned = prompt_actions(screens, state.config.mode, state.global_profiles)
    return (len(prompts) + len(twinned)) * num_images_per_prompt


class _Unscreenable(Exception):
    pass


def _let_pipeline_reject(pipe, original, a: dict, what: str):
    """For arguments the screen or the plan cannot read: let the pipeline raise its own
    error for them, as it would unpatched; if it accepts them, stop it at its first step."""
    def stop(*_):
        raise _Unscreenable

    try:
        original(pipe, **dict(a, callback_on_step_end=stop, callback_on_step_end_tensor_inputs=["latents"]))
    except _Unscreenable:
        pass
    raise ValueError(f"the defence cannot screen this call ({what}): pass the prompt as a string or a list of "
                     "strings, with the other text and batch arguments matching it")


def check_schedule(pipe, mode: str, profiles, call: dict | None = None) -> None:
    """Per-step modes need statistics for the pipeline's scheduler and, given a call's
    arguments, its schedule; "per_step_eps" a first-order scheduler. patch() checks the
    scheduler, every call (triggered or not) both: a configuration the defence cannot cover
    is refused before an attacker's prompt finds it."""
    if mode not in ("per_step", "per_step_eps"):
        return
    name = type(pipe.scheduler).__name__
    if mode == "per_step_eps" and getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(f"mode 'per_step_eps' repairs each UNet evaluation, and {name} makes two per step: "
                         "use mode 'final' or 'per_step' with it")
    if call is not None and call.get("sigmas") is not None:
        raise ValueError(f"mode {mode!r} repairs with statistics of the scheduler's own schedule, and a call's "
                         "sigmas give another: pass num_inference_steps, or use mode 'final'")
    timesteps = call.get("timesteps") if call is not None else None
    for p in profiles:
        steps = p.num_inference_steps if call is None else call.get("num_inference_steps")
        p.check_call(None, name, steps if timesteps is None else len(timesteps), per_step=True)
        recorded = p.params.get("timesteps")  # (a profile from before they were recorded has none)
        if timesteps is not None and (recorded is None or [float(t) for t in timesteps] != [float(t) for t in recorded]):
            raise ProfileMismatchError(f"per-step profile for {p.trigger!r} was calibrated at timesteps {recorded}, "
                                       f"this call asks for {list(timesteps)}: pass num_inference_steps, or use "
                                       "mode 'final'")
        if timesteps is None and recorded is not None:
            # same class and step count, another configuration (timestep spacing, Karras sigmas)
            schedule = _schedule(pipe.scheduler, steps)
            if not {float(t) for t in recorded} <= set(schedule):
                raise ProfileMismatchError(
                    f"per-step profile for {p.trigger!r} was calibrated at timesteps {recorded}, and this {name}'s "
                    f"configuration gives {list(schedule)}: calibrate with this scheduler configuration, or use "
                    "mode 'final'")


def _schedule(scheduler, steps: int) -> tuple[float, ...]:
    """The timesteps a scheduler of this class and configuration takes for `steps` steps."""
    return _schedule_of(type(scheduler), json.dumps(dict(scheduler.config), sort_keys=True, default=str), steps)


@functools.lru_cache(maxsize=64)
def _schedule_of(cls, config: str, steps: int) -> tuple[float, ...]:
    scheduler = cls.from_config(json.loads(config))
    scheduler.set_timesteps(steps, device="cpu")
    return tuple(float(t) for t in scheduler.timesteps)


def _expected_latent_shape(pipe, a: dict):
    """(C, H, W) of a call's latents where its arguments say it plainly, by the pipeline's own
    rules: height and width (text-to-image, inpainting, SDXL), or the image's size as the
    pipeline's image processor sizes it (image-to-image, `_image_latent_size`). None otherwise,
    or for sizes the pipeline itself rejects: a triggered call then checks its latents at the
    first step."""
    vsf, channels = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    latents = a.get("latents")
    if isinstance(latents, torch.Tensor) and latents.ndim == 4:  # the pipeline takes them as they are
        return tuple(latents.shape[1:])
    if "height" in a:
        default = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        h, w = a.get("height") or default * vsf, a.get("width") or default * vsf
    else:
        size = _image_latent_size(getattr(pipe, "image_processor", None), a.get("image"), channels)
        if size is None or size[0] == "latents":
            return None if size is None else (channels, *size[1:])
        h, w = size
    if not all(isinstance(v, numbers.Real) and float(v).is_integer() for v in (h, w)):
        return None  # (96.0 and NumPy integers size the latents as 96 does)
    h, w = int(h), int(w)
    if h % vsf or w % vsf:
        return None
    return (channels, h // vsf, w // vsf)


def _image_latent_size(processor, image, channels: int):
    """How diffusers' `VaeImageProcessor.preprocess` and the image-to-image pipeline size an
    `image` input: ("latents", h, w) where its channels are the latent channels (used as
    latents, unresized: a tensor, or a NumPy array after its resize), else the (h, w) in pixels
    it is resized to (floored to the VAE's scale). PIL images and lists of them, NumPy arrays
    H x W x C or B x H x W x C, tensors C x H x W or B x C x H x W, and lists of either. None
    for anything else, or a processor configured otherwise (grayscale, no resize)."""
    import numpy as np
    import PIL.Image

    if processor is None or processor.config.do_convert_grayscale or not processor.config.do_resize:
        return None
    first = image[0] if isinstance(image, list) and image else image
    floor = processor.config.vae_scale_factor
    if isinstance(first, PIL.Image.Image):
        return processor.get_default_height_width(first)
    if isinstance(first, np.ndarray) and first.ndim in (3, 4):  # (B x) H x W x C
        h, w = (int(v) - int(v) % floor for v in first.shape[-3:-1])
        return ("latents", h, w) if first.shape[-1] == channels else (h, w)
    if isinstance(first, torch.Tensor) and first.ndim in (3, 4):  # (B x) C x H x W
        h, w = first.shape[-2:]
        return ("latents", h, w) if first.shape[-3] == channels else (h - h % floor, w - w % floor)
    return None


@torch.no_grad()
def defended_call(self, *args, **kwargs):
    from .execution import execute
    from .hooks import check_latent_shape

    t0 = time.perf_counter()  # screening_ms counts all the wrapper adds before the pipeline runs
    state = self._sau_state
    original, cfg = state.original_class.__call__, state.config
    try:
        bound = state.signature.bind(self, *args, **kwargs)
    except TypeError:
        return original(self, *args, **kwargs)  # Python's own error for a malformed call
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.pop("self")
    a.update(a.pop("kwargs", {}))
    refused = sorted(k for k in state.spec.refused if a.get(k) is not None)
    if refused:
        raise ValueError(f"a patched {state.original_class.__name__} does not support {', '.join(refused)}: "
                         "the defence cannot give a clean twin the same "
                         f"{'image prompt' if 'ip_adapter_image' in refused[0] else 'callback'}; call without it "
                         "(callback_on_step_end is supported)")
    callback = a.get("callback_on_step_end")
    if callback is not None:
        inputs = getattr(callback, "tensor_inputs", None) or a.get("callback_on_step_end_tensor_inputs") or []
        if set(inputs) - {"latents"}:
            # those tensors hold the twins' rows too (or, in "per_step_eps", the conditioning
            # the twin replaces): a change to them, a guidance cutoff say, would break or
            # bypass the repair, so no call may ask for them
            raise ValueError(f"a patched pipeline's callback_on_step_end may take only 'latents' among its tensor "
                             f"inputs, got {sorted(inputs)}: the defence cannot give the callback the other tensors "
                             "without its clean twins' rows, nor honour a change to them")
    steps, strength = a.get("num_inference_steps"), a.get("strength")
    if isinstance(steps, int) and isinstance(strength, (int, float)) and 0 <= strength and int(steps * strength) == 0:
        # the pipeline would run no step and return no image (a triggered call: fail in the repair)
        raise ValueError(f"strength={strength} with num_inference_steps={steps} leaves no denoising step: raise one "
                         "of them")
    # what the profiles cannot cover, refused on every call, not only on a triggered one
    shape = _expected_latent_shape(self, a)
    if shape is not None:
        check_latent_shape(state.profiles, torch.empty(1, *shape, device="meta"))
    check_schedule(self, cfg.mode, state.profiles, a)
    report = SAUReport(mode=cfg.mode, triggers=[p.trigger for p in state.profiles])
    n = a.get("num_images_per_prompt") or 1
    try:
        texts = text_fields(a, state.spec)
    except Unplannable as e:
        return _let_pipeline_reject(self, original, a, f"{e.args[0]} does not match the prompt")
    if texts is None:
        if a.get("prompt") is None and a.get("prompt_embeds") is not None:
            if cfg.on_embeds == "raise":
                raise ValueError(
                    "this call passes prompt_embeds instead of text, which SAU cannot screen for the trigger; "
                    "pass the prompt text, or patch(..., on_embeds='pass') to let such calls through unscreened")
            rows = a["prompt_embeds"].shape[0]
            report.unscreened = True
            report.prompts = [prompt_entry(None, [], state.profiles, "none") for _ in range(rows)]
            return execute(self, state, Plan(kwargs=a, n_images=n, user_rows=rows * n), report, original)
        return _let_pipeline_reject(self, original, a, f"prompt of type {type(a.get('prompt')).__name__}")

    screens = {f: screen_prompts(state.matchers, texts[f]) for f in texts}
    for f in screens:
        for s in screens[f]:
            if s.twin_error:  # a twin that still holds the trigger must never be generated from
                raise ValueError(s.twin_error)
    detected = [None] * len(texts["prompt"])
    if state.detector is not None:  # raises DetectionError (fail closed) for a flagged prompt it cannot localise
        state.detector.check_call(a.get("clip_skip"), a.get("cross_attention_kwargs"))
        screens["prompt"], detected = state.detector.screen(texts["prompt"], screens["prompt"], state.matchers)
    try:
        plan = make_plan(a, state.spec, texts, screens, mode=cfg.mode, global_profiles=state.global_profiles,
                         device=lambda: self._execution_device)  # found only when needed: it walks the modules
    except Unplannable as e:
        return _let_pipeline_reject(self, original, a, f"{e.args[0]} does not match the prompt")
    twinned = {p // n for p, _ in plan.pairs}
    report.prompts = [prompt_entry(t, [screens[f][i] for f in screens], state.profiles,
                                   "strip" if i in plan.stripped else "repair" if i in twinned else "none")
                      for i, t in enumerate(texts["prompt"])]
    if state.detector is not None:
        for entry, record in zip(report.prompts, detected):
            entry["detected"] = record
    report.screening_ms = (time.perf_counter() - t0) * 1e3
    return execute(self, state, plan, report, original)
