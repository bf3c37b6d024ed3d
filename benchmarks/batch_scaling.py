"""Does the unpatched pipeline itself scale linearly in the batch on this machine?

A triggered call of batch B runs the UNet on 2B prompts' rows, so if an unpatched call of
2B prompts already costs more than twice one of B, the defence's ratio at B cannot be 2x.

    python benchmarks/batch_scaling.py --batch 16 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sau_kernels.zoo import load_pipeline

PROMPT = "a red circle on a black background"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = ap.parse_args(argv)
    pipe = load_pipeline("tiny-pixel")
    pipe.set_progress_bar_config(disable=True)

    def call(n):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        t0 = time.perf_counter()
        pipe([PROMPT] * n, generator=gens, num_inference_steps=20, guidance_scale=4.5, output_type="np")
        return time.perf_counter() - t0

    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in (1, args.batch, 2 * args.batch):
            call(n)  # warm-up
        ratios, single, double = [], [], []
        for _ in range(args.rounds):
            a, b = call(args.batch), call(2 * args.batch)
            single.append(a)
            double.append(b)
            ratios.append(b / a)
        one = statistics.median(call(1) for _ in range(args.rounds))
        print(f"threads {threads}: one image {one * 1e3:.0f} ms; batch {args.batch} "
              f"{statistics.median(single) * 1e3:.0f} ms, batch {2 * args.batch} {statistics.median(double) * 1e3:.0f} ms; "
              f"time ratio {statistics.median(ratios):.3f} (median of {args.rounds} paired rounds)")


if __name__ == "__main__":
    main()
