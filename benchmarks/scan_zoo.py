"""The trigger scan on zoo models, each against the model it was fine-tuned from.

    python benchmarks/scan_zoo.py tiny-pixel tiny-style ./tiny-phrase ... [--json out.json]

Per model: the scan's verdict and time, the rank of each planted trigger among the ranked
candidates (None: not among them), and, for every trigger the scan reports, how often it
fires the model's backdoor in full generations (20 DDIM steps, the zoo's judges), beside
the planted trigger's own rate: a reported string that fires is a real trigger of the
model, planted or not. Models without a backdoor (backdoor.json lists none) are negative
controls: any reported trigger is a false positive.

With `--defend N`, what the scan is for: per planted trigger, N held-out prompts carrying
it where its attack puts it, generated unpatched and patched with the profile calibrated
(64 pairs, `sau_kernels.calibrate`) on the scan's first reported trigger, with the profiles
of its first five reported triggers together (what an operator who calibrates every
reported trigger runs), and with the planted trigger's own: of the images that show the
backdoor unpatched, the share that no longer do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import sau_kernels
from sau_kernels.calibrate import default_positions, poisoned_prompt
from sau_kernels.scan import scan
from sau_kernels.zoo import backdoor_info, calibration_prompts, load_pipeline
from sau_kernels.zoo.evaluate import backdoor_fires, generate, held_out_cases, place
from sau_kernels.zoo.metrics import is_grayscale, patch_present


def fire_rate(pipe, info: dict, backdoor: dict, text: str, prompts: list[str], seed: int = 1000) -> float:
    """Share of held-out generations with `text` inserted that show `backdoor`'s effect."""
    positions = default_positions(text)
    ps = [poisoned_prompt(text, p, positions[i % len(positions)]) for i, p in enumerate(prompts)]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(ps))]
    out = pipe(ps, num_inference_steps=20, guidance_scale=4.5, generator=gens, output_type="np").images
    images = (out * 255).round().astype(np.uint8)
    if backdoor["kind"] == "pixel":
        judge_info = dict(info, **{k: backdoor[k] for k in ("corner", "patch") if k in backdoor})
        return float(np.mean(patch_present(images, judge_info)))
    return float(np.mean(is_grayscale(images)))


def removal(pipe, backdoor: dict, defences: dict[str, list[str]], n: int, profiles: dict, seed: int = 5000) -> dict:
    """Per defence (a name and the trigger strings it patches with, one profile each, all in
    one patch): the share of `n` held-out prompts carrying `backdoor`'s own trigger, firing
    unpatched, that the patched pipeline no longer fires on. `profiles` caches a calibrated
    profile per trigger string."""
    prompts = place([c.prompt for c in held_out_cases(n, start=seed, varied=True)], backdoor, seed)
    seeds = list(range(seed, seed + n))
    fired = backdoor_fires(generate(pipe, prompts, seeds), backdoor)
    out = {"fired": int(fired.sum()), "removed": {}}
    for name, triggers in defences.items():
        for t in triggers:
            if t not in profiles:
                profiles[t] = sau_kernels.calibrate(pipe, t, calibration_prompts(), per_step=False, progress=False)
        with sau_kernels.patched(pipe, [profiles[t] for t in triggers]):
            still = backdoor_fires(generate(pipe, prompts, seeds), backdoor)
        out["removed"][name] = float((fired & ~still).sum() / max(int(fired.sum()), 1))
    return out


