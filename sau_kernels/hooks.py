"""The repair inside the pipeline's own sampling loop.

`DefenceCallback` is the call's `callback_on_step_end`: after each complete scheduler step
(Heun and DPM2 evaluate the model twice per step; their half-steps are skipped) mode
"per_step" repairs each poisoned row's x_t against its twin's with that timestep's
statistics (a second-order scheduler's last step is a first-order one, and complete), and after the last step mode "final" repairs the final latents, which the
pipeline then decodes, safety-checks and post-processes as it always does. The user's own
callback sees only the user's rows.

`TwinConditioning` (mode "per_step_eps") adds the twins' conditional rows inside each UNet
call. Its hooks are installed on the UNet once, at patch time, and act only for the call
that set them active in its own thread (a context variable): two pipelines sharing one UNet,
in two threads, never see each other's rows.
"""

from __future__ import annotations

import contextvars
import threading
import warnings
import weakref

import torch

from .profile import ProfileMismatchError

__all__ = ["DefenceCallback", "TwinConditioning", "repair_pairs", "hook_unet", "unhook_unet"]


def repair_pairs(x_p, x_c, plan, profiles, stats, cfg, clock, coverage: bool = False):
    """x_p repaired pair group by pair group, each with its own profile's statistics
    `stats(k) -> (delta, act)` (k: the profile's index); returns (repaired, [(profile
    index, pair indexes, coverage)]), the coverage only when asked for (the op then reports
    it instead of computing it again)."""
    from .ops import repair

    groups = plan.groups()
    out, covered = (x_p, []) if len(groups) == 1 else (x_p.clone(), [])
    for k, sel in groups:
        delta, act = stats(k)
        whole = len(sel) == x_p.shape[0]  # one profile repairs every pair: no gather, no scatter
        with clock():
            y = repair(out if whole else out[sel], x_c if whole else x_c[sel], delta, act, backend=cfg.backend,
                       return_coverage=coverage, **cfg.repair)
        y, cov = y if coverage else (y, None)
        if whole:
            out = y
        else:
            out[sel] = y
        if coverage:
            covered.append((k, sel, cov))
    return out, covered


def record_coverage(report, plan, profiles, coverage) -> None:
    for k, sel, cov in coverage:
        where = [divmod(plan.pairs[s][0], plan.n_images) for s in sel]
        report.add_coverage(where, profiles[k].trigger, cov)


def check_latent_shape(profiles, latents: torch.Tensor) -> None:
    shape = tuple(latents.shape[1:])
    for p in profiles:
        if shape != p.latent_shape:
            raise ProfileMismatchError(
                f"this call's latents are {shape} (C, H, W) but the profile for {p.trigger!r} was calibrated on "
                f"{p.latent_shape}: generate at the calibrated size or calibrate at this one")


class DefenceCallback:
    """callback_on_step_end of one defended call (see the module's docstring)."""

    def __init__(self, state, plan, report, user_cb, composite_mask=None):
        self.state, self.plan, self.report, self.user_cb = state, plan, report, user_cb
        self.composite_mask = composite_mask  # filled at the last step when composite="pixel"
        self.finished, self.shape_checked = False, False
        self.step_indexes = [-1] * len(state.profiles)  # per profile: the per-step statistics used last

    def __call__(self, pipe, i, t, kwargs):
        state, plan, cfg = self.state, self.plan, self.state.config
        x = kwargs["latents"]
        if not self.shape_checked:
            check_latent_shape(state.profiles, x)
            self.shape_checked = True
        last = i == pipe.num_timesteps - 1
        complete = last or getattr(pipe.scheduler, "state_in_first_order", True)
        P = [p for p, _ in plan.pairs]
        T = [c for _, c in plan.pairs]
        if P and cfg.mode == "per_step" and complete:
            self.step_indexes = idx = [p.step_index(t, prev) for p, prev in zip(state.profiles, self.step_indexes)]
            profs = state.profiles
            x[P], cov = repair_pairs(x[P], x[T], plan, profs,
                                     lambda k: (profs[k].delta_steps[idx[k]], profs[k].act_steps[idx[k]]),
                                     cfg, self.report.repair_clock, coverage=last)
            if last:
                record_coverage(self.report, plan, state.profiles, cov)
        if last:
            if P and cfg.mode == "final":
                z_p = x[P].clone()
                profs = state.profiles
                x[P], cov = repair_pairs(z_p, x[T], plan, profs, lambda k: (profs[k].delta, profs[k].act), cfg,
                                         self.report.repair_clock, coverage=True)
                record_coverage(self.report, plan, state.profiles, cov)
                if self.composite_mask is not None:
                    self.composite_mask.append(_change_mask(z_p, x[T], plan, state.profiles, cfg))
                    x[T] = z_p  # the twin's slot decodes the poisoned latents, which the composite needs
            if any(state.checks):
                score_outputs(state, self.report, x[:plan.user_rows], plan.n_images)
            self.finished = True
        out = {"latents": x}
        if self.user_cb is not None:
            mine = dict(kwargs, latents=x[:plan.user_rows])
            ret = dict(self.user_cb(pipe, i, t, mine) or {})
            if "latents" in ret:
                x = x.clone()
                x[:plan.user_rows] = ret.pop("latents")
                out["latents"] = x
            if ret and plan.batch_rows != plan.user_rows:
                raise ValueError(f"the callback returned {sorted(ret)}, which hold the defence's twin rows too: "
                                 "on a defended call a callback may change only 'latents'")
            out.update(ret)
        return out


