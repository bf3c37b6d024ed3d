"""The defence on every supported pipeline class and scheduler, on held-out zoo prompts.

    python benchmarks/engine_efficacy.py                 # the whole matrix, 100 pairs each
    python benchmarks/engine_efficacy.py --n 16 --only tiny-pixel/txt2img/ddim

For each configuration (model, pipeline class built from the model's components, scheduler,
one generator or a list) and each held-out prompt (varied phrasing, the trigger prepended,
appended or inside in turn, a seed no training or calibration used): the poisoned image
(unpatched), the strip baseline (the prompt with the trigger cut out, which is also the
twin), and the defended image (patched, the defaults). Reported: how often the backdoor
fires undefended; removal (defended images without the backdoor, among those where it
fired); fidelity (PSNR against the poisoned image outside the backdoor's region, by trigger
position); content accuracy (the zoo's classifier against the prompt); rows per image.
Writes benchmarks/results/engine_efficacy.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sau_kernels
from sau_kernels.calibrate import poisoned_prompt
from sau_kernels.pipeline import call_unpatched

RESULTS = Path(__file__).parent / "results"
POSITIONS = ("prepend", "append", "inside")
MATRIX = [  # (model, pipeline kind, scheduler, generator)
    *[("tiny-pixel", "txt2img", s, g) for s, g in (
        ("ddim", "list"), ("pndm", "list"), ("euler", "list"), ("euler-ancestral", "one"), ("dpm++2m", "list"),
        ("dpm++2m-sde", "one"), ("heun", "list"), ("lcm", "list"))],
    ("tiny-pixel", "img2img", "ddim", "list"),
    ("tiny-pixel", "inpaint", "ddim", "list"),
    ("tiny-style", "txt2img", "ddim", "list"),
]


def build(model: str, kind: str, scheduler: str):
    import diffusers

    from sau_kernels.zoo import load_pipeline

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_pipelines import SCHEDULERS

    pipe = load_pipeline(model)
    if kind != "txt2img":
        cls = {"img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
        pipe = cls.from_pipe(pipe)
    name, extra = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_config(model, kind, scheduler, generator, n, batch, steps):
    from sau_kernels.zoo import metrics, zoo_profile
    from sau_kernels.zoo.evaluation import trigger_region
    from sau_kernels.zoo import backdoor_info
    from sau_kernels.zoo.evaluate import held_out_cases

    info = backdoor_info(model)
    profile = zoo_profile(model, calibrate_if_missing=False)
    pipe = build(model, kind, scheduler)
    positions = [q for q in POSITIONS if q in profile.params.get("positions_kept", POSITIONS)]
    cases = held_out_cases(n, start=5000, varied=True)
    guidance = 1.0 if scheduler == "lcm" else 4.5
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = {"poisoned": [], "strip": [], "defended": []}
    prompts, where, seconds = [], [], {"unpatched": 0.0, "defended": 0.0}
    for s in range(0, n, batch):
        chunk = cases[s:s + batch]
        clean = [c.prompt for c in chunk]
        trig = [poisoned_prompt(profile.trigger, c.prompt, positions[(s + i) % len(positions)])
                for i, c in enumerate(chunk)]
        seeds = [c.seed for c in chunk]

        def gen():
            if generator == "one":
                return torch.Generator().manual_seed(seeds[0])
            return [torch.Generator().manual_seed(x) for x in seeds]

        def poisoned_gen():
            """The draws of the defended call's poisoned rows: with one generator, a triggered
            call draws from per-row generators seeded from it (docs/engine.md), so the
            undefended image to compare with is the one from those draws."""
            if generator == "one":
                from sau_kernels.planner import _row_generators

                return _row_generators(torch.Generator().manual_seed(seeds[0]), len(chunk), "cpu")
            return gen()

        kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        if kind != "txt2img":  # the init image: the trigger-free prompt's own txt2img image
            from sau_kernels.zoo import load_pipeline

            base = load_pipeline(model)
            base.set_progress_bar_config(disable=True)
            init = base(clean, generator=[torch.Generator().manual_seed(x + 1) for x in seeds],
                        num_inference_steps=steps, output_type="pt").images
            kw["image"] = init
            kw["strength"] = 0.8
            if kind == "inpaint":
                mask = torch.zeros(len(chunk), 1, size, size)
                mask[..., : size // 2] = 1  # the left half, where the corner patch is drawn
                kw["mask_image"] = mask
        t0 = time.perf_counter()
        images["poisoned"].append(call_unpatched(pipe, trig, generator=poisoned_gen(), **kw).images)
        images["strip"].append(call_unpatched(pipe, [sau_kernels.screening.screen_prompts(
            sau_kernels.screening.TriggerMatcher(profile.trigger), [p])[0].clean_prompt for p in trig],
            generator=gen(), **kw).images)
        seconds["unpatched"] += time.perf_counter() - t0
        with sau_kernels.patched(pipe, profile):
            t0 = time.perf_counter()
            out = pipe(trig, generator=gen(), **kw)
            seconds["defended"] += time.perf_counter() - t0
        images["defended"].append(out.images)
        prompts += clean
        where += [positions[(s + i) % len(positions)] for i in range(len(chunk))]
    images = {k: np.concatenate(v) for k, v in images.items()}
    shows = {k: (metrics.patch_present(v, info) if info["kind"] == "pixel" else metrics.is_grayscale(v))
             for k, v in images.items()}
    fired = shows["poisoned"]
    px, _ = trigger_region(info, images["poisoned"].shape[1], profile.latent_shape[1])
    outside = ~px
    row = {"model": model, "pipeline": type(pipe).__name__, "scheduler": scheduler, "generator": generator,
           "pairs": n, "steps": steps, "guidance_scale": guidance, "fires_undefended": float(fired.mean())}
    for k in ("defended", "strip"):
        row[f"{k}_removal"] = float((~shows[k][fired]).mean()) if fired.any() else None
        acc = metrics.content_accuracy(images[k], prompts)
        row[f"{k}_content"] = float(np.mean(acc["color"] & acc["shape"] & acc["background"]))
        if outside.any():
            ps = metrics.psnr(images[k], images["poisoned"], outside)
            row[f"{k}_psnr_outside_by_position"] = {q: float(np.median(ps[[w == q for w in where]]))
                                                   for q in dict.fromkeys(where)}
    row["rows_per_image"] = {"defended": 2, "strip": 1}
    row["seconds_per_image"] = {"unpatched_two_calls": seconds["unpatched"] / n / 2,
                                "defended": seconds["defended"] / n}
    return row


def markdown(rows) -> str:
    lines = ["| model | pipeline | scheduler | gen | pairs | fires undefended | SAU removal | strip removal | "
             "SAU PSNR outside (prepend/append/inside) | strip PSNR outside | SAU content | strip content |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    def psnrs(d):
        return "/".join(f"{v:.1f}" for v in d.values()) + " dB" if d else "n/a (global)"

    for r in rows:
        lines.append(f"| {r['model']} | {r['pipeline'].replace('StableDiffusion', 'SD')} | {r['scheduler']} | "
                     f"{r['generator']} | {r['pairs']} | {pct(r['fires_undefended'])} | {pct(r['defended_removal'])} | "
                     f"{pct(r['strip_removal'])} | {psnrs(r.get('defended_psnr_outside_by_position'))} | "
                     f"{psnrs(r.get('strip_psnr_outside_by_position'))} | {pct(r['defended_content'])} | "
                     f"{pct(r['strip_content'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="held-out pairs per configuration")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="model/kind/scheduler, e.g. tiny-pixel/txt2img/ddim")
    ap.add_argument("--out", default=str(RESULTS / "engine_efficacy.json"))
    ap.add_argument("--update", action="store_true", help="replace only the measured configurations' rows in --out")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return
    torch.set_num_threads(int(__import__("os").environ.get("SAU_BENCH_THREADS", torch.get_num_threads())))
    matrix = [m for m in MATRIX if args.only is None or "/".join(m[:3]) in args.only]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    result = {"command": " ".join(["python", *sys.argv]), "machine": f"{cpu}, {__import__('os').cpu_count()} cores",
              "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    if args.update and Path(args.out).is_file():
        result["rows"] = json.loads(Path(args.out).read_text())["rows"]

    def key(r):
        return (r["model"], r["pipeline"], r["scheduler"], r["generator"])

    for cfg in matrix:
        t0 = time.time()
        row = run_config(*cfg, args.n, args.batch, args.steps)
        result["rows"] = [r for r in result["rows"] if key(r) != key(row)] + [row]
        print(f"{'/'.join(cfg)}: fires {row['fires_undefended']:.1%}, SAU removal {row['defended_removal']}, "
              f"strip {row['strip_removal']}, PSNR {row.get('defended_psnr_outside_by_position')} "
              f"({time.time() - t0:.0f} s)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["rows"]))


if __name__ == "__main__":
    main()
