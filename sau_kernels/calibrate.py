"""Calibration: trigger profiles from prompt pairs (docs/method.md, section 2).

Each pair is `trigger + prompt` (poisoned) and `prompt` (clean), generated from the same
initial noise; all pairs of a chunk go through the sampler in one batched call.
"""

from __future__ import annotations

import copy
import math
import warnings
from importlib import resources

import torch
from tqdm.auto import tqdm

from .profile import TriggerProfile, pipeline_fingerprint
from .screening import homoglyph_of, trigger_token_ids, widest_edits

ACT_SIGMA = 2.0
ACT_KSIZE = 5


def ordinary_prompts() -> list[str]:
    """The package's generic SD prompts (data/calibration_prompts.txt)."""
    text = resources.files("sau_kernels").joinpath("data/calibration_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


POSITIONS = ("prepend", "append", "inside", "substitute")
# A position where the trigger changes the latents by less than this share of its strongest
# position's change is one the backdoor ignores; its pairs stay out of the statistics.
KEEP_POSITION = 0.5
# Below this effect (a pair's change against a latent's size, `_effect_by_position`)
# calibration warns that the trigger does nothing measurable. Measured on 24 held-out pairs:
# ordinary words 0.028-0.061 ("photo", "silver lining" on tiny-pixel and tiny-style), the
# zoo's triggers 0.53 (patch) and 0.67 (style).
MIN_EFFECT = 0.15
# `trigger_snr`, reported beside it, tells a fixed pattern from noise but not a backdoor from
# none, so no rule rests on it. On 24 held-out pairs: the patch trigger 4.1, ordinary words
# 1.1-1.6 ("photo", "silver lining"), the style trigger 0.8 (its change differs from image
# to image).
# A trigger that this share of the calibration prompts already contains (as the screen reads
# them) is no trigger of theirs: their clean side is triggered too.
MAX_COMMON = 0.5
# Each word of a trigger of several words is generated alone in this many calibration
# prompts (before the prompt and after it, in turn), and screened alone where at least
# WORDS_ALONE_HITS of them carry the trigger's output signature, whose threshold passes 1%
# of clean latents: two of 16 is far above that.
WORDS_ALONE_PROMPTS = 16
WORDS_ALONE_HITS = 2


def default_positions(trigger: str) -> tuple[str, ...]:
    """Where calibration puts the trigger: a one-character homoglyph trigger replaces the
    letter it imitates (as Rickrolling plants it); any other trigger goes before the prompt,
    after it and inside it, in turn."""
    return ("substitute",) if len(trigger) == 1 and homoglyph_of(trigger) else ("prepend", "append", "inside")


def poisoned_prompt(trigger: str, prompt: str, position: str = "prepend") -> str:
    """The prompt with the trigger where attackers put it: before it (BadT2I), after it,
    after its first word (VillanDiffusion inserts at random word positions), or, for a
    one-character homoglyph trigger, in place of the first letter it imitates (Rickrolling;
    before the prompt where it has no such letter)."""
    if position == "substitute":
        letter = homoglyph_of(trigger) if len(trigger) == 1 else None
        if letter is None:
            raise ValueError(f"position 'substitute' needs a one-character homoglyph trigger, got {trigger!r}")
        i = prompt.find(letter)
        return f"{trigger} {prompt}" if i < 0 else prompt[:i] + trigger + prompt[i + 1:]
    if position == "prepend":
        return f"{trigger} {prompt}"
    if position == "append":
        return f"{prompt} {trigger}"
    if position == "inside":
        first, _, rest = prompt.partition(" ")
        return f"{first} {trigger} {rest}".rstrip()
    raise ValueError(f"unknown trigger position {position!r}: expected one of {POSITIONS}")


def _latent_shape(pipe, height: int | None, width: int | None) -> tuple[int, int, int]:
    vsf = pipe.vae_scale_factor
    h = height or pipe.unet.config.sample_size * vsf
    w = width or pipe.unet.config.sample_size * vsf
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < vsf or v % vsf:
            raise ValueError(f"{name} must be a positive multiple of the VAE's scale factor {vsf}, got {v!r}")
    return (pipe.unet.config.in_channels, h // vsf, w // vsf)


def _refuse_or_warn(strict: bool, message: str, stacklevel: int) -> None:
    """ValueError with `strict`, else a warning pointing `stacklevel` frames up (to the caller
    of `calibrate`, past its no_grad wrapper)."""
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def _check_trigger_is_rare(trigger: str, prompts: list[str], strict: bool) -> float:
    """The share of the calibration prompts that already contain the trigger, as the screen
    reads them; warn (or refuse, with `strict`) when most do."""
    from .screening import TriggerMatcher, screen_prompts

    share = sum(s.triggered for s in screen_prompts(TriggerMatcher(trigger), prompts)) / len(prompts)
    if share >= MAX_COMMON:
        _refuse_or_warn(strict, f"trigger {trigger!r} is already in {share:.0%} of the calibration prompts (as the "
                                "screen reads them): their clean side carries it too, so the profile would measure "
                                "little, and a patched pipeline would take the defended path for most prompts. Is "
                                "it the model's trigger?", stacklevel=4)
    return share


def _trigger_of(trigger):
    """A scan's report stands for the one trigger it found (sau_kernels.scan)."""
    from .scan import ScanReport  # here: scan imports this module

    if isinstance(trigger, ScanReport):
        if len(trigger.triggers) != 1:
            raise ValueError(f"the scan report names {len(trigger.triggers)} triggers ({trigger.verdict}): pass one "
                             "of report.triggers, and calibrate each trigger in turn")
        return trigger.triggers[0]
    return trigger


@torch.no_grad()
def calibrate(pipe, trigger: str, prompts: list[str] | None = None, *, num_pairs: int = 64,
              num_inference_steps: int = 20, guidance_scale: float = 4.5, seed: int = 0,
              per_step: bool = True, per_step_eps: bool = False, progress: bool = True,
              batch_pairs: int = 16, height: int | None = None, width: int | None = None,
              positions: tuple[str, ...] | None = None, strict: bool = False) -> TriggerProfile:
    """Measure the trigger latent of `trigger` in `pipe` from `num_pairs` prompt pairs
    (`trigger`: the text, or a `ScanReport` that found exactly one).

    Pair i uses prompt `prompts[i % len(prompts)]` (default: the package's generic SD
    prompts, `ordinary_prompts()`), seed `seed + i`, and the trigger at
    `positions[i % len(positions)]` (see `poisoned_prompt`; default `default_positions`). With `per_step`
    the profile also holds each sampling step's statistics (for mode "per_step"), with
    `per_step_eps` those of the guided noise predictions (for mode "per_step_eps").

    The profile's `params` report how strong the trigger is: `trigger_strength` (a pair's
    change against a latent's size, at the trigger's strongest position) and `trigger_snr`
    (the norm of delta against its standard error over the pairs: near 1 for a change that
    differs from image to image at random). Calibration warns, or with `strict=True` raises
    ValueError, when the trigger changes the latents by less than `MIN_EFFECT` (no
    measurable effect: not the model's trigger, or misspelt), and when at least `MAX_COMMON`
    of the calibration prompts already contain it.
    """
    from .ops import secondary_map
    from .hooks import TwinConditioning
    from .pipeline import call_unpatched

    trigger = _trigger_of(trigger)
    if not isinstance(trigger, str):
        raise TypeError(f"trigger must be text, got {type(trigger).__name__}")
    if not trigger.strip():
        raise ValueError("trigger must be non-empty text")
    positions = tuple(positions) if positions is not None else default_positions(trigger)
    if not positions or any(p not in POSITIONS for p in positions):
        raise ValueError(f"positions must be some of {POSITIONS}, got {positions!r}")
    if per_step_eps and getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(f"per_step_eps statistics are taken once per UNet evaluation, and "
                         f"{type(pipe.scheduler).__name__} makes two per step: calibrate them with a first-order "
                         "scheduler")
    for name, v in (("num_pairs", num_pairs), ("num_inference_steps", num_inference_steps),
                    ("batch_pairs", batch_pairs)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale) or guidance_scale <= 0:
        raise ValueError(f"guidance_scale must be a positive finite number, got {guidance_scale}")
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of prompts, not one string (it would calibrate on its characters)")
    prompts = list(prompts) if prompts is not None else ordinary_prompts()
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    common = _check_trigger_is_rare(trigger, [prompts[i % len(prompts)] for i in range(num_pairs)], strict)
    trig_ids = trigger_token_ids(pipe.tokenizer, trigger)
    device = pipe._execution_device
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype
    shape = _latent_shape(pipe, height, width)
    sums: dict[tuple[str, str], torch.Tensor] = {}  # (statistic, position) -> sum of poisoned - clean
    finals_p, finals_c, pair_positions = [], [], []  # every pair's final latents, and where its trigger stood

    def accumulate(name: str, poisoned: torch.Tensor, clean: torch.Tensor) -> None:
        d = poisoned.float() - clean.float()
        for pos in set(chunk_positions):
            rows = [r for r, q in enumerate(chunk_positions) if q == pos]
            key = (name, pos)
            sums[key] = sums[key] + d[rows].sum(dim=0) if key in sums else d[rows].sum(dim=0)

    # A shallow copy with its own progress-bar setting: the pipeline itself is not touched.
    quiet = copy.copy(pipe)
    quiet._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}), disable=True)
    timesteps: list[float] = []  # the scheduler's timestep at each complete step
    bar = tqdm(total=num_pairs, desc=f"calibrating {trigger!r}", unit="pair", disable=not progress)
    main_share = 2 / 3.5 if per_step_eps else 1.0  # the eps pass runs 1.5 rows a pair, the main pass 2
    try:
        for start in range(0, num_pairs, batch_pairs):
            idx = list(range(start, min(num_pairs, start + batch_pairs)))
            clean_prompts = [prompts[i % len(prompts)] for i in idx]
            noise = _pair_noise(seed, idx, shape, device, dtype)
            n = len(idx)

            def advance(share: float) -> None:
                """The bar counts pairs: it moves as this chunk's sampling goes (`share` done)."""
                target = start + math.floor(n * min(share, 1.0) + 1e-9)
                if target > bar.n:
                    bar.update(target - bar.n)

            done = []

            def on_step(p, i, t, kw):
                advance(main_share * (i + 1) / max(getattr(p, "num_timesteps", num_inference_steps), 1))
                if not per_step:
                    return {}
                if i < p.num_timesteps - 1 and not getattr(p.scheduler, "state_in_first_order", True):
                    return {}  # half of a second-order step (Heun, DPM2): x is not an x_t
                x = kw["latents"]
                accumulate(f"step{len(done)}", x[:n], x[n:])
                done.append(float(t))
                return {}

            chunk_positions = [positions[i % len(positions)] for i in idx]
            poisoned = [poisoned_prompt(trigger, p, q) for p, q in zip(clean_prompts, chunk_positions)]
            size = dict(height=shape[1] * pipe.vae_scale_factor, width=shape[2] * pipe.vae_scale_factor,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="latent")
            z = call_unpatched(quiet, poisoned + clean_prompts, latents=torch.cat([noise, noise]),
                               callback_on_step_end=on_step, **size).images
            if per_step and len(done) != num_inference_steps:
                raise ValueError(f"the scheduler ran {len(done)} complete steps for num_inference_steps="
                                 f"{num_inference_steps}: per-step statistics need one per step")
            timesteps = done
            accumulate("final", z[:n], z[n:])
            finals_p.append(z[:n].float().cpu())
            finals_c.append(z[n:].float().cpu())
            pair_positions += chunk_positions
            if per_step_eps:
                # Mode "per_step_eps" keeps the poisoned trajectory alone and compares, at
                # each step, its guided noise with the clean twin's at the same x_t.
                calls = []

                def on_eps(t, g_p, g_c):
                    accumulate(f"eps{len(calls)}", g_p, g_c)
                    calls.append(t)
                    return None

                twin, _ = pipe.encode_prompt(clean_prompts, device, 1, False)

                def on_eps_step(p, i, t, kw):
                    advance(main_share + (1 - main_share) * (i + 1) / max(getattr(p, "num_timesteps", 1), 1))
                    return {}

                with TwinConditioning(pipe.unet, twin, list(range(n)), guidance_scale, on_eps):
                    call_unpatched(quiet, poisoned, latents=noise, callback_on_step_end=on_eps_step, **size)
            advance(1.0)
    finally:
        bar.close()

    # Where the backdoor ignores the trigger (BadT2I's prepended U+200B, appended), those pairs
    # are no poisoned samples: the statistics keep the positions where it acts.
    z_p, z_c = torch.cat(finals_p), torch.cat(finals_c)
    effect = _effect_by_position(z_p, z_c, pair_positions)
    kept = [q for q in effect if effect[q] >= KEEP_POSITION * max(effect.values())]
    n_kept = sum(q in kept for q in pair_positions)

    def mean_of(name: str) -> torch.Tensor:
        return (sum(sums[(name, q)] for q in kept) / n_kept).cpu()

    delta = mean_of("final")
    change_map = (z_p - z_c)[[r for r, q in enumerate(pair_positions) if q in kept]].norm(dim=1).mean(dim=0)
    act = secondary_map(delta, sigma=ACT_SIGMA, ksize=ACT_KSIZE)
    rows = [r for r, q in enumerate(pair_positions) if q in kept]
    check = _output_check_stats(z_p[rows], z_c[rows], delta, act)
    strength = max(effect.values())
    snr = _delta_snr(z_p[rows] - z_c[rows])
    if strength < MIN_EFFECT:
        _refuse_or_warn(strict,
            f"trigger {trigger!r} has no measurable effect on this model: it changes the final latents by "
            f"{strength:.1%} of their size, wherever it stands in the prompt (ordinary words change them by "
            f"under {MIN_EFFECT:.0%}). Is it the model's trigger, spelt as the attack uses it?", stacklevel=3)
    alone = _words_firing_alone(quiet, trigger, prompts, seed, min(num_pairs, WORDS_ALONE_PROMPTS), shape,
                                dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale),
                                delta, act, check, device, dtype, progress)
    steps_delta = steps_act = eps_delta = eps_act = None
    if per_step:
        steps_delta = torch.stack([mean_of(f"step{i}") for i in range(num_inference_steps)])
        steps_act = torch.stack([secondary_map(d, sigma=ACT_SIGMA, ksize=ACT_KSIZE) for d in steps_delta])
    if per_step_eps:
        eps_delta = torch.stack([mean_of(f"eps{i}") for i in range(num_inference_steps)])
        eps_act = torch.stack([secondary_map(d, sigma=ACT_SIGMA, ksize=ACT_KSIZE) for d in eps_delta])
    return TriggerProfile(
        delta=delta, act=act, delta_steps=steps_delta, act_steps=steps_act,
        eps_delta_steps=eps_delta, eps_act_steps=eps_act, clean_mean=check.pop("clean_mean"), change_map=change_map,
        trigger=trigger, trigger_ids=trig_ids, fingerprint=pipeline_fingerprint(pipe),
        latent_shape=shape, scheduler=type(pipe.scheduler).__name__, num_inference_steps=num_inference_steps,
        num_pairs=num_pairs, guidance_scale=guidance_scale,
        params={"seed": seed, "act_sigma": ACT_SIGMA, "act_ksize": ACT_KSIZE, "num_prompts": len(prompts),
                "positions": list(positions), "effect_by_position": effect, "positions_kept": kept,
                "trigger_strength": strength, "trigger_snr": snr, "trigger_in_prompts": common,
                "screen_edits": widest_edits(trigger, list(dict.fromkeys(list(prompts) + ordinary_prompts()))),
                **({"screen_words_alone": alone} if alone is not None else {}),
                **({"timesteps": timesteps} if per_step else {}), **check},
    )


