"""The defence table: SAU measured on the zoo's backdoored models (docs/method.md, section 6).

Final-mode configurations all repair the same trajectory pairs, so the pairs are sampled
once and every configuration is scored on them; per-step mode changes the trajectory and
runs the patched pipeline itself. Three disjoint seed ranges keep the numbers honest:
calibration uses seeds from 0, the choice of `patch()`'s defaults the "selection" split,
the reported tables the "report" split.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import backdoor_info, load_pipeline, metrics, world

SPLIT_SEEDS = {"report": 1_000_000, "selection": 2_000_000}


@dataclass(frozen=True)
class Config:
    """One defence configuration: a mode, the op's options and the composite."""
    mode: str = "final"
    blend: str = "convex"
    similarity: str = "latent"
    gate: float | None = None
    composite: str | None = None

    @property
    def label(self) -> str:
        g = "-" if self.gate is None else f"{self.gate:g}"
        return f"{self.mode} / {self.blend} / {self.similarity} / gate {g}" + (" / pixel composite" if self.composite else "")

    def repair_params(self) -> dict:
        return {"blend": self.blend, "similarity": self.similarity, "gate": self.gate}


PAPER = Config(blend="paper", similarity="latent", gate=None)

FINAL_CONFIGS = [
    PAPER,
    Config(blend="convex", similarity="latent"),
    Config(blend="convex", similarity="latent", gate=0.3),
    Config(blend="convex", similarity="difference"),
    Config(blend="convex", similarity="difference", gate=0.3),
    Config(blend="paper", similarity="difference", gate=0.3),
    Config(blend="convex", similarity="latent", composite="pixel"),
    Config(blend="convex", similarity="difference", gate=0.3, composite="pixel"),
]
PER_STEP_CONFIGS = [
    Config(mode="per_step", blend="paper"),
    Config(mode="per_step", blend="convex"),
    Config(mode="per_step", blend="convex", similarity="difference", gate=0.3),
    Config(mode="per_step_eps", blend="paper"),
    Config(mode="per_step_eps", blend="convex"),
    Config(mode="per_step_eps", blend="convex", similarity="difference", gate=0.3),
]


def _mode_available(profile, mode: str) -> bool:
    return mode == "final" or (mode == "per_step" and profile.has_per_step) or (
        mode == "per_step_eps" and profile.has_per_step_eps)


def cases(n: int, split: str) -> tuple[list[str], list[int]]:
    combos = world.all_combinations()
    base = SPLIT_SEEDS[split]
    return [world.caption(*combos[i % len(combos)]) for i in range(n)], [base + i for i in range(n)]


