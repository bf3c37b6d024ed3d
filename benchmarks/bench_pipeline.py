"""End-to-end cost of SAU: patched against unpatched pipelines, side by side in one run.

    python benchmarks/bench_pipeline.py                       # CPU: the zoo's tiny-pixel
    python benchmarks/bench_pipeline.py --sd15 --device cuda  # GPU: SD 1.5-sized, random weights, 512 px, fp16

Measures (each patched number beside the unpatched one, measured interleaved in the same
run): the latency of one call for untriggered and triggered prompts at several batch
sizes and every mode; the throughput of a request stream with 0/10/50/100% triggered
prompts; the share of a triggered call spent in the repair op and in screening. Writes
JSON (with the machine, versions and command) under benchmarks/results/ and a latency plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sau_kernels
from sau_kernels import patched
from sau_kernels.calibrate import poisoned_prompt

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("latency", "throughput", "shares", "overhead")
ZOO_PROMPTS = ["a red circle on a black background", "a blue square on a white background",
               "a yellow triangle on a gray background", "a purple circle on a white background"]
SD_PROMPTS = ["a photo of a cat sitting on a windowsill", "a mountain landscape at sunrise",
              "a bowl of fresh fruit on a wooden table", "a lighthouse on a rocky coast"]


def sd15_random_pipeline(device: str, dtype: torch.dtype):
    """SD 1.5's published architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder) with
    random weights: the cost of SAU does not depend on the weights. The tokenizer is the
    zoo's (any tokenizer gives the text encoder 77 ids)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sau_kernels.zoo import models, tokenizer

    torch.manual_seed(0)
    # Built on the target device: random init of 1B parameters on the host CPU takes longer
    # than the whole GPU benchmark.
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer.save_tokenizer_files(tok_dir)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    pipe = models.assemble_pipeline(tok, text, vae, unet)
    return pipe.to(device, dtype)


def synthetic_profile(pipe, trigger: str, steps: int) -> sau_kernels.TriggerProfile:
    """A profile of the right shapes with random statistics (costs are value-independent)."""
    from sau_kernels.profile import pipeline_fingerprint
    from sau_kernels.screening import trigger_token_ids

    C, S = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(C, S, S, generator=g)
    d_steps = torch.randn(steps, C, S, S, generator=g)
    act = sau_kernels.secondary_map(delta)
    a_steps = torch.stack([sau_kernels.secondary_map(d) for d in d_steps])
    return sau_kernels.TriggerProfile(
        delta=delta, act=act, delta_steps=d_steps, act_steps=a_steps, eps_delta_steps=d_steps, eps_act_steps=a_steps,
        trigger=trigger, trigger_ids=trigger_token_ids(pipe.tokenizer, trigger), fingerprint=pipeline_fingerprint(pipe),
        latent_shape=(C, S, S), scheduler=type(pipe.scheduler).__name__, num_inference_steps=steps, num_pairs=0,
        guidance_scale=4.5, params={"synthetic": True})


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_call(pipe, device, steps, guidance):
    def call(prompts, seed=0):
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        _sync(device)
        t0 = time.perf_counter()
        pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        _sync(device)
        return time.perf_counter() - t0
    return call


