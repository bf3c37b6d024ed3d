"""Run a plan through the pipeline's own `__call__` and hand back the user's rows.

The pipeline draws the noise, encodes the text, samples, decodes, runs its safety checker
and post-processes as it always does; the defence only adds rows (the plan) and acts inside
the loop (`hooks.DefenceCallback`). What comes back is cut to the user's rows, in the
pipeline's own output type, with the call's report attached.
"""

from __future__ import annotations

import torch

from .composite import composite_images
from .hooks import (DefenceCallback, FinalLatentsWatch, TwinConditioning, follow_device, record_coverage,
                    repair_pairs)
from .report import set_last_report

__all__ = ["execute"]


def _tensor_inputs_with_latents(a: dict) -> list[str]:
    """The call's callback tensor inputs (a PipelineCallback's own, if the user passed one),
    with "latents", which the defence's callbacks read."""
    user_cb = a.get("callback_on_step_end")
    inputs = list(a.get("callback_on_step_end_tensor_inputs") or [])
    if user_cb is not None and hasattr(user_cb, "tensor_inputs"):
        inputs = list(user_cb.tensor_inputs)
    return inputs if "latents" in inputs else inputs + ["latents"]


def _user_rows(value, plan):
    if plan.batch_rows == plan.user_rows or value is None:
        return value
    if isinstance(value, (list, torch.Tensor)) or hasattr(value, "shape"):
        if len(value) == plan.batch_rows:
            return value[:plan.user_rows]
    return value


def _cut_to_user_rows(out, plan):
    if isinstance(out, tuple):
        return tuple(_user_rows(v, plan) for v in out)
    for key in list(out.keys()):
        out[key] = _user_rows(out[key], plan)
    return out


def execute(pipe, state, plan, report, original):
    """The pipeline's output for `plan`, its report attached (`output.sau_report`)."""
    cfg = state.config
    a = dict(plan.kwargs)
    report.rows = plan.batch_rows + (len(plan.pairs) if cfg.mode == "per_step_eps" else 0)
    if state.unchecked_why:
        report.output_check_skipped = state.unchecked_why
    if plan.pairs:  # (an untriggered call's output check follows its latents' device when it scores them)
        follow_device(state, pipe._execution_device)
    if not plan.pairs and not any(state.checks):
        out = original(pipe, **a)  # nothing to repair, nothing to check: the unpatched call itself
    elif not plan.pairs:
        a["callback_on_step_end"] = FinalLatentsWatch(state, report, plan.n_images, a.get("callback_on_step_end"))
        a["callback_on_step_end_tensor_inputs"] = _tensor_inputs_with_latents(plan.kwargs)
        out = original(pipe, **a)
    else:
        out = _defended(pipe, state, plan, report, original, a)
    out = _cut_to_user_rows(out, plan)
    report.finish(raise_suspects=cfg.output_check == "raise")
    if not isinstance(out, tuple):
        out.sau_report = report
    set_last_report(pipe, report)
    return out


def _defended(pipe, state, plan, report, original, a):
    cfg = state.config
    user_type = a.get("output_type", "pil")
    composite = cfg.composite == "pixel" and cfg.mode == "final" and user_type != "latent"
    masks = [] if composite else None
    hook = DefenceCallback(state, plan, report, a.get("callback_on_step_end"), masks)
    a["callback_on_step_end"] = hook
    a["callback_on_step_end_tensor_inputs"] = _tensor_inputs_with_latents(plan.kwargs)
    if composite:
        a["output_type"] = "pt"
    if cfg.mode == "per_step_eps":
        out = _with_twin_conditioning(pipe, state, plan, report, original, a)
    else:
        out = original(pipe, **a)
    if not hook.finished:
        raise RuntimeError("the pipeline's sampling loop ended before its last step (interrupted?), so the "
                           f"triggered prompts {report.triggered} were not repaired: their images are withheld")
    if composite:
        out = _composite_output(pipe, out, plan, masks[0], cfg.feather_sigma * pipe.vae_scale_factor, user_type)
    return out


def _with_twin_conditioning(pipe, state, plan, report, original, a):
    """Mode "per_step_eps": one trajectory; the twins add conditional rows to each UNet call."""
    cfg, profs, n = state.config, state.profiles, plan.n_images
    twin_prompts = plan.twin_texts["prompt"]
    negatives = plan.twin_texts.get("negative_prompt")
    embeds, _ = pipe.encode_prompt(twin_prompts, pipe._execution_device, n, False, negatives,
                                   clip_skip=a.get("clip_skip"))
    previous, last = [-1] * len(profs), {}
    steps = len(profs[0].params.get("timesteps") or range(profs[0].num_inference_steps))  # coverage at the last

    def on_eps(t, g_p, g_c):
        idx = previous[:] = [p.step_index(t, prev) for p, prev in zip(profs, previous)]
        out, cov = repair_pairs(g_p, g_c, plan, profs,
                                lambda k: (profs[k].eps_delta_steps[idx[k]], profs[k].eps_act_steps[idx[k]]),
                                cfg, report.repair_clock, coverage=idx[0] == steps - 1)
        if cov:
            last["coverage"] = cov
        return out

    rows = [p for p, _ in plan.pairs]
    with TwinConditioning(pipe.unet, embeds, rows, a.get("guidance_scale", 7.5), on_eps):
        out = original(pipe, **a)
    if "coverage" in last:
        record_coverage(report, plan, profs, last["coverage"])
    return out


def _composite_output(pipe, out, plan, w, sigma_px, user_type):
    images = out[0] if isinstance(out, tuple) else out.images
    images = composite_images(images, plan.pairs, w, sigma_px)
    if user_type != "pt":
        images = pipe.image_processor.pt_to_numpy(images)
        if user_type == "pil":
            images = pipe.image_processor.numpy_to_pil(images)
    if isinstance(out, tuple):
        return (images, *out[1:])
    out.images = images
    return out
