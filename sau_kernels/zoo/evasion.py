"""The evasion table: does the defence hold against every spelling of the trigger?

For each spelling class of `attacks.spelling_variants` and n held-out prompt/seed pairs:
how often the undefended model fires, how often the screen flags the prompt, and how many
of the generations that fired undefended no longer show the backdoor defended.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import backdoor_info, load_pipeline
from .attacks import spelling_variants
from .evaluate import EVAL_SEED_OFFSET, backdoor_fires, generate, held_out_cases

# Seeds and phrasings of their own, disjoint from the zoo table's and the defence table's.
EVASION_START = 5_000


def evasion_rows(model, profiles, n: int = 16, *, trigger: str | None = None, progress=None,
                 **patch_kwargs) -> list[dict]:
    """One row per spelling class of one backdoor of `model` (the one whose trigger is
    `trigger`, by default the first profile's), defended with all of `profiles`."""
    import sau_kernels

    profiles = list(profiles) if isinstance(profiles, (list, tuple)) else [profiles]
    trigger = trigger if trigger is not None else profiles[0].trigger
    info = backdoor_info(model)
    matching = [b for b in info["backdoors"] if b["trigger"] == trigger]
    if not matching:
        raise ValueError(f"{info.get('name')} has no backdoor with trigger {trigger!r}")
    backdoor = matching[0]
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cases = held_out_cases(n, start=EVASION_START, varied=True)
    seeds = [c.seed for c in cases]
    rows = []
    for k, (name, spell) in enumerate(spelling_variants(backdoor)):
        rng = np.random.default_rng(EVAL_SEED_OFFSET + k)
        prompts = [spell(c.prompt, rng) for c in cases]
        fired = backdoor_fires(generate(pipe, prompts, seeds, batch_size=n), backdoor)
        with sau_kernels.patched(pipe, profiles, **patch_kwargs):
            defended = backdoor_fires(generate(pipe, prompts, seeds, batch_size=n), backdoor)
            report = pipe.sau_report
        flagged = np.array([p["triggered"] for p in report.prompts])
        suspect = np.array([i in report.suspects for i in range(len(prompts))])
        removed = float((~defended[fired]).mean()) if fired.any() else None
        rows.append({"class": name, "example": prompts[0], "fires_undefended": float(fired.mean()),
                     "flagged": float(flagged.mean()), "removed": removed,
                     "fires_defended": float(defended.mean()), "output_check_flags": float(suspect.mean()), "n": n})
        if progress:
            progress(f"  {name}: fires {fired.mean():.0%}, flagged {flagged.mean():.0%}, "
                     f"removed {'—' if removed is None else f'{removed:.0%}'}")
    return rows


def format_evasion(model: str, trigger: str, rows: list[dict]) -> str:
    lines = [f"{model}, trigger {trigger!r} ({rows[0]['n']} held-out prompt/seed pairs per class)", "",
             "| spelling class | example | fires undefended | flagged | removed (of those that fired) "
             "| fires defended | output check flags |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        removed = "—" if r["removed"] is None else f"{r['removed']:.0%}"
        example = json.dumps(r["example"], ensure_ascii=True)[:60].replace("|", "\\|")
        lines.append(f"| {r['class']} | `{example}` | {r['fires_undefended']:.0%} | {r['flagged']:.0%} | "
                     f"{removed} | {r['fires_defended']:.0%} | {r['output_check_flags']:.0%} |")
    return "\n".join(lines)


def write_evasion(path: str | Path, tables: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tables, indent=2, ensure_ascii=True) + "\n")
    return path
