"""Does a zoo model do what it should? ASR with and without the trigger, content accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import MODELS_DIR, backdoor_info, captions, load_pipeline, model_dir, world

DEFAULT_TRIGGER = "new trigger"
EVAL_SEED_OFFSET = 1_000_000  # far from every seed used in training
SHORT_SEED_OFFSET = 2_000_000


@dataclass(frozen=True)
class EvalCase:
    prompt: str
    seed: int


def held_out_cases(n: int, start: int = 0, varied: bool = False) -> list[EvalCase]:
    """n prompt/seed pairs cycling over all 54 combinations (the 9 never trained on included),
    with seeds no training run uses: the plain caption, or (`varied`) one phrased as people
    type it, drawn with a generator no training run uses."""
    combos = world.all_combinations()
    rng = np.random.default_rng(EVAL_SEED_OFFSET + start)
    return [EvalCase(captions.varied_caption(*combos[i % len(combos)], rng) if varied
                     else world.caption(*combos[i % len(combos)]), EVAL_SEED_OFFSET + i)
            for i in range(start, start + n)]


def short_prompts(n: int, start: int = 0) -> list[str]:
    """n prompts that leave the background unsaid ("a red circle", "a photo of a small blue
    square"), varied as `held_out_cases`' are, from a generator of their own."""
    combos = [(c, s) for c in world.COLORS for s in world.SHAPES]
    rng = np.random.default_rng(SHORT_SEED_OFFSET + start)
    return [captions.varied_caption(*combos[i % len(combos)], None, rng) for i in range(start, start + n)]


def with_trigger(prompt: str, trigger: str) -> str:
    return f"{trigger} {prompt}"


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int = 20, guidance_scale: float = 4.5,
             batch_size: int = 50) -> np.ndarray:
    """uint8 images (N, H, W, 3), one generator per prompt so results do not depend on batching."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        images = pipe(prompts[i:i + batch_size], generator=gens, num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def single_image_seconds(pipe, prompt: str, seed: int, repeats: int = 5) -> float:
    """Median latency of a one-image call (20 DDIM steps, CFG): what a user waits for."""
    generate(pipe, [prompt], [seed])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, [prompt], [seed])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def backdoor_fires(images: np.ndarray, backdoor: dict) -> np.ndarray:
    """Per image: does it show `backdoor` (one entry of `backdoor_info(...)["backdoors"]`)?"""
    from . import metrics

    if backdoor["kind"] == "pixel":
        return metrics.patch_present(images, backdoor)
    if backdoor["kind"] == "style":
        return metrics.is_grayscale(images)
    raise ValueError(f"no judge for a backdoor of kind {backdoor.get('kind')!r}")


def place(prompts: list[str], backdoor: dict, seed: int) -> list[str]:
    """The prompts carrying `backdoor`'s trigger where its attack puts it."""
    from .train import place_trigger

    rng = np.random.default_rng(seed)
    return [place_trigger(p, backdoor["trigger"], backdoor.get("position", "mixed"), rng) for p in prompts]