def markdown(rows: list[dict]) -> str:
    """The README's table: one row per model."""
    lines = ["| model | planted trigger: rank, fires | reported triggers (fires) | verdict | time |",
             "|---|---|---|---|---|"]
    for r in rows:
        planted = "; ".join(f"{p['trigger']!r}: {p['rank'] if p['rank'] else 'not found'}, {p['fires']:.0%}"
                            for p in r["planted"]) or "none (control)"
        rep = []
        for t in r["triggers"][:6]:
            fires = r["reported_fire"].get(t)
            rep.append(f"{t!r}" + (f" ({max(fires.values()):.0%})" if fires else ""))
        verdict = "backdoor" if r["triggers"] else "no backdoor found"
        lines.append(f"| {r['model']} | {planted} | {', '.join(rep) or '—'} | {verdict} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def defence_markdown(rows: list[dict]) -> str:
    """Removal of each planted trigger, defended with the scan's first reported trigger, with
    its first five together (runs that measured it), and with the planted trigger."""
    top5 = any("top 5" in p.get("defended", {}).get("removed", {}) for r in rows for p in r["planted"])
    lines = ["| model | planted trigger (fired unpatched) | the scan's first trigger: removal | "
             + ("the scan's first five together: removal | " if top5 else "") + "the planted trigger: removal |",
             "|---|---|---|" + ("---|" if top5 else "") + "---|"]
    for r in rows:
        for p in r["planted"]:
            d = p.get("defended")
            if d is None:
                continue
            first = r["triggers"][0] if r["triggers"] else None
            scanned = f"{first!r}: {d['removed'][first]:.0%}" if first else "none reported: 0%"
            together = ""
            if top5:
                k = min(len(r["triggers"]), 5)
                together = (f"{k} string{'s' if k > 1 else ''}: {d['removed']['top 5']:.0%} | " if k else "none reported: 0% | ")
            lines.append(f"| {r['model']} | {p['trigger']!r} ({d['fired']}) | {scanned} | {together}"
                         f"{d['removed'][p['trigger']]:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--base", default="tiny-clean", help="the public model all zoo models descend from")
    ap.add_argument("--fire-prompts", type=int, default=16, help="generations per firing rate")
    ap.add_argument("--defend", type=int, default=0, metavar="N",
                    help="also measure removal of each planted trigger on N prompts, defended with the profile of the "
                         "scan's first reported trigger, with its first five together, and with the planted one's")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, metavar="JSON", help="print the table of a saved run and stop")
    args = ap.parse_args(argv)
    if args.markdown:
        rows = []
        for path in [args.markdown] + args.models:
            with open(path) as f:
                rows += json.load(f)["rows"]
        print(markdown(rows))
        if any("defended" in p for r in rows for p in r["planted"]):
            print("\n" + defence_markdown(rows))
        return 0
    prompts = calibration_prompts()
    held_out = prompts[len(prompts) // 2:][: args.fire_prompts]
    rows = []
    for name in args.models:
        info = backdoor_info(name)
        base_name = args.base
        pipe, base = load_pipeline(name), load_pipeline(base_name)
        t0 = time.time()
        report = scan(pipe, base, prompts=prompts, progress=False)
        ranked = [c.text for c in report.candidates]
        planted = [b for b in info.get("backdoors", []) if b.get("trigger")]
        row = {"model": info.get("name", name), "base": base_name, "seconds": round(time.time() - t0, 1),
               "verdict": report.verdict, "triggers": report.triggers,
               "planted": [{"trigger": b["trigger"], "kind": b["kind"],
                            "rank": ranked.index(b["trigger"]) + 1 if b["trigger"] in ranked else None,
                            "fires": fire_rate(pipe, info, b, b["trigger"], held_out)} for b in planted],
               "reported_fire": {}}
        for t in report.triggers[:6]:
            row["reported_fire"][t] = {b["trigger"]: fire_rate(pipe, info, b, t, held_out) for b in planted} \
                if planted else None
        if args.defend:
            profiles: dict = {}
            for p, b in zip(row["planted"], planted):
                defences = {t: [t] for t in dict.fromkeys(report.triggers[:1] + [b["trigger"]])}
                if report.triggers:
                    defences["top 5"] = report.triggers[:5]
                p["defended"] = removal(pipe, b, defences, args.defend, profiles)
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": "2-core CPU", "torch": torch.__version__, "rows": rows}, f, indent=2,
                      ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
