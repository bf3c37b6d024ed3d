"""The demo (`python -m sau_kernels demo`): SAU defending the zoo's backdoored pipelines, with a report and pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..pipeline import DEFAULT_REPAIR
from . import load_pipeline, zoo_profile
from .evaluation import Config, ModelEvaluation, evaluate_defence, format_rows

DEFAULT_CONFIG_FINAL = Config(**DEFAULT_REPAIR)
DEFAULT_CONFIG_PER_STEP = Config(mode="per_step", **DEFAULT_REPAIR)


def _label(img: Image.Image, text: str) -> Image.Image:
    canvas = Image.new("RGB", (img.width, img.height + 14), "white")
    canvas.paste(img, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return canvas


def _tile(rows: list[list[np.ndarray]], col_titles: list[str], row_titles: list[str], scale: int = 2) -> Image.Image:
    cell = rows[0][0].shape[0] * scale
    pad, left, top = 4, 220, 16
    W = left + len(col_titles) * (cell + pad)
    H = top + len(rows) * (cell + pad)
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    for j, t in enumerate(col_titles):
        draw.text((left + j * (cell + pad), 2), t, fill="black")
    for i, (row, title) in enumerate(zip(rows, row_titles)):
        y = top + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), title[:36], fill="black")
        for j, im in enumerate(row):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (left + j * (cell + pad), y))
    return sheet


def _heat(x: torch.Tensor, size: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """A (H, W) map as a blue-white-red picture."""
    v = ((x.float().clamp(lo, hi) - lo) / (hi - lo)).numpy()
    rgb = np.stack([np.clip(2 * v, 0, 1), 1 - np.abs(2 * v - 1), np.clip(2 - 2 * v, 0, 1)], axis=-1)
    img = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(img)


def run_demo(out: str | Path = "demo-out", n: int = 16, rows_per_model: int = 4, evasion_pairs: int = 6,
             progress=print) -> Path:
    from .evaluation import FINAL_CONFIGS, PER_STEP_CONFIGS
    from .evasion import evasion_rows, format_evasion

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    clean_pipe = load_pipeline("tiny-clean")
    clean_pipe.set_progress_bar_config(disable=True)
    evaluations: list[ModelEvaluation] = []
    evasions = []
    grid_rows, grid_titles, mask_rows, mask_titles = [], [], [], []
    for model in ("tiny-pixel", "tiny-style"):
        profile = zoo_profile(model)
        finals = list(dict.fromkeys(FINAL_CONFIGS + [DEFAULT_CONFIG_FINAL]))
        per_steps = list(dict.fromkeys(PER_STEP_CONFIGS + [DEFAULT_CONFIG_PER_STEP]))
        ev = evaluate_defence(model, profile, n=n, final_configs=finals, per_step_configs=per_steps,
                              timing_batch=4, timing_repeats=2, progress=progress)
        evaluations.append(ev)
        progress(f"{model}: every spelling class of {profile.trigger!r}, {evasion_pairs} pairs each")
        evasions.append(format_evasion(model, profile.trigger, evasion_rows(model, profile, n=evasion_pairs)))
        ex = ev.examples
        from .evaluation import _generate

        k = rows_per_model
        # what an unpoisoned model draws for the same triggered prompt and seed
        clean_model = _generate(clean_pipe, [f"{profile.trigger} {p}" for p in ex["prompts"][:k]], ex["seeds"][:k])
        for i in range(k):
            grid_rows.append([clean_model[i], ex["poisoned"][i], ex[DEFAULT_CONFIG_FINAL.label][i],
                              ex[DEFAULT_CONFIG_PER_STEP.label][i], ex["clean_prompt"][i]])
            grid_titles.append(f"{model}: {ex['prompts'][i].replace(' background', '')}")
            masks = ex["masks"]
            size = 64
            mask_rows.append([ex["poisoned"][i], _heat(ex["similarity"][i], size),
                              _heat(masks["m1"][i, 0], size, 0, 1), _heat(masks["m2"][i, 0], size, 0, 1)])
            mask_titles.append(f"{model}: {ex['prompts'][i].replace(' background', '')}")
    columns = ["clean model", "poisoned (trigger)", "SAU final", "SAU per-step", "trigger removed"]
    _tile(grid_rows, columns, grid_titles).save(out / "grid.png")
    _tile(mask_rows, ["poisoned", "similarity S (paper)", "primary mask M1", "secondary mask M2"],
          mask_titles).save(out / "masks.png")
    seconds = time.perf_counter() - t_start
    report = [
        "# SAU demo on the zoo's backdoored models",
        "",
        f"Held-out prompts and seeds (the 'report' split), {n} triggered generations per model, "
        f"20 DDIM steps, CFG 4.5; latency: a triggered batch of 4, patched over unpatched, median of 2 "
        f"interleaved rounds; `python -m sau_kernels demo` ran in {seconds:.0f} s. "
        f"Defaults of `patch()`: {DEFAULT_REPAIR}. FP = share of latent pixels outside the trigger region "
        "that the primary mask flags; PSNR against the poisoned image outside the trigger region "
        "(for the style backdoor the whole image is the region, so neither applies).",
        "",
    ]
    for ev in evaluations:
        report += [format_rows(ev), ""]
    report += ["## Spellings of the trigger", "",
               "Each class spells the trigger as an attacker would; fires = the undefended model shows the "
               "backdoor, flagged = the screen caught the prompt, removed = share of the generations that fired "
               "undefended and show no backdoor defended (the patch()'s defaults).", ""]
    for table in evasions:
        report += [table, ""]
    report += ["![grid](grid.png)", "", "![masks](masks.png)", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "report.json").write_text(json.dumps([{"model": e.model, "asr_before": e.asr_before, "rows": e.rows,
                                                  "untriggered_content": e.untriggered_content} for e in evaluations],
                                                indent=2, default=str))
    progress(f"wrote {out / 'report.md'}, {out / 'grid.png'}, {out / 'masks.png'} in {seconds:.0f} s")
    return out