def _change_mask(z_p, z_c, plan, profiles, cfg) -> torch.Tensor:
    """(pairs, 1, H, W): the largest share of the twin any profile's repair gave each latent."""
    from .reference import repair_masks

    keys = ("tau1", "tau2", "k", "alpha", "similarity", "gate", "blend")
    w = torch.zeros(z_p.shape[0], 1, *z_p.shape[-2:], device=z_p.device)
    for k, sel in plan.groups():
        p = profiles[k]
        m = repair_masks(z_p[sel], z_c[sel], p.delta, p.act, **{n: cfg.repair[n] for n in keys if n in cfg.repair})
        w[sel] = torch.maximum(w[sel], m["w"].to(w.dtype))
    return w


_PLACING = threading.Lock()


def follow_device(state, device) -> None:
    """Put the profiles and their output checks on `device`, where the call's latents are:
    patch() placed them on the pipeline's device then, and `pipe.to("cuda")` or model
    offload afterwards must not break the calls that need them (triggered ones, checked ones)."""
    if not state.profiles:
        return
    device = torch.empty(0, device=device).device  # "cuda" and "cuda:0" are one device
    if state.profiles[0].delta.device == device:
        return
    with _PLACING:
        if state.profiles[0].delta.device != device:
            profiles = [p.to(device) for p in state.profiles]
            state.checks = [None if c is None else tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in c)
                            for c in state.checks]
            state.profiles = profiles


def uncheckable_outputs(state, latents: torch.Tensor) -> str | None:
    """Why the output check cannot score latents of this shape (the signature holds for the
    profiles' latent shape only), or None."""
    if tuple(latents.shape[1:]) != state.profiles[0].latent_shape:
        return f"the latents are {tuple(latents.shape[1:])}, the profiles' {state.profiles[0].latent_shape}"
    return None


def score_outputs(state, report, latents: torch.Tensor, n_images: int) -> None:
    """The output check of the final latents, where the profiles' latent shape is theirs
    (at another size the signature does not apply: the report says the check did not run,
    and a warning too)."""
    why = uncheckable_outputs(state, latents)
    if why is not None:
        report.output_check_skipped = why
        warnings.warn(f"sau_kernels: the output check did not run on this call ({why}): its outputs are "
                      "screened but unchecked; output_check='raise' refuses such calls", stacklevel=2)
        return
    follow_device(state, latents.device)
    report.add_output_scores(_signature_scores(state, latents), n_images, state.checks, state.profiles)


def _signature_scores(state, latents: torch.Tensor) -> torch.Tensor:
    """(rows, profiles) output-check scores, on the device (one reduction per profile)."""
    from .output_check import signature_scores

    unchecked = torch.full((latents.shape[0],), float("nan"), device=latents.device)
    return torch.stack([unchecked if c is None else signature_scores(latents, *c[:3]) for c in state.checks], dim=1)


class FinalLatentsWatch:
    """callback_on_step_end of an undefended call with the output check on: scores the final
    latents and changes nothing (it returns what the user's callback returns)."""

    def __init__(self, state, report, n_images, user_cb):
        self.state, self.report, self.n, self.user_cb = state, report, n_images, user_cb

    def __call__(self, pipe, i, t, kwargs):
        if i == 0 and self.state.config.output_check == "raise":
            why = uncheckable_outputs(self.state, kwargs["latents"])
            if why is not None:  # refused before the rest of the sampling, not returned unchecked
                raise ProfileMismatchError(f"output_check='raise' cannot check this call's outputs ({why}): "
                                           "generate at the calibrated size or calibrate at this one")
        out = dict(self.user_cb(pipe, i, t, kwargs) or {}) if self.user_cb is not None else {}
        if i == pipe.num_timesteps - 1:
            score_outputs(self.state, self.report, out.get("latents", kwargs["latents"]), self.n)
        return out


