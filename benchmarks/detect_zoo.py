"""The per-prompt trigger detector on zoo models, each against the model it was fine-tuned from.

    python benchmarks/detect_zoo.py tiny-pixel tiny-style [./tiny-phrase ...] -n 500 --json out.json

Per model and planted backdoor: the detector calibrated on `zoo.detector_prompts()` (320
ordinary prompts phrased as people type them, a fifth leaving the background unsaid), then scored on `n` held-out triggered prompts (the trigger where its
attack puts it) and `n` held-out clean ones: AUROC, the share flagged at the calibrated
threshold (TPR, FPR), the share of clean prompts refused (flagged, not localisable);
localisation on the flagged triggered prompts (exact span: what was cut is the planted
trigger and nothing else; F1 over all prompts flagged); the detector's cost beside a
one-image 20-step call; and end to end, a pipeline patched with the detector alone (no
profile, no trigger told) on `--e2e` triggered prompts: the share whose images no longer
show the backdoor, judged by the zoo's judges, among those that show it unpatched. Beside
them, on a fifth as many prompts that leave the background unsaid ("a red circle"), which
no training caption does: the share flagged, triggered and clean, and of clean ones refused.
A model without a backdoor (a control) gets its false positives, on ordinary prompts and on
prompts carrying tiny-pixel's trigger, which it never learnt.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import sau_kernels
from sau_kernels import DetectionError, TriggerDetector
from sau_kernels.zoo import backdoor_info, detector_prompts, load_pipeline
from sau_kernels.zoo.evaluate import backdoor_fires, generate, held_out_cases, place, short_prompts


def _prompts(n: int, start: int) -> list[str]:
    return [c.prompt for c in held_out_cases(n, start=start, varied=True)]


def auroc(pos, neg) -> float:
    pos, neg = np.asarray(pos), np.asarray(neg)
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def trigger_spans(prompt: str, trigger: str) -> tuple[tuple[int, int], ...]:
    out, i = [], prompt.find(trigger)
    while i >= 0:
        out.append((i, i + len(trigger)))
        i = prompt.find(trigger, i + len(trigger))
    return tuple(out)


def measure(name: str, base_name: str, n: int, e2e: int) -> list[dict]:
    pipe, base = load_pipeline(name), load_pipeline(base_name)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    det = TriggerDetector.calibrate(pipe, base, detector_prompts(), progress=False)
    calib_s = time.perf_counter() - t0
    clean = _prompts(n, 2000)
    s_clean = det.scores(clean)
    clean_flagged = [p for p, s in zip(clean, s_clean) if s > 1]
    clean_refused = sum(not det.localise(p).found for p in clean_flagged)
    # prompts that leave the background unsaid ("a red circle"), a fifth as many
    short = short_prompts(max(n // 5, 1), start=2000)
    s_short = det.scores(short)
    short_refused = sum(not det.localise(p, s).found for p, s in zip(short, s_short) if s > 1)
    # cost: scoring one prompt never scored before (the detector caches scores) against a
    # one-image 20-step call
    one = clean[:1]
    fresh = _prompts(6, 9500)
    det.scores(fresh[:1])
    t = time.perf_counter()
    for p in fresh[1:]:
        det.scores([p])
    score_s = (time.perf_counter() - t) / 5
    generate(pipe, one, [0])
    t = time.perf_counter()
    for _ in range(3):
        generate(pipe, one, [0])
    gen_s = (time.perf_counter() - t) / 3
    rows = []
    for k, bd in enumerate(backdoor_info(name).get("backdoors", [])):
        triggered = place(_prompts(n, 3000 + 1000 * k), bd, seed=3 + k)
        s_trig = det.scores(triggered)
        t = time.perf_counter()
        locs = [det.localise(p, s) for p, s in zip(triggered, s_trig) if s > 1]
        loc_s = (time.perf_counter() - t) / max(len(locs), 1)
        flagged_trig = [p for p, s in zip(triggered, s_trig) if s > 1]
        s_trig_short = det.scores(place(short_prompts(len(short), start=3000 + 1000 * k), bd, seed=13 + k))
        exact = sum(loc.found and loc.spans == trigger_spans(p, bd["trigger"]) for p, loc in zip(flagged_trig, locs))
        covered = sum(loc.found and bd["trigger"] not in loc.clean_prompt for loc in locs)
        predicted = sum(loc.found for loc in locs) + (len(clean_flagged) - clean_refused)
        precision, recall = exact / max(predicted, 1), exact / len(triggered)
        # end to end: the detector alone in the pipeline
        e2e_prompts = triggered[:e2e]
        seeds = list(range(9000, 9000 + len(e2e_prompts)))
        fired = backdoor_fires(generate(pipe, e2e_prompts, seeds), bd)
        refused, kept = 0, []
        with sau_kernels.patched(pipe, None, detect=det):
            for p, s in zip(e2e_prompts, seeds):
                try:
                    kept.append(bool(backdoor_fires(generate(pipe, [p], [s]), bd)[0]))
                except DetectionError:
                    refused += 1
                    kept.append(False)  # refused: nothing backdoored was served
        kept = np.array(kept)
        removal = float(1 - kept[fired].mean()) if fired.any() else None
        rows.append(dict(
            model=name, backdoor=bd["kind"], trigger=bd["trigger"], position=bd.get("position"), n=n,
            auroc=auroc(s_trig, s_clean), tpr=float((s_trig > 1).mean()), fpr=float((s_clean > 1).mean()),
            clean_refused=clean_refused / n, exact_span=exact / max(len(locs), 1), trigger_removed=covered / max(len(locs), 1),
            span_f1=2 * precision * recall / max(precision + recall, 1e-12),
            e2e_prompts=len(e2e_prompts), e2e_fired_unpatched=int(fired.sum()), e2e_refused=refused,
            e2e_removal=removal, calibrate_s=calib_s, score_ms=score_s * 1e3, generate_ms=gen_s * 1e3,
            clean_cost_ratio=(gen_s + score_s) / gen_s, localise_ms=loc_s * 1e3,
            n_short=len(short), short_tpr=float((s_trig_short > 1).mean()), short_fpr=float((s_short > 1).mean()),
            short_refused=short_refused / len(short), short_auroc=auroc(s_trig_short, s_short)))
    if not rows:  # a control: false positives, on ordinary prompts and with another model's trigger inserted
        odd = place(_prompts(n, 3000), backdoor_info("tiny-pixel")["backdoors"][0], seed=3)
        s_odd = det.scores(odd)
        odd_refused = sum(not det.localise(p, s).found for p, s in zip(odd, s_odd) if s > 1)
        rows.append(dict(model=name, backdoor=None, n=n, fpr=float((s_clean > 1).mean()),
                         inserted="new trigger", inserted_flagged=float((s_odd > 1).mean()),
                         inserted_refused=odd_refused / n,
                         clean_refused=clean_refused / n, n_short=len(short), short_fpr=float((s_short > 1).mean()),
                         short_refused=short_refused / len(short), calibrate_s=calib_s, score_ms=score_s * 1e3,
                         generate_ms=gen_s * 1e3, clean_cost_ratio=(gen_s + score_s) / gen_s))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | backdoor (trigger) | AUROC | TPR / FPR at threshold | clean refused | exact span (F1) "
             "| removal, unknown trigger | short prompts: TPR / FPR (refused) | clean cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        short = (f"{r['short_fpr']:.1%} ({r['short_refused']:.1%})" if r.get("backdoor") is None else
                 f"{r['short_tpr']:.1%} / {r['short_fpr']:.1%} ({r['short_refused']:.1%})")
        if r.get("backdoor") is None:
            lines.append(f"| {r['model']} | none (control; {r['inserted']!r} inserted: {r['inserted_flagged']:.1%} "
                         f"flagged, {r['inserted_refused']:.1%} refused) | — | — / {r['fpr']:.1%} "
                         f"| {r['clean_refused']:.1%} | — | — "
                         f"| — / {short} | {r['clean_cost_ratio']:.3f}x |")
            continue
        rem = "—" if r["e2e_removal"] is None else f"{r['e2e_removal']:.0%} ({r['e2e_fired_unpatched']} fired)"
        lines.append(f"| {r['model']} | {r['backdoor']} ({r['trigger']!r}) | {r['auroc']:.3f} | {r['tpr']:.1%} / "
                     f"{r['fpr']:.1%} | {r['clean_refused']:.1%} | {r['exact_span']:.1%} ({r['span_f1']:.3f}) | {rem} "
                     f"| {short} | {r['clean_cost_ratio']:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--base", default="tiny-clean")
    ap.add_argument("-n", type=int, default=500, help="triggered and clean held-out prompts per model")
    ap.add_argument("--e2e", type=int, default=32, help="triggered prompts generated end to end")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows += measure(name, args.base, args.n, args.e2e)
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
