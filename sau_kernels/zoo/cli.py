"""`python -m sau_kernels.zoo`: train, plant backdoors into, and evaluate the zoo's models."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sau_kernels.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train the clean base model from scratch (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6000, help="denoiser training steps")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--dataset-size", type=int, default=30000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")

    args = parser.parse_args(argv)
    if args.command == "train-base":
        from .train import train_base

        out = train_base(args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                         dataset_size=args.dataset_size, threads=args.threads)
        print(f"saved {out}")
    return 0