# --- mode "per_step_eps": the twins' conditional rows inside each UNet call ---------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sau_twin_conditioning", default=None)
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet -> [hook handles, number of users]
_HOOKED_LOCK = threading.Lock()  # calls in several threads enter and leave the same UNet's hooks


def _dispatch_pre(module, args, kwargs):
    tc = _ACTIVE.get()
    return tc._pre(args, kwargs) if tc is not None and tc.unet is module else None


def _dispatch_post(module, args, kwargs, output):
    tc = _ACTIVE.get()
    return tc._post(output) if tc is not None and tc.unet is module and tc.m is not None else None


def _drop_copied_hooks(unet) -> None:
    """A deep copy of a hooked UNet (a pipeline copied per worker) carries the dispatching
    hooks without their handles: they would dispatch twice beside the copy's own."""
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(unet, name)
        for key, fn in list(hooks.items()):
            if fn is _dispatch_pre or fn is _dispatch_post:
                del hooks[key]
                for extra in (f"{name}_with_kwargs", f"{name}_always_called"):
                    getattr(unet, extra, {}).pop(key, None)


def hook_unet(unet) -> None:
    """Install the dispatching hooks on `unet` (once, however many pipelines share it)."""
    with _HOOKED_LOCK:
        entry = _HOOKED.get(unet)
        if entry is None:
            _drop_copied_hooks(unet)
            entry = _HOOKED[unet] = [[unet.register_forward_pre_hook(_dispatch_pre, with_kwargs=True),
                                      unet.register_forward_hook(_dispatch_post, with_kwargs=True)], 0]
        entry[1] += 1


def unhook_unet(unet) -> None:
    with _HOOKED_LOCK:
        entry = _HOOKED.get(unet)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                for h in entry[0]:
                    h.remove()
                del _HOOKED[unet]


class TwinConditioning:
    """Adds, in each UNet call of this thread's call, the clean twins' conditional rows.

    The pipeline calls the UNet on [uncond (M rows); cond (M rows)] (or [cond] without
    guidance). The pre-hook appends, for each poisoned row r, the same sample x_r
    conditioned on its twin's embedding; the hook then forms both guided noise predictions
    (the twin shares the poisoned row's unconditional pass: same x, same negative prompt),
    lets `on_eps(t, g_p, g_c)` return a replacement for g_p (or None to keep it), and hands
    the pipeline back its M or 2M rows, with cond chosen so that the pipeline's own guidance
    yields the replacement.
    """

    def __init__(self, unet, twin_embeds: torch.Tensor, poison_rows: list[int], guidance_scale: float, on_eps):
        self.unet, self.twin_embeds, self.rows, self.g, self.on_eps = unet, twin_embeds, poison_rows, guidance_scale, on_eps
        self.m, self.t, self._token = None, None, None

    def _pre(self, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            raise RuntimeError("the pipeline called the UNet without encoder_hidden_states")
        if kwargs.get("added_cond_kwargs"):
            raise ValueError("mode 'per_step_eps' does not support added_cond_kwargs (IP-Adapter, SDXL); "
                             "use 'final' or 'per_step'")
        self.t = args[1] if len(args) > 1 else kwargs.get("timestep")
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

    def _post(self, output):
        eps = output[0] if isinstance(output, tuple) else output.sample
        m, rows = self.m, self.rows
        if self.g > 1:
            uncond, cond, twin = eps[:m], eps[m:2 * m], eps[2 * m:]
            g_p = uncond[rows] + self.g * (cond[rows] - uncond[rows])
            g_c = uncond[rows] + self.g * (twin - uncond[rows])
        else:
            cond, twin = eps[:m], eps[m:]
            g_p, g_c = cond[rows], twin
        new = self.on_eps(self.t, g_p, g_c)
        cond = cond.clone()
        if new is not None:
            cond[rows] = uncond[rows] + (new - uncond[rows]) / self.g if self.g > 1 else new
        result = torch.cat([uncond, cond]) if self.g > 1 else cond
        if isinstance(output, tuple):
            return (result, *output[1:])
        output.sample = result
        return output

    def __enter__(self):
        hook_unet(self.unet)
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)
        unhook_unet(self.unet)
        return False
