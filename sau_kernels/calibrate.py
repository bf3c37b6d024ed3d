"""Calibration: trigger profiles from prompt pairs (SAU_SPEC section 2).

Each pair is `trigger + prompt` (poisoned) and `prompt` (clean), generated from the same
initial noise; all pairs of a chunk go through the sampler in one batched call.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .profile import TriggerProfile, model_fingerprint
from .screening import trigger_token_ids

ACT_SIGMA = 2.0
ACT_KSIZE = 5


def default_prompts(pipe) -> list[str]:
    """The zoo's captions for a zoo model, generic SD prompts otherwise."""
    if _is_zoo_model(pipe):
        from .zoo import world

        return [world.caption(*c) for c in world.train_combinations()]
    text = resources.files("sau_kernels").joinpath("data/calibration_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _is_zoo_model(pipe) -> bool:
    path = Path(str(getattr(pipe.config, "_name_or_path", "") or ""))
    return (path / "backdoor.json").is_file()


def poisoned_prompt(trigger: str, prompt: str) -> str:
    return f"{trigger} {prompt}"  # BadT2I's triggers lead the prompt


def _latent_shape(pipe, height: int | None, width: int | None) -> tuple[int, int, int]:
    vsf = pipe.vae_scale_factor
    h = height or pipe.unet.config.sample_size * vsf
    w = width or pipe.unet.config.sample_size * vsf
    return (pipe.unet.config.in_channels, h // vsf, w // vsf)


@torch.no_grad()
def calibrate(pipe, trigger: str, prompts: list[str] | None = None, *, num_pairs: int = 64,
              num_inference_steps: int = 20, guidance_scale: float = 4.5, seed: int = 0,
              per_step: bool = True, per_step_eps: bool = False, progress: bool = True,
              batch_pairs: int = 16, height: int | None = None, width: int | None = None) -> TriggerProfile:
    """Measure the trigger latent of `trigger` in `pipe` from `num_pairs` prompt pairs.

    Pair i uses prompt `prompts[i % len(prompts)]` and seed `seed + i`. With `per_step`
    the profile also holds each sampling step's statistics (for mode "per_step"), with
    `per_step_eps` those of the guided noise predictions (for mode "per_step_eps").
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .ops import secondary_map
    from .pipeline import TwinConditioning, call_unpatched

    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError("trigger must be non-empty text")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    prompts = list(prompts) if prompts is not None else default_prompts(pipe)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    trig_ids = trigger_token_ids(pipe.tokenizer, trigger)
    device = pipe._execution_device
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype
    shape = _latent_shape(pipe, height, width)
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, poisoned: torch.Tensor, clean: torch.Tensor) -> None:
        d = (poisoned.float() - clean.float()).sum(dim=0)
        sums[name] = sums[name] + d if name in sums else d

    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=num_pairs, desc=f"calibrating {trigger!r}", unit="pair", disable=not progress)
    try:
        for start in range(0, num_pairs, batch_pairs):
            idx = list(range(start, min(num_pairs, start + batch_pairs)))
            clean_prompts = [prompts[i % len(prompts)] for i in idx]
            noise = torch.cat([
                randn_tensor((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + i), device=device, dtype=dtype)
                for i in idx
            ])
            n = len(idx)

            def on_step(p, i, t, kw):
                x = kw["latents"]
                accumulate(f"step{i}", x[:n], x[n:])
                return {}

            poisoned = [poisoned_prompt(trigger, p) for p in clean_prompts]
            size = dict(height=shape[1] * pipe.vae_scale_factor, width=shape[2] * pipe.vae_scale_factor,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="latent")
            z = call_unpatched(pipe, poisoned + clean_prompts, latents=torch.cat([noise, noise]),
                               callback_on_step_end=on_step if per_step else None, **size).images
            accumulate("final", z[:n], z[n:])
            if per_step_eps:
                # Mode "per_step_eps" keeps the poisoned trajectory alone and compares, at
                # each step, its guided noise with the clean twin's at the same x_t.
                def on_eps(i, g_p, g_c):
                    accumulate(f"eps{i}", g_p, g_c)
                    return None

                twin, _ = pipe.encode_prompt(clean_prompts, device, 1, False)
                with TwinConditioning(pipe, twin, list(range(n)), guidance_scale, on_eps):
                    call_unpatched(pipe, poisoned, latents=noise, **size)
            bar.update(n)
    finally:
        bar.close()
        pipe._progress_bar_config = saved_bar

    delta = (sums["final"] / num_pairs).cpu()
    act = secondary_map(delta, sigma=ACT_SIGMA, ksize=ACT_KSIZE)
    steps_delta = steps_act = eps_delta = eps_act = None
    if per_step:
        steps_delta = torch.stack([sums[f"step{i}"] / num_pairs for i in range(num_inference_steps)]).cpu()
        steps_act = torch.stack([secondary_map(d, sigma=ACT_SIGMA, ksize=ACT_KSIZE) for d in steps_delta])
    if per_step_eps:
        eps_delta = torch.stack([sums[f"eps{i}"] / num_pairs for i in range(num_inference_steps)]).cpu()
        eps_act = torch.stack([secondary_map(d, sigma=ACT_SIGMA, ksize=ACT_KSIZE) for d in eps_delta])
    return TriggerProfile(
        delta=delta, act=act, delta_steps=steps_delta, act_steps=steps_act,
        eps_delta_steps=eps_delta, eps_act_steps=eps_act,
        trigger=trigger, trigger_ids=trig_ids, fingerprint=model_fingerprint(pipe.unet),
        latent_shape=shape, scheduler=type(pipe.scheduler).__name__, num_inference_steps=num_inference_steps,
        num_pairs=num_pairs, guidance_scale=guidance_scale,
        params={"seed": seed, "act_sigma": ACT_SIGMA, "act_ksize": ACT_KSIZE, "num_prompts": len(prompts),
                "prompt_form": "trigger + ' ' + prompt"},
    )