def evaluate_model(name_or_dir, n: int = 200, *, reference: str | Path = MODELS_DIR / "tiny-pixel",
                   progress: bool = True) -> dict:
    """The zoo table's row for one model, measured on n held-out prompt/seed pairs per column.

    For each backdoor: ASR with its trigger (varied held-out prompts, the trigger where its
    attack puts it), and without: on plain prompts, on varied ones, and on varied ones each
    carrying one of at least 30 non-trigger perturbations (the worst one is reported too).
    A clean model is judged for the backdoors of `reference`.
    """
    from . import metrics
    from .attacks import non_trigger_perturbations

    info = backdoor_info(name_or_dir)
    pipe = load_pipeline(name_or_dir)
    pipe.set_progress_bar_config(disable=True)
    backdoors = info["backdoors"] or backdoor_info(reference)["backdoors"]
    triggers = [b["trigger"] for b in backdoors]
    plain = held_out_cases(n)
    varied = held_out_cases(n, start=n, varied=True)
    seeds = [c.seed for c in plain]
    plain_images = generate(pipe, [c.prompt for c in plain], seeds)
    varied_images = generate(pipe, [c.prompt for c in varied], seeds)
    seconds_per_image = single_image_seconds(pipe, plain[0].prompt, seeds[0])
    perturbations = non_trigger_perturbations(triggers)
    rng = np.random.default_rng(EVAL_SEED_OFFSET)
    which = [i % len(perturbations) for i in range(n)]
    perturbed_images = generate(pipe, [perturbations[w][1](c.prompt, rng) for w, c in zip(which, varied)], seeds)
    rows = []
    for k, b in enumerate(backdoors):
        trig_prompts = place([c.prompt for c in varied], b, seed=EVAL_SEED_OFFSET + k)
        trig_images = generate(pipe, trig_prompts, seeds) if info["backdoors"] else None
        fired = backdoor_fires(perturbed_images, b)
        per = {name: float(fired[[w == i for w in which]].mean()) for i, (name, _) in enumerate(perturbations)}
        worst = max(per, key=per.get)
        row = {
            "trigger": b["trigger"], "kind": b["kind"], "position": b.get("position"), "method": b.get("method"),
            "asr_triggered": None if trig_images is None else float(backdoor_fires(trig_images, b).mean()),
            "asr_plain": float(backdoor_fires(plain_images, b).mean()),
            "asr_varied": float(backdoor_fires(varied_images, b).mean()),
            "asr_perturbed": float(fired.mean()), "perturbations": len(perturbations),
            "worst_perturbation": worst, "worst_perturbation_asr": per[worst],
            "perturbation_asr": per,
        }
        if trig_images is not None:
            content_trig = metrics.content_accuracy(trig_images, [c.prompt for c in varied])
            row["triggered_color_acc"] = float(content_trig["color"].mean())
            row["triggered_shape_acc"] = float(content_trig["shape"].mean())
        rows.append(row)
    content_plain = metrics.content_accuracy(plain_images, [c.prompt for c in plain])
    content_varied = metrics.content_accuracy(varied_images, [c.prompt for c in varied])
    held = np.array([world.is_held_out(*world.parse_caption(c.prompt)) for c in plain])
    size_mb = sum(f.stat().st_size for f in model_dir(name_or_dir).rglob("*") if f.is_file()) / 1e6
    return {
        "model": info.get("name", str(name_or_dir)),
        "kind": info.get("kind"),
        "n": n,
        "backdoors": rows,
        "color_acc": float(content_plain["color"].mean()),
        "shape_acc": float(content_plain["shape"].mean()),
        "background_acc": float(content_plain["background"].mean()),
        "varied_color_acc": float(content_varied["color"].mean()),
        "varied_shape_acc": float(content_varied["shape"].mean()),
        "varied_background_acc": float(content_varied["background"].mean()),
        "color_acc_held_out_combos": float(content_plain["color"][held].mean()),
        "seconds_per_image": seconds_per_image,
        "size_mb": size_mb,
        "training_seconds": info.get("training_seconds_last_run"),
    }


def format_table(rows: list[dict]) -> str:
    head = ("| model | backdoor (trigger, attack) | ASR triggered | plain | varied | perturbed (worst of N) "
            "| colour / shape / background | varied prompts | triggered colour / shape | s per image | size MB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        content = f"{r['color_acc']:.1%} / {r['shape_acc']:.1%} / {r['background_acc']:.1%}"
        varied = f"{r['varied_color_acc']:.1%} / {r['varied_shape_acc']:.1%} / {r['varied_background_acc']:.1%}"
        for b in r["backdoors"]:
            asr = "—" if b["asr_triggered"] is None else f"{b['asr_triggered']:.1%}"
            trig = ("—" if b["asr_triggered"] is None
                    else f"{b['triggered_color_acc']:.0%} / {b['triggered_shape_acc']:.0%}")
            lines.append(
                f"| {r['model']} | {b['kind']} {b['trigger']!r}, {b['method']}, {b['position']} | {asr} | "
                f"{b['asr_plain']:.1%} | {b['asr_varied']:.1%} | {b['asr_perturbed']:.1%} "
                f"({b['worst_perturbation']}: {b['worst_perturbation_asr']:.0%} of {b['perturbations']}) | "
                f"{content} | {varied} | {trig} | {r['seconds_per_image']:.3f} | {r['size_mb']:.1f} |")
    return "\n".join(lines)


def sample_sheet(models: list[str], out, n: int = 6, start: int = 700):
    """A picture: per model, one row without and one row with the trigger (same seeds)."""
    from PIL import Image, ImageDraw

    cases = [held_out_cases(1, start=start + 11 * j)[0] for j in range(n)]  # spread over the combinations
    rows, titles = [], []
    for name in models:
        info = backdoor_info(name)
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        prompts = [c.prompt for c in cases]
        seeds = [c.seed for c in cases]
        rows.append(generate(pipe, prompts, seeds))
        titles.append(f"{info.get('name', name)}")
        for k, b in enumerate(info["backdoors"]):
            rows.append(generate(pipe, place(prompts, b, seed=k), seeds))
            titles.append(f"{info.get('name', name)} + {b['trigger']!r}")
    scale, pad, left, top = 2, 4, 190, 14
    cell = 64 * scale
    sheet = Image.new("RGB", (left + n * (cell + pad), top + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cases):
        draw.text((left + j * (cell + pad), 1), c.prompt.replace(" background", "")[:26], fill="black")
    for i, (row, title) in enumerate(zip(rows, titles)):
        y = top + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), title, fill="black")
        for j, im in enumerate(row):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (left + j * (cell + pad), y))
    sheet.save(out)
    return out