def trigger_region(info: dict, image_size: int, latent_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel mask, latent mask) of where the backdoor draws; the whole image for style."""
    px = np.zeros((image_size, image_size), dtype=bool)
    if info.get("kind") == "pixel":
        rows, cols = world.corner_slices(info["corner"], info["patch"].shape[0], image_size)
        px[rows, cols] = True
    else:
        px[:] = True
    f = image_size // latent_size
    lat = px.reshape(latent_size, f, latent_size, f).any(axis=(1, 3))
    return px, lat


def _to_uint8(decoded: torch.Tensor) -> np.ndarray:
    return ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def _decode(pipe, z: torch.Tensor) -> torch.Tensor:
    return pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]


@torch.no_grad()
def sample_pairs(pipe, trigger: str, prompts: list[str], seeds: list[int], *, steps: int = 20,
                 guidance_scale: float = 4.5, batch: int = 32):
    """Final latents (z_p, z_c) of each poisoned prompt and its clean twin, from the same noise."""
    from diffusers.utils.torch_utils import randn_tensor

    from ..calibrate import _latent_shape, poisoned_prompt
    from ..pipeline import call_unpatched

    shape = _latent_shape(pipe, None, None)
    zp, zc = [], []
    for s in range(0, len(prompts), batch):
        ps, ss = prompts[s:s + batch], seeds[s:s + batch]
        noise = torch.cat([randn_tensor((1, *shape), generator=torch.Generator().manual_seed(x), dtype=pipe.unet.dtype)
                           for x in ss])
        z = call_unpatched(pipe, [poisoned_prompt(trigger, p) for p in ps] + ps, latents=torch.cat([noise, noise]),
                           num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent").images
        zp.append(z[:len(ps)])
        zc.append(z[len(ps):])
    return torch.cat(zp), torch.cat(zc)


def _shows_backdoor(images: np.ndarray, info: dict) -> np.ndarray:
    return metrics.patch_present(images, info) if info["kind"] == "pixel" else metrics.is_grayscale(images)


@dataclass
class ModelEvaluation:
    model: str
    kind: str
    n: int
    asr_before: float
    untriggered_content: dict
    rows: list[dict] = field(default_factory=list)
    examples: dict = field(default_factory=dict)


def evaluate_defence(model: str, profile, n: int = 100, split: str = "report", *, per_step: bool = True,
                     timing_batch: int = 8, timing_repeats: int = 3, final_configs=None, per_step_configs=None,
                     progress=print) -> ModelEvaluation:
    """Score every configuration on n triggered prompt/seed pairs of `split`."""
    from .. import patch, unpatch
    from ..ops import repair
    from ..reference import repair_masks

    final_configs = FINAL_CONFIGS if final_configs is None else final_configs
    per_step_configs = (PER_STEP_CONFIGS if per_step else []) if per_step_configs is None else per_step_configs
    info = backdoor_info(model)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = cases(n, split)
    latent_size = pipe.unet.config.sample_size
    px_region, lat_region = trigger_region(info, world.IMAGE_SIZE, latent_size)

    progress(f"[{model}] sampling {n} trajectory pairs")
    z_p, z_c = sample_pairs(pipe, profile.trigger, prompts, seeds)
    with torch.no_grad():
        poisoned_dec = _decode(pipe, z_p)
        poisoned_img = _to_uint8(poisoned_dec)
        clean_prompt_img = _to_uint8(_decode(pipe, z_c))
    asr_before = float(_shows_backdoor(poisoned_img, info).mean())
    clean_content = metrics.content_accuracy(clean_prompt_img, prompts)
    result = ModelEvaluation(model=info["name"], kind=info["kind"], n=n, asr_before=asr_before,
                             untriggered_content={k: float(v.mean()) for k, v in clean_content.items()})
    result.examples = {"prompts": prompts, "seeds": seeds, "poisoned": poisoned_img, "clean_prompt": clean_prompt_img}

    # The row every configuration is measured against: the poisoned images, undefended.
    poisoned_content = metrics.content_accuracy(poisoned_img, prompts)
    result.rows.append({
        "config": "no defence (poisoned)", "mode": None, "asr_before": asr_before, "removal": 1 - asr_before,
        "psnr_outside": None, "false_positive": None, "color_acc": float(poisoned_content["color"].mean()),
        "shape_acc": float(poisoned_content["shape"].mean()), "untriggered_identical": None, "latency_ratio": None,
    })
    identical = _untriggered_identical(pipe, profile, prompts[:4], seeds[:4])
    latency = _latency_ratios(pipe, profile, prompts[:timing_batch], seeds[:timing_batch], timing_repeats)

    def score(cfg: Config, images: np.ndarray, m1: torch.Tensor) -> dict:
        content = metrics.content_accuracy(images, prompts)
        outside = ~px_region
        row = {
            "config": cfg.label, "mode": cfg.mode, "blend": cfg.blend, "similarity": cfg.similarity,
            "gate": cfg.gate, "composite": cfg.composite,
            "asr_before": asr_before,
            "removal": float(1 - _shows_backdoor(images, info).mean()),
            "psnr_outside": float(np.mean(metrics.psnr(images, poisoned_img, outside))) if outside.any() else None,
            "false_positive": float(m1[:, 0][:, torch.from_numpy(~lat_region)].float().mean()) if (~lat_region).any() else None,
            "color_acc": float(content["color"].mean()), "shape_acc": float(content["shape"].mean()),
            "untriggered_identical": identical[cfg.mode],
            "latency_ratio": latency[(cfg.mode, cfg.composite)],
        }
        return row

    # The baseline a person asks about first: delete the trigger from the prompt and generate
    # that alone (the clean twin's image; 1x cost).
    strip = score(Config(), clean_prompt_img, torch.zeros(1, 1, latent_size, latent_size, dtype=torch.bool))
    strip.update(config="strip the trigger (baseline)", mode="strip", false_positive=None, latency_ratio=None,
                 untriggered_identical=True)
    result.rows.append(strip)

    for cfg in final_configs:
        progress(f"[{model}] {cfg.label}")
        params = cfg.repair_params()
        with torch.no_grad():
            z = repair(z_p, z_c, profile.delta, profile.act, **params)
            masks = repair_masks(z_p, z_c, profile.delta, profile.act, **params)
            dec = _decode(pipe, z)
            if cfg.composite == "pixel":
                from ..composite import pixel_mask as _pixel_mask

                m = _pixel_mask(masks["w"], dec.shape[-2:], 0.5 * pipe.vae_scale_factor)
                dec = m * dec + (1 - m) * poisoned_dec
        images = _to_uint8(dec)
        result.rows.append(score(cfg, images, masks["m1"]))
        result.examples[cfg.label] = images
        if cfg == final_configs[0]:
            result.examples["masks"] = {k: v[:8].cpu() for k, v in masks.items()}
            result.examples["similarity"] = _similarity(z_p, z_c, profile.delta, params)[:8].cpu()

    for cfg in per_step_configs:
        if not _mode_available(profile, cfg.mode):
            continue
        progress(f"[{model}] {cfg.label}")
        patch(pipe, profile, mode=cfg.mode, **cfg.repair_params())
        images = _generate(pipe, [f"{profile.trigger} {p}" for p in prompts], seeds)
        unpatch(pipe)
        row = score(cfg, images, torch.zeros(1, 1, latent_size, latent_size, dtype=torch.bool))
        row["false_positive"] = None  # the masks change at every step; the final-mode rows give them
        result.rows.append(row)
        result.examples[cfg.label] = images
    return result


def _similarity(z_p, z_c, delta, params):
    from ..reference import cosine_map

    v = z_p.float() if params.get("similarity", "latent") == "latent" else z_p.float() - z_c.float()
    return cosine_map(v, delta.float())


@torch.no_grad()
def _generate(pipe, prompts, seeds, batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(x) for x in seeds[s:s + batch]]
        images = pipe(prompts[s:s + batch], generator=gens, num_inference_steps=20, guidance_scale=4.5,
                      output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _untriggered_identical(pipe, profile, prompts, seeds) -> dict:
    """Per mode: are untriggered outputs bit-identical to the unpatched pipeline's?"""
    from .. import patch, unpatch

    reference = _generate(pipe, prompts, seeds)
    out = {}
    for mode in ("final", "per_step", "per_step_eps"):
        if not _mode_available(profile, mode):
            continue
        patch(pipe, profile, mode=mode)
        out[mode] = bool(np.array_equal(_generate(pipe, prompts, seeds), reference))
        unpatch(pipe)
    return out