def bench_latency(pipe, profile, call, prompts, batches, modes, repeats, log):
    """Unpatched and patched calls alternate in rounds; each round gives one ratio, and a
    row reports the median of those paired ratios (drift in the machine's speed hits both
    calls of a round alike) beside the ratio of the fastest calls. Untriggered traffic
    takes the same code path in every mode, so it is measured once, with twice the rounds."""
    rows = []
    for b in batches:
        clean = [prompts[i % len(prompts)] for i in range(b)]
        trig = [poisoned_prompt(profile.trigger, p) for p in clean]
        for traffic, batch, traffic_modes, rounds in (("untriggered", clean, modes[:1], 2 * repeats),
                                                      ("triggered", trig, modes, repeats)):
            for mode in traffic_modes:
                call(batch)  # warm-up
                with patched(pipe, profile, mode=mode):
                    call(batch)
                base, defended = [], []
                for r in range(rounds):
                    base.append(call(batch, seed=r))
                    with patched(pipe, profile, mode=mode):
                        defended.append(call(batch, seed=r))
                row = {"batch": b, "traffic": traffic, "mode": mode if traffic == "triggered" else "any",
                       "rounds": rounds, "unpatched_s": statistics.median(base),
                       "patched_s": statistics.median(defended),
                       "ratio": statistics.median(d / u for d, u in zip(defended, base)),
                       "ratio_of_fastest": min(defended) / min(base)}
                rows.append(row)
                log(f"latency b={b:<3} {traffic:<11} {row['mode']:<12} unpatched {row['unpatched_s'] * 1e3:8.1f} ms  "
                    f"patched {row['patched_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.3f} "
                    f"(fastest {row['ratio_of_fastest']:.3f}, {rounds} rounds)")
    return rows


def bench_throughput(pipe, profile, call, prompts, shares, requests, batch, log):
    rows = []
    for share in shares:
        n_trig = round(share * requests)
        # spread the triggered requests evenly through the stream
        stream = [poisoned_prompt(profile.trigger, prompts[i % len(prompts)]) if (i * n_trig) // requests !=
                  ((i + 1) * n_trig) // requests else prompts[i % len(prompts)] for i in range(requests)]
        chunks = [stream[i:i + batch] for i in range(0, requests, batch)]
        base = defended = 0.0
        for i, c in enumerate(chunks):  # chunk by chunk, so drift hits both streams alike
            base += call(c, seed=i)
            with patched(pipe, profile):
                defended += call(c, seed=i)
        row = {"triggered_share": share, "requests": requests, "batch": batch,
               "unpatched_images_per_s": requests / base, "patched_images_per_s": requests / defended}
        row["ratio"] = row["patched_images_per_s"] / row["unpatched_images_per_s"]
        rows.append(row)
        log(f"throughput {share:>4.0%} triggered: unpatched {row['unpatched_images_per_s']:.2f} img/s, "
            f"patched {row['patched_images_per_s']:.2f} img/s ({row['ratio']:.3f})")
    return rows


def bench_overhead(pipe, profile, prompts, batches, modes, steps, repeats, log):
    """What the defence adds beyond its rows, side by side in paired rounds: a patched call
    of b untriggered prompts against the unpatched call of the same prompts, and a patched
    call of b triggered prompts against the unpatched call of the same rows (the b poisoned
    prompts and their b twins: the twins' UNet work and VAE decode), so that what remains is
    screening, planning, the repair and the report. Also the VAE decode of one twin."""
    from sau_kernels.pipeline import call_unpatched

    def timed(fn, *a, **kw):
        _sync(pipe.device)
        t0 = time.perf_counter()
        fn(*a, **kw)
        _sync(pipe.device)
        return time.perf_counter() - t0

    def args(seeds):
        return dict(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], num_inference_steps=steps,
                    guidance_scale=4.5, output_type="np")

    rows = []
    for mode in modes:
        sau_kernels.patch(pipe, profile, mode=mode)
        for b in batches:
            clean = [prompts[i % len(prompts)] for i in range(b)]
            trig = [poisoned_prompt(profile.trigger, p) for p in clean]
            twins = [s.clean_prompt for s in sau_kernels.screening.screen_prompts(
                pipe._sau_state.matchers, trig)]
            extra = twins if mode in ("final", "per_step") else []
            seeds = list(range(b))
            pairs = {"untriggered": (lambda: timed(pipe, clean, **args(seeds)),
                                     lambda: timed(call_unpatched, pipe, clean, **args(seeds))),
                     "triggered": (lambda: timed(pipe, trig, **args(seeds)),
                                   lambda: timed(call_unpatched, pipe, (trig if extra else twins) + extra,
                                                 **args(seeds + (seeds if extra else []))))}
            for traffic, (defended, same_rows) in pairs.items():
                defended(), same_rows()  # warm-up
                d, u = [], []
                for _ in range(repeats):
                    d.append(defended())
                    u.append(same_rows())
                row = {"mode": mode, "batch": b, "traffic": traffic, "rounds": repeats,
                       "patched_s": statistics.median(d), "same_rows_unpatched_s": statistics.median(u),
                       "overhead": statistics.median(x / y - 1 for x, y in zip(d, u))}
                rows.append(row)
                log(f"overhead {mode:<12} b={b:<3} {traffic:<11} patched {row['patched_s'] * 1e3:8.1f} ms, unpatched "
                    f"same rows {row['same_rows_unpatched_s'] * 1e3:8.1f} ms: overhead {row['overhead']:+.2%}")
    sau_kernels.unpatch(pipe)
    C, H, W = profile.latent_shape
    z = torch.randn(1, C, H, W, device=pipe.device, dtype=pipe.vae.dtype)
    decode = [timed(pipe.vae.decode, z) for _ in range(repeats + 1)][1:]
    rows.append({"mode": "any", "batch": 1, "traffic": "twin VAE decode", "decode_s": statistics.median(decode)})
    log(f"overhead: one twin's VAE decode {statistics.median(decode) * 1e3:.2f} ms")
    return rows


