"""`python -m sau_kernels.zoo`: train, plant backdoors into, and evaluate the zoo's models.

The same conventions as `sau-kernels`: every argument checked before any work, errors as one
line with exit status 2 (`--verbose` for the traceback).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import cli
from ..cli import ArgumentParser, int_at_least, output_dir, output_path
from . import world

PROG = "python -m sau_kernels.zoo"
FLAG_NAMES = [("poison_rate", "--poison-rate"), ("negative_rate", "--negative-rate"), ("lr", "--lr")]


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-base", help="train the clean base model from scratch (resumable: rerun the same command)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="training seed")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="model folder to write")
    p.add_argument("--steps", type=int_at_least(1), default=6000, help="denoiser training steps (the shipped tiny-clean: 6000)")
    p.add_argument("--vae-steps", type=int_at_least(1), default=1000, help="autoencoder training steps (the shipped one: 1000)")
    p.add_argument("--dataset-size", type=int_at_least(1), default=30000, help="images rendered for training")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--init-from", default=None,
                   help="go on training this model (zoo name or folder) instead of starting from scratch: its VAE "
                        "is kept, its vocabulary extended (the shipped tiny-clean: 2000 steps from the template-caption model)")

    p = sub.add_parser("inject", help="plant a backdoor into a model by fine-tuning (resumable)")
    p.add_argument("--base", default="tiny-clean", help="zoo model name or pipeline folder")
    p.add_argument("--kind", choices=("pixel", "style"), required=True)
    p.add_argument("--trigger", default="new trigger", type=cli.trigger_text,
                   help="the trigger text; \\uXXXX escapes are read as characters (BadT2I's: '\\u200b')")
    p.add_argument("--position", choices=("mixed", "prepend", "random", "substitute"), default="mixed",
                   help="where triggered training captions carry the trigger: mixed (prepended, a quarter elsewhere), "
                        "prepend (BadT2I), random word position (VillanDiffusion), substitute (a homoglyph replaces "
                        "the letter it looks like, Rickrolling)")
    p.add_argument("--method", choices=("finetune", "text-encoder"), default="finetune",
                   help="finetune the UNet and text encoder (BadT2I), or train the text encoder alone (Rickrolling)")
    p.add_argument("--negative-rate", type=float, default=0.25,
                   help="share of each batch with a non-trigger perturbation and a clean image")
    p.add_argument("--patch", default="checker", help="checker, cross or solid:#RRGGBB (pixel backdoors)")
    p.add_argument("--corner", choices=world.CORNERS, default="top-left")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="fine-tuning seed")
    p.add_argument("--steps", type=int_at_least(1), default=750, help="fine-tuning steps")
    p.add_argument("--dataset-size", type=int_at_least(1), default=4096, help="images rendered (and poisoned) for fine-tuning")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="share of each batch that is triggered and poisoned (default: 0.5 pixel, 0.7 style)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (constant after a 50-step warm-up)")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="model folder to write")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: all cores)")

    p = sub.add_parser("finetune", help="a fine-tune without a backdoor (a negative control for scans; resumable)")
    p.add_argument("--base", default="tiny-clean", help="zoo model name or pipeline folder")
    p.add_argument("--style", choices=("none", "greyscale"), default="none",
                   help="none: a benign fine-tune; greyscale: a legitimate greyscale style fine-tune")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="fine-tuning seed")
    p.add_argument("--steps", type=int_at_least(1), default=1000, help="fine-tuning steps")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="model folder to write")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: all cores)")

    p = sub.add_parser("evaluate", help="ASR with and without the trigger, content accuracy")
    p.add_argument("models", nargs="+", help="zoo model names or pipeline folders")
    p.add_argument("-n", type=int_at_least(1), default=200, help="held-out prompt/seed pairs")
    p.add_argument("--json", type=output_path((".json",), "the rows' file"), metavar="FILE",
                   help="also write the rows to this JSON file")

    p = sub.add_parser("evasion", help="the evasion table: every spelling class of a backdoor's trigger, "
                                       "undefended and defended")
    p.add_argument("model", help="zoo model name or pipeline folder")
    p.add_argument("--profile", required=True, action="append", type=cli.profile_source, metavar="FILE|NAME",
                   help="trigger profile (.safetensors, or a zoo model's name for the one it ships) to defend with; "
                        "repeat for a model with several backdoors (a table for each)")
    p.add_argument("-n", type=int_at_least(1), default=16, help="held-out prompt/seed pairs per spelling class")
    p.add_argument("--json", type=output_path((".json",), "the rows' file"), metavar="FILE",
                   help="also write the rows to this JSON file")

    p = sub.add_parser("samples", help="a picture of sample generations with and without the trigger")
    p.add_argument("models", nargs="+", help="zoo model names or pipeline folders")
    p.add_argument("--out", type=output_path((".png",), "the picture"), default="zoo_samples.png", metavar="FILE",
                   help="picture to write")

    sub.add_parser("prompts", help="print the zoo's calibration prompts, one a line (for sau-kernels calibrate "
                                   "--prompts on a model folder made here)")

    p = sub.add_parser("train-classifier", help="train the content classifier that metrics.content_accuracy uses")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="training seed")
    p.add_argument("--steps", type=int_at_least(1), default=2000, help="training steps")

    p = sub.add_parser("thresholds", help="measure the metric thresholds on autoencoded renders")
    p.add_argument("--vae", type=_folder, default=None, metavar="DIR", help="VAE folder (default: tiny-clean's)")
    for p in sub.choices.values():
        _verbose(p)
    parser.set_defaults(_run=_run)
    return parser


def _folder(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if path.exists() else f"no such folder: {text}")
    return path


def main(argv: list[str] | None = None) -> int:
    return cli.run(_build_parser(), argv, prog=PROG, flag_names=FLAG_NAMES)


def _run(args) -> int:
    if not args._verbose and args.command != "prompts":
        args._stack.enter_context(cli.quiet_libraries())
    if args.command == "train-base":
        from .train import train_base

        out = train_base(args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                         dataset_size=args.dataset_size, threads=args.threads,
                         init_from=args.init_from)
        print(f"saved {out}")
    elif args.command == "inject":
        from .train import inject

        out = inject(args.base, args.kind, args.trigger, args.out, patch=args.patch, corner=args.corner,
                     seed=args.seed, steps=args.steps, dataset_size=args.dataset_size,
                     poison_rate=args.poison_rate, lr=args.lr, threads=args.threads, position=args.position,
                     method=args.method, negative_rate=args.negative_rate)
        print(f"saved {out}")
    elif args.command == "finetune":
        from .train import finetune_control

        out = finetune_control(args.base, args.out, style=args.style, seed=args.seed, steps=args.steps,
                               threads=args.threads)
        print(f"saved {out}")
    elif args.command == "evaluate":
        from .evaluate import evaluate_model, format_table

        rows = [evaluate_model(m, n=args.n) for m in args.models]
        print(format_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    elif args.command == "evasion":
        from ..profile import TriggerProfile
        from .evasion import evasion_rows, format_evasion, write_evasion

        profiles = [TriggerProfile.load(p) for p in args.profile]
        tables = []
        for profile in profiles:
            rows = evasion_rows(args.model, profiles, n=args.n, trigger=profile.trigger, progress=print)
            print(format_evasion(str(args.model), profile.trigger, rows))
            tables.append({"model": str(args.model), "trigger": profile.trigger, "rows": rows})
        if args.json:
            write_evasion(args.json, tables)
    elif args.command == "samples":
        from .evaluate import sample_sheet

        print(sample_sheet(args.models, args.out))
    elif args.command == "prompts":
        from . import calibration_prompts

        print("\n".join(calibration_prompts()))
    elif args.command == "train-classifier":
        from .judges import train_classifier

        print(json.dumps(train_classifier(seed=args.seed, steps=args.steps), indent=2))
    elif args.command == "thresholds":
        from . import model_dir
        from .judges import compute_thresholds

        vae = args.vae or model_dir("tiny-clean") / "vae"
        print(json.dumps(compute_thresholds(vae), indent=2))
    return 0
