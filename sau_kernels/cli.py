"""`sau-kernels` / `python -m sau_kernels`: the demo, the evaluation, and SAU for real checkpoints."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def unescape(text: str) -> str:
    """`\\uXXXX` escapes read as characters, so that a shell can pass BadT2I's "\\u200b"."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sau-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="SAU on the zoo's backdoored models: demo-out/report.md, grid.png, masks.png")
    p.add_argument("--out", default="demo-out")
    p.add_argument("-n", type=int, default=16, help="triggered generations per model")

    p = sub.add_parser("evaluate", help="the full defence table over the held-out sets")
    p.add_argument("--models", nargs="+", default=["tiny-pixel", "tiny-style"])
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--split", choices=("report", "selection"), default="report",
                   help="'selection' is the split patch()'s defaults were chosen on")
    p.add_argument("--modes", nargs="+", choices=("final", "per_step", "per_step_eps"),
                   default=["final", "per_step", "per_step_eps"], help="the configurations' modes to score")
    p.add_argument("--out", default=None, help="write the table (markdown) and rows (json) with this path stem")

    for name, helptext in (("calibrate", "calibrate a trigger profile on a local diffusers SD folder"),
                           ("generate", "generate with SAU from a local diffusers SD folder and a profile")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="a local diffusers Stable Diffusion folder (or a zoo name)")
        p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the profile's)")
        p.add_argument("--guidance-scale", type=float, default=None)
        if name == "calibrate":
            p.add_argument("--trigger", required=True, type=unescape,
                           help="the trigger text; \\uXXXX escapes are read as characters (e.g. '\\u200b')")
            p.add_argument("--prompts", help="text file, one prompt a line (default: the package's list)")
            p.add_argument("--pairs", type=int, default=64)
            p.add_argument("--no-per-step", action="store_true", help="skip the per-step statistics")
            p.add_argument("--per-step-eps", action="store_true",
                           help="also the noise-prediction statistics of mode per_step_eps (1.5x more sampling)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", required=True, help="profile file (.safetensors)")
        else:
            p.add_argument("--profile", required=True, action="append",
                           help="trigger profile (.safetensors); repeat for a model with several backdoors")
            p.add_argument("--output-check", choices=("flag", "raise", "off"), default="flag",
                           help="outputs that carry a trigger's signature: mark them in the report, refuse them, "
                                "or do not check")
            p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--mode", choices=("final", "per_step", "per_step_eps"), default="final")
            p.add_argument("--composite", choices=("pixel",), default=None)
            p.add_argument("--allow-mismatch", action="store_true")
            p.add_argument("--out", required=True, help="image path; several prompts write NAME-0.png, NAME-1.png, ...")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load(args):
    import torch

    from .zoo import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    return pipe


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from .zoo.demo import run_demo  # the zoo's, lazily: the CLI application layer only

        run_demo(args.out, n=args.n)
    elif args.command == "evaluate":
        from .zoo import zoo_profile  # the zoo's, lazily: the CLI application layer only
        from .zoo.evaluation import FINAL_CONFIGS, PER_STEP_CONFIGS, evaluate_defence, format_rows

        parts, rows = [], []
        for m in args.models:
            ev = evaluate_defence(m, zoo_profile(m), n=args.n, split=args.split,
                                  final_configs=FINAL_CONFIGS if "final" in args.modes else [],
                                  per_step_configs=[c for c in PER_STEP_CONFIGS if c.mode in args.modes])
            parts.append(format_rows(ev))
            rows.append({"model": ev.model, "n": ev.n, "split": args.split, "asr_before": ev.asr_before,
                         "untriggered_content": ev.untriggered_content, "rows": ev.rows})
        table = "\n\n".join(parts)
        print(table)
        if args.out:
            Path(args.out).with_suffix(".md").write_text(table + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    elif args.command == "calibrate":
        from .calibrate import calibrate

        pipe = _load(args)
        prompts = None
        if args.prompts:
            prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
        kw = {}
        if args.steps:
            kw["num_inference_steps"] = args.steps
        if args.guidance_scale:
            kw["guidance_scale"] = args.guidance_scale
        profile = calibrate(pipe, args.trigger, prompts, num_pairs=args.pairs, per_step=not args.no_per_step,
                            per_step_eps=args.per_step_eps, seed=args.seed, **kw)
        profile.save(args.out)
        print(f"saved {profile} to {args.out}")
    elif args.command == "generate":
        import torch

        from . import patch
        from .profile import TriggerProfile

        pipe = _load(args)
        profiles = [TriggerProfile.load(p) for p in args.profile]
        profile = profiles[0]
        patch(pipe, profiles, mode=args.mode, composite=args.composite, allow_mismatch=args.allow_mismatch,
              output_check=args.output_check)
        gen = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(len(args.prompt))]
        images = pipe(args.prompt, generator=gen, num_inference_steps=args.steps or profile.num_inference_steps,
                      guidance_scale=args.guidance_scale or profile.guidance_scale).images
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
        for im, path in zip(images, paths):
            im.save(path)
        print(pipe.sau_report, file=sys.stderr)
        print("\n".join(str(p) for p in paths))
    return 0