def bench_shares(pipe, profile, call, prompts, modes, batches, repeats, log):
    rows = []
    for mode in modes:
        for b in batches:
            batch = [poisoned_prompt(profile.trigger, prompts[i % len(prompts)]) for i in range(b)]
            totals, repair_ms, screen_ms = [], [], []
            with patched(pipe, profile, mode=mode):
                for r in range(repeats):
                    totals.append(call(batch, seed=r) * 1e3)
                    repair_ms.append(pipe.sau_report.repair_ms)
                    screen_ms.append(pipe.sau_report.screening_ms)
            total = statistics.median(totals)
            row = {"mode": mode, "batch": b, "call_ms": total, "repair_ms": statistics.median(repair_ms),
                   "screening_ms": statistics.median(screen_ms)}
            row["repair_share"] = row["repair_ms"] / total
            row["screening_share"] = row["screening_ms"] / total
            rows.append(row)
            log(f"share {mode:<12} b={b:<3} call {total:8.1f} ms, repair {row['repair_ms']:.3f} ms "
                f"({row['repair_share']:.3%}), screening {row['screening_ms']:.3f} ms ({row['screening_share']:.3%})")
    return rows


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for traffic, style in (("untriggered", "-"), ("triggered", "--")):
        sel = [r for r in rows if r["traffic"] == traffic and r["mode"] in ("final", "any")]
        bs = [r["batch"] for r in sel]
        ax.plot(bs, [r["unpatched_s"] * 1e3 for r in sel], "o" + style, color="gray", label=f"unpatched, {traffic}")
        for mode, color in (("any", "tab:blue"), ("final", "tab:blue"), ("per_step", "tab:orange"),
                            ("per_step_eps", "tab:green")):
            m = [r for r in rows if r["traffic"] == traffic and r["mode"] == mode]
            if m:
                ax.plot([r["batch"] for r in m], [r["patched_s"] * 1e3 for r in m], "s" + style, color=color,
                        label=f"SAU {'(every mode)' if mode == 'any' else mode}, {traffic}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (prompts per call)")
    ax.set_ylabel("latency of one call (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    """The tables of a run, for docs/benchmarks.md."""
    lines = ["| batch | traffic | mode | unpatched ms | patched ms | ratio (median of rounds) | ratio of fastest |",
             "|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        lines.append(f"| {r['batch']} | {r['traffic']} | {r['mode']} | {r['unpatched_s'] * 1e3:.0f} | "
                     f"{r['patched_s'] * 1e3:.0f} | {r['ratio']:.3f}x | {r['ratio_of_fastest']:.3f}x |")
    lines += ["", "| triggered share | unpatched img/s | patched img/s | patched / unpatched |", "|---|---|---|---|"]
    for r in result["throughput"] or []:
        lines.append(f"| {r['triggered_share']:.0%} | {r['unpatched_images_per_s']:.2f} | "
                     f"{r['patched_images_per_s']:.2f} | {r['ratio']:.3f} |")
    lines += ["", "| mode | batch | triggered call ms | repair op ms (share) | screening ms (share) |",
              "|---|---|---|---|---|"]
    for r in result["time_shares"] or []:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['call_ms']:.0f} | {r['repair_ms']:.3f} "
                     f"({r['repair_share']:.3%}) | {r['screening_ms']:.3f} ({r['screening_share']:.3%}) |")
    lines += ["", "| mode | batch | traffic | patched ms | unpatched, same rows ms | overhead |", "|---|---|---|---|---|---|"]
    for r in result.get("overhead") or []:
        if "decode_s" in r:
            lines.append(f"| - | 1 | one twin's VAE decode | {r['decode_s'] * 1e3:.2f} | | |")
        else:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['traffic']} | {r['patched_s'] * 1e3:.0f} | "
                         f"{r['same_rows_unpatched_s'] * 1e3:.0f} | {r['overhead']:+.2%} |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            model = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
            info["cpu"] = model.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            pass
        info["threads"] = torch.get_num_threads()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sd15", action="store_true", help="SD 1.5-sized random pipeline at 512 px (for GPUs)")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default=None)
    ap.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--modes", nargs="+", default=["final", "per_step", "per_step_eps"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--stream-batch", type=int, default=4)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/pipeline-<tag>.json)")
    ap.add_argument("--markdown", metavar="JSON", help="print the tables of a finished run and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return None

    dtype = {"fp32": torch.float32, "fp16": torch.float16, None: torch.float16 if args.sd15 else torch.float32}[args.dtype]
    if args.sd15:
        pipe = sd15_random_pipeline(args.device, dtype)
        profile = synthetic_profile(pipe, "new trigger", args.steps)
        prompts, tag = SD_PROMPTS, "sd15-random-512"
    else:
        from sau_kernels.zoo import zoo_profile
        from sau_kernels.zoo import load_pipeline

        pipe = load_pipeline("tiny-pixel", device=args.device, dtype=dtype)
        profile = zoo_profile("tiny-pixel", calibrate_if_missing=False)
        prompts, tag = ZOO_PROMPTS, "tiny-pixel"
    pipe.set_progress_bar_config(disable=True)
    if args.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    call = make_call(pipe, args.device, args.steps, 4.5)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    result = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "machine": machine(), "pipeline": tag,
        "dtype": str(dtype), "device": args.device, "attention": args.attention, "compile": args.compile,
        "steps": args.steps, "guidance_scale": 4.5,
    }
    suffix = f"{tag}-{args.device}-{args.attention}" + ("-compile" if args.compile else "")
    out = Path(args.out) if args.out else RESULTS / f"pipeline-{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [  # (--sections name, JSON key, measurement)
        ("latency", "latency", lambda: bench_latency(pipe, profile, call, prompts, args.batches, args.modes,
                                                     args.repeats, log)),
        ("throughput", "throughput", lambda: bench_throughput(pipe, profile, call, prompts, [0.0, 0.1, 0.5, 1.0],
                                                              args.requests, args.stream_batch, log)),
        ("shares", "time_shares", lambda: bench_shares(pipe, profile, call, prompts, args.modes,
                                                       sorted({1, max(args.batches)}), args.repeats, log)),
        ("overhead", "overhead", lambda: bench_overhead(pipe, profile, prompts, args.batches,
                                                        [m for m in args.modes if m != "per_step_eps"] + ["strip"],
                                                        args.steps, args.repeats, log)),
    ]
    for name, key, run in sections:
        result[key] = run() if name in args.sections else []
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each section: a cut-off run keeps its rows
    where = result["machine"].get("gpu") or result["machine"].get("cpu", "cpu")
    if result["latency"]:
        plot(result["latency"], out.with_suffix(".png"), f"{tag}, {where}, {args.steps} steps, {dtype}")
    log(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if result["latency"] else ""))
    return result


if __name__ == "__main__":
    main()