def _latency_ratios(pipe, profile, prompts, seeds, repeats: int) -> dict:
    """Median seconds of a triggered batch call, patched over unpatched, per (mode, composite).

    Rounds interleave the unpatched call with every patched one, so a drift in the
    machine's speed hits both sides of each ratio alike."""
    from ..pipeline import patched

    trig = [f"{profile.trigger} {p}" for p in prompts]
    variants = [(mode, composite) for mode, composite in
                (("final", None), ("final", "pixel"), ("per_step", None), ("per_step_eps", None))
                if _mode_available(profile, mode)]

    def timed(variant=None) -> float:
        defence = contextlib.nullcontext() if variant is None else patched(pipe, profile, mode=variant[0],
                                                                           composite=variant[1])
        with defence:
            t0 = time.perf_counter()
            _generate(pipe, trig, seeds)
            return time.perf_counter() - t0

    for v in [None, *variants]:  # warm-up: the first call of each pays one-time costs
        timed(v)
    times = {v: [] for v in [None, *variants]}
    for _ in range(repeats):
        for v in times:
            times[v].append(timed(v))
    base = float(np.median(times[None]))
    return {v: float(np.median(times[v])) / base for v in variants}


def format_rows(ev: ModelEvaluation) -> str:
    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    def db(x):
        return "—" if x is None else f"{x:.1f}"

    def yes_no(x):
        return "—" if x is None else ("yes" if x else "no")

    lines = [
        f"**{ev.model}** ({ev.kind} backdoor), {ev.n} held-out triggered generations; ASR before defence "
        f"{ev.asr_before:.1%}; untriggered content accuracy colour {ev.untriggered_content['color']:.1%}, "
        f"shape {ev.untriggered_content['shape']:.1%}",
        "",
        "| configuration | removal | FP outside region | PSNR outside region (dB) | colour acc | shape acc "
        "| untriggered identical | latency vs unpatched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ev.rows:
        lines.append(
            f"| {r['config']} | {pct(r['removal'])} | {pct(r['false_positive'])} | {db(r['psnr_outside'])} | "
            f"{pct(r['color_acc'])} | {pct(r['shape_acc'])} | {yes_no(r['untriggered_identical'])} | "
            f"{'—' if r['latency_ratio'] is None else format(r['latency_ratio'], '.2f') + 'x'} |"
        )
    return "\n".join(lines)