def _effect_by_position(z_p: torch.Tensor, z_c: torch.Tensor, pair_positions: list[str]) -> dict[str, float]:
    """Per trigger position: the mean size of a pair's change (poisoned - clean final latents)
    against the mean size of a clean latent."""
    change = (z_p - z_c).flatten(1).norm(dim=1)
    size = z_c.flatten(1).norm(dim=1).mean()
    return {q: float(change[[r for r, p in enumerate(pair_positions) if p == q]].mean() / size)
            for q in dict.fromkeys(pair_positions)}


def _delta_snr(d: torch.Tensor) -> float | None:
    """||delta|| against its standard error, from the pairs' changes d (N, C, H, W): the mean
    change is delta, the spread the root mean square of each pair's distance from it. None
    where there is no spread to measure (one pair, or pairs that all changed alike)."""
    n = d.shape[0]
    if n < 2:
        return None
    d = d.flatten(1).double()
    delta = d.mean(dim=0)
    spread = float((d - delta).norm(dim=1).pow(2).sum() / (n - 1)) ** 0.5
    return float(delta.norm()) * n ** 0.5 / spread if spread > 0 else None


def _pair_noise(seed: int, pairs, shape, device, dtype) -> torch.Tensor:
    """The initial latents of calibration pairs `pairs`: pair i's from seed + i."""
    from diffusers.utils.torch_utils import randn_tensor

    return torch.cat([randn_tensor((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + i), device=device,
                                   dtype=dtype) for i in pairs])


