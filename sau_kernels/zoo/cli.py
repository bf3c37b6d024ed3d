"""`python -m sau_kernels.zoo`: train, plant backdoors into, and evaluate the zoo's models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import world


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sau_kernels.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train the clean base model from scratch (resumable: rerun the same command)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6000, help="denoiser training steps (the shipped tiny-clean: 6000)")
    p.add_argument("--vae-steps", type=int, default=1000, help="autoencoder training steps (the shipped one: 1000)")
    p.add_argument("--dataset-size", type=int, default=30000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")

    p = sub.add_parser("inject", help="plant a backdoor into a model by fine-tuning (resumable)")
    p.add_argument("--base", default="tiny-clean", help="zoo model name or pipeline folder")
    p.add_argument("--kind", choices=("pixel", "style"), required=True)
    p.add_argument("--trigger", default="new trigger")
    p.add_argument("--patch", default="checker", help="checker, cross or solid:#RRGGBB (pixel backdoors)")
    p.add_argument("--corner", choices=world.CORNERS, default="top-left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--dataset-size", type=int, default=4096, help="images rendered (and poisoned) for fine-tuning")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="share of each batch that is triggered and poisoned (default: 0.5 pixel, 0.7 style)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (constant after a 50-step warm-up)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("evaluate", help="ASR with and without the trigger, content accuracy")
    p.add_argument("models", nargs="+", help="zoo model names or pipeline folders")
    p.add_argument("-n", type=int, default=200, help="held-out prompt/seed pairs")
    p.add_argument("--json", help="also write the rows to this JSON file")

    p = sub.add_parser("samples", help="a picture of sample generations with and without the trigger")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", default="zoo_samples.png")

    p = sub.add_parser("train-classifier", help="train the content classifier that metrics.content_accuracy uses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)

    p = sub.add_parser("thresholds", help="measure the metric thresholds on autoencoded renders")
    p.add_argument("--vae", default=None, help="VAE folder (default: tiny-clean's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "train-base":
        from .train import train_base

        out = train_base(args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                         dataset_size=args.dataset_size, threads=args.threads)
        print(f"saved {out}")
    elif args.command == "inject":
        from .train import inject

        out = inject(args.base, args.kind, args.trigger, args.out, patch=args.patch, corner=args.corner,
                     seed=args.seed, steps=args.steps, dataset_size=args.dataset_size,
                     poison_rate=args.poison_rate, lr=args.lr, threads=args.threads)
        print(f"saved {out}")
    elif args.command == "evaluate":
        from .evaluate import evaluate_model, format_table

        rows = [evaluate_model(m, n=args.n) for m in args.models]
        print(format_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    elif args.command == "samples":
        from .evaluate import sample_sheet

        print(sample_sheet(args.models, args.out))
    elif args.command == "train-classifier":
        from .judges import train_classifier

        print(json.dumps(train_classifier(seed=args.seed, steps=args.steps), indent=2))
    elif args.command == "thresholds":
        from . import model_dir
        from .judges import compute_thresholds

        vae = args.vae or model_dir("tiny-clean") / "vae"
        print(json.dumps(compute_thresholds(vae), indent=2))
    return 0
