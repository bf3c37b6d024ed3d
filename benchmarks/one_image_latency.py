"""How long does one image take? Zoo models side by side, interleaved.

One call = one prompt, 20 DDIM steps, CFG 4.5 (the UNet runs at batch 2), VAE decode. The
models take turns within each round, so drift in a shared machine's speed hits them alike;
a row gives the median over rounds and the ratio to the first model, paired by round.
`--parts` also times one call of each component (median of 30).

    python benchmarks/one_image_latency.py tiny-pixel path/to/another/pipeline --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sau_kernels.zoo import load_pipeline

PROMPT = "a red circle on a white background"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="zoo model names or pipeline folders")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--parts", action="store_true", help="also time the text encoder, one UNet call and the VAE decode")
    args = ap.parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = {}
    for name in args.models:
        pipes[name] = load_pipeline(name)
        pipes[name].set_progress_bar_config(disable=True)

    def call(pipe, seed):
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        pipe(PROMPT, generator=gen, num_inference_steps=args.steps, guidance_scale=4.5, output_type="np")
        return time.perf_counter() - t0

    for pipe in pipes.values():
        call(pipe, 0)  # warm-up
    times = {name: [] for name in pipes}
    for r in range(args.rounds):
        for name, pipe in pipes.items():
            times[name].append(call(pipe, r))
    first = args.models[0]
    print(f"one image, {args.steps} steps, CFG 4.5, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| model | median s | fastest s | ratio to first (median of paired rounds) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(t / f for t, f in zip(ts, times[first]))
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {ratio:.2f} |")
    if args.parts:
        print("\n| model | text encoder ms | UNet call ms (batch 2) | VAE decode ms |")
        print("|---|---|---|---|")
        for name, pipe in pipes.items():
            print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in time_parts(pipe)) + " |")


@torch.no_grad()
def time_parts(pipe, rounds: int = 30) -> tuple[float, float, float]:
    """Median ms of the text encoder (2 prompts, as with CFG), one UNet call and the VAE decode."""
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]
    size = pipe.unet.config.sample_size
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size)
    t = torch.tensor(500)

    def median_ms(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    return (median_ms(lambda: pipe.text_encoder(ids)), median_ms(lambda: pipe.unet(latents, t, hidden)),
            median_ms(lambda: pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor)))


if __name__ == "__main__":
    main()