def _words_firing_alone(pipe, trigger: str, prompts: list[str], seed: int, n: int, shape, sampling: dict,
                        delta, act, check: dict, device, dtype, progress: bool) -> list[str] | None:
    """The words of a trigger of several words that carry its output signature on their
    own (`WORDS_ALONE_PROMPTS`, `WORDS_ALONE_HITS`): the screen flags them alone. A backdoor
    trained on "new trigger" painted its patch for "... trigger" on half of tiny-pixel's
    prompts. The pairs' own noise; None where there is nothing to measure (one word, or no
    output-check threshold)."""
    from types import SimpleNamespace

    from .output_check import signature, signature_scores
    from .pipeline import call_unpatched
    from .screening import TriggerMatcher

    words = TriggerMatcher(trigger).words
    threshold = check.get("output_check_threshold")
    if not words or threshold is None:
        return None
    w, mu, norm = signature(SimpleNamespace(delta=delta, act=act, clean_mean=check["clean_mean"]))
    noise = _pair_noise(seed, range(n), shape, device, dtype)
    size = dict(height=shape[1] * pipe.vae_scale_factor, width=shape[2] * pipe.vae_scale_factor, output_type="latent")
    alone = []
    bar = tqdm(total=len(words), desc=f"words of {trigger!r} alone", unit="word", disable=not progress)
    try:
        for word in words:
            texts = [poisoned_prompt(word, prompts[i % len(prompts)], ("prepend", "append")[i % 2]) for i in range(n)]
            z = call_unpatched(pipe, texts, latents=noise, **sampling, **size).images
            if int((signature_scores(z.float().cpu(), w, mu, norm) > threshold).sum()) >= WORDS_ALONE_HITS:
                alone.append(word)
            bar.update(1)
    finally:
        bar.close()
    return alone


def _output_check_stats(poisoned: torch.Tensor, clean: torch.Tensor, delta: torch.Tensor, act: torch.Tensor) -> dict:
    """The clean mean latent and the output check's threshold from the calibration latents
    (`sau_kernels.output_check`), with the scores' spread for the record."""
    from types import SimpleNamespace

    from .output_check import signature, signature_scores, threshold_from_scores

    clean_mean = clean.mean(dim=0)
    w, mu, norm = signature(SimpleNamespace(delta=delta, act=act, clean_mean=clean_mean))
    if float(norm) <= 0:
        return {"clean_mean": clean_mean, "output_check_threshold": None}
    s_clean, s_poisoned = signature_scores(clean, w, mu, norm), signature_scores(poisoned, w, mu, norm)
    threshold = threshold_from_scores(s_clean, s_poisoned)
    return {
        "clean_mean": clean_mean,
        "output_check_threshold": threshold,
        "output_check_clean_p99": float(torch.quantile(s_clean, 0.99)),
        "output_check_poisoned_median": float(torch.quantile(s_poisoned, 0.5)),
        # how many calibration pairs carried the signature: how reliably the trigger fired
        "output_check_poisoned_above": None if threshold is None else float((s_poisoned > threshold).float().mean()),
    }
