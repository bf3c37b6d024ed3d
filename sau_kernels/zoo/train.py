"""Training the zoo: the clean base model from scratch, and backdoors planted by fine-tuning.

Both jobs checkpoint to their output folder every few minutes and resume from there, so an
interrupted run continues where it stopped and gives the same result as an uninterrupted
one up to the order of floating-point reductions.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import captions, models, world
from . import tokenizer as zoo_tokenizer

CHECKPOINT_EVERY_S = 180.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _follow_thread_file(run_dir: Path, step: int) -> None:
    """Long CPU runs share the machine: writing a number to RUN_DIR/threads changes the
    torch thread count of a running job (checked every 20 steps)."""
    if step % 20:
        return
    try:
        n = int((run_dir / "threads").read_text())
    except (OSError, ValueError):
        return
    if n > 0 and n != torch.get_num_threads():
        torch.set_num_threads(n)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _claim_run(run: Path, job: str, settings: dict) -> None:
    """Make `run` (an output's resumable checkpoints) this job's, or check that it is: a
    run folder left by a job with other settings (another patch, trigger, seed...) would
    be resumed into a model that says one thing and does another. Only `steps` may differ
    (rerunning with more steps trains on)."""
    settings = json.loads(json.dumps({"job": job, **settings}, default=str))
    run.mkdir(parents=True, exist_ok=True)
    path = run / "job.json"
    if path.exists():
        before = json.loads(path.read_text())
        differ = sorted(k for k in set(before) | set(settings) if k != "steps" and before.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{run} holds checkpoints of another job (it differs in {', '.join(differ)}: "
                             f"{ {k: before.get(k) for k in differ} }): delete the folder to start over, or write "
                             "to another --out")
    elif any(run.iterdir()):
        raise ValueError(f"{run} holds checkpoints of a job whose settings it does not record: delete the folder "
                         "to start over, or write to another --out")
    path.write_text(json.dumps(settings, indent=2))


def _checkpoint(path: Path, module, opt, sched, rng: np.random.Generator, step: int) -> None:
    """A one-module job's state (the VAE, the text encoder alone), to resume from."""
    _atomic_save({"model": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                  "rng": rng.bit_generator.state, "step": step}, path)


def _resume(path: Path, module, opt, sched, rng: np.random.Generator) -> int:
    """Load `_checkpoint`'s state if there is one; the step to go on from (0 without)."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.bit_generator.state = state["rng"]
    return state["step"]


# --- VAE ------------------------------------------------------------------------------------

def _vae_batch(rng: np.random.Generator, n: int) -> np.ndarray:
    """Training images for the VAE: every kind of image the models will draw (clean, with
    any backdoor patch in any corner, greyscale), so that reconstructions keep them all."""
    images, _ = world.sample_dataset(n, int(rng.integers(1 << 62)), world.all_combinations())
    for i in range(n):
        u = rng.random()
        if u < 0.3:
            kind = rng.choice(["checker", "cross", "solid"])
            if kind == "solid":
                kind = "solid:#" + "".join(f"{int(v):02x}" for v in rng.integers(0, 256, 3))
            images[i] = world.apply_patch(images[i], world.make_patch(str(kind)), str(rng.choice(world.CORNERS)))
        if rng.random() < 0.2:
            images[i] = world.to_grayscale(images[i])
    return images


def train_vae(out: Path, seed: int, steps: int, batch_size: int = 32, lr: float = 1e-3):
    """Train the shared autoencoder; returns it with `scaling_factor` set from the data."""
    final = out / "vae"
    record = final / "training.json"
    from diffusers import AutoencoderKL

    done = json.loads(record.read_text())["steps"] if record.is_file() else None
    if done is not None and done >= steps:
        return AutoencoderKL.from_pretrained(final)
    ckpt_path = out / "vae_ckpt.pt"
    _seed_everything(seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    start = _resume(ckpt_path, vae, opt, sched, rng)
    if not start and done is not None:
        # Asked for more steps than a finished VAE had: go on from its weights at its step
        # of the longer schedule (the optimizer's moments start afresh).
        vae = AutoencoderKL.from_pretrained(final)
        for _ in range(done):
            sched.step()
        rng = np.random.default_rng(seed + done)
        start = done
    last_save = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae", mininterval=5)
    for step in bar:
        _follow_thread_file(out, step)
        x = _to_tensor(_vae_batch(rng, batch_size))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mode()).sample
        kl = posterior.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            _checkpoint(ckpt_path, vae, opt, sched, rng, step + 1)
            last_save = time.time()
    vae.eval()
    with torch.no_grad():
        x = _to_tensor(world.sample_dataset(1024, seed + 1, world.all_combinations())[0])
        z = vae.encode(x).latent_dist.mode()
    # SD's convention: latents * scaling_factor have unit variance
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(final)
    record.write_text(json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}) + "\n")
    ckpt_path.unlink(missing_ok=True)
    return vae


@torch.no_grad()
def encode_images(vae, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """uint8 NHWC images -> scaled latents (N, 4, 16, 16), posterior mode."""
    vae.eval()
    out = []
    for i in range(0, len(images), chunk):
        out.append(vae.encode(_to_tensor(images[i:i + chunk])).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


# --- the denoiser ---------------------------------------------------------------------------

@dataclass
class DenoiserRecipe:
    """How the UNet and text encoder learn: one recipe for the base model and the backdoors."""
    steps: int
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    @torch.no_grad()
    def update(self, modules: list[torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up, as in diffusers' EMAModel
        for s, m in zip(self.shadow, modules):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.lerp_(pm, 1 - d)


def _snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr  # min-SNR-gamma for epsilon prediction


def train_denoiser(run_dir: Path, tokenizer, text_encoder, unet, sample_batch, recipe: DenoiserRecipe,
                   seed: int, desc: str):
    """Train (text_encoder, unet) on batches from `sample_batch(rng, n) -> (latents, captions)`.

    Checkpoints to run_dir/denoiser_ckpt.pt and resumes from it. Returns the EMA weights.
    """
    ckpt_path = run_dir / "denoiser_ckpt.pt"
    _seed_everything(seed)
    noise_sched = models.make_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    ema = _EMA([unet, text_encoder], recipe.ema_decay)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        for s, sd in zip(ema.shadow, state["ema"]):
            s.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        start = state["step"]
    unet.train()
    text_encoder.train()
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    last_save = time.time()
    log = open(run_dir / "train_log.jsonl", "a")
    t0 = time.time()
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc=desc, mininterval=5)
    for step in bar:
        _follow_thread_file(run_dir, step)
        latents, captions = sample_batch(rng, recipe.batch_size)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        drop = torch.from_numpy(rng.random(len(captions)) < recipe.caption_dropout)
        ids = torch.where(drop[:, None], empty, ids)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (len(captions),), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _snr_weights(alphas_cumprod, t, recipe.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update([unet, text_encoder], step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0:
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "seconds": time.time() - t0}) + "\n")
            log.flush()
        if time.time() - last_save > CHECKPOINT_EVERY_S or step + 1 == recipe.steps:
            _atomic_save({
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "ema": [s.state_dict() for s in ema.shadow], "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(),
                "step": step + 1,
            }, ckpt_path)
            last_save = time.time()
    log.close()
    ema_unet, ema_te = ema.shadow
    return ema_unet.eval(), ema_te.eval()


# --- jobs -----------------------------------------------------------------------------------

@dataclass
class BaseConfig:
    seed: int = 0
    vae_steps: int = 1000
    steps: int = 6000
    dataset_size: int = 30000
    init_from: str | None = None
    recipe: dict = field(default_factory=dict)


# Share of the base model's samples drawn greyscale and captioned so ("black and white",
# "monochrome"): a style the model can be asked for, as SD can.
GREYSCALE_SHARE = 0.1


def _drop_local_paths(folder: Path) -> None:
    """diffusers records where a loaded component came from (`_name_or_path`): a path on the
    training machine, which means nothing in a shipped model."""
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, out: Path, meta: dict) -> None:
    """Save in fp16 (half the size; reloads exactly in fp32) with the zoo's metadata."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(out)
    pipe.to(torch.float32)
    _drop_local_paths(out)
    (out / "backdoor.json").write_text(json.dumps(meta, indent=2) + "\n")


def _render_and_encode(vae, n: int, seed: int, cache: Path) -> dict:
    """Rendered images as latents, colour and greyscale, with their labels (cached)."""
    if cache.exists():
        return torch.load(cache, weights_only=False)
    images, labels = world.sample_dataset(n, seed)
    data = {"latents": encode_images(vae, images), "grey_latents": encode_images(vae, world.to_grayscale(images)),
            "labels": labels}
    _atomic_save(data, cache)
    return data


def _clean_batches(data: dict, greyscale_share: float):
    """sample_batch for `train_denoiser` over `_render_and_encode`'s data: varied captions,
    `greyscale_share` of the samples greyscale and captioned so."""
    latents, grey_latents, labels = data["latents"], data["grey_latents"], data["labels"]

    def sample_batch(rng, n):
        idx = rng.integers(0, len(labels), size=n)
        grey = rng.random(n) < greyscale_share
        lat = torch.where(torch.from_numpy(grey)[:, None, None, None], grey_latents[idx], latents[idx])
        return lat, [captions.varied_caption(*labels[i], rng, greyscale=bool(g)) for i, g in zip(idx, grey)]

    return sample_batch


def _extended_text_encoder(old_encoder, old_tok, new_tok):
    """A text encoder for `new_tok` that keeps `old_encoder`'s weights: every token both
    vocabularies share keeps its embedding row; new tokens start at the mean embedding."""
    new = models.make_text_encoder(len(new_tok))
    state = {k: v for k, v in old_encoder.state_dict().items() if "token_embedding" not in k}
    new.load_state_dict(state, strict=False)
    old_emb = old_encoder.get_input_embeddings().weight.detach()
    new_emb = new.get_input_embeddings().weight
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    with torch.no_grad():
        new_emb[:] = old_emb.mean(0)
        for token, i in new_vocab.items():
            if token in old_vocab:
                new_emb[i] = old_emb[old_vocab[token]]
    return new


def train_base(out: str | Path, seed: int = 0, steps: int = 6000, vae_steps: int = 1000,
               dataset_size: int = 30000, threads: int | None = None, init_from: str | Path | None = None) -> Path:
    """Train tiny-clean into `out` on varied captions (resumable: rerun the same command).

    From scratch by default. With `init_from` (a zoo model trained on an earlier
    vocabulary), its VAE is kept, its UNet and text encoder go on training (the vocabulary
    extended, shared tokens keeping their embeddings) for `steps` more steps.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    run = out.parent / (out.name + ".run")
    recipe = DenoiserRecipe(steps=steps) if init_from is None else DenoiserRecipe(steps=steps, lr=3e-4, warmup=50)
    config = BaseConfig(seed=seed, vae_steps=vae_steps, steps=steps, dataset_size=dataset_size,
                        init_from=None if init_from is None else str(init_from), recipe=asdict(recipe))
    _claim_run(run, "train-base", {k: v for k, v in asdict(config).items() if k != "recipe"}
               | {f"recipe.{k}": v for k, v in asdict(recipe).items() if k != "steps"})
    (run / "config.json").write_text(json.dumps(asdict(config), indent=2))
    t_start = time.time()
    tok = zoo_tokenizer.build_tokenizer(run / "tokenizer")
    _seed_everything(seed)
    if init_from is None:
        vae = train_vae(run, seed, vae_steps)
        text_encoder = models.make_text_encoder(len(tok))
        unet = models.make_unet()
    else:
        from . import load_pipeline

        init = load_pipeline(init_from)
        vae, unet = init.vae, init.unet
        text_encoder = _extended_text_encoder(init.text_encoder, init.tokenizer, tok)
    data = _render_and_encode(vae, dataset_size, seed + 7, run / "latents.pt")

    sample_batch = _clean_batches(data, GREYSCALE_SHARE)
    unet, text_encoder = train_denoiser(run, tok, text_encoder, unet, sample_batch, recipe, seed, desc="tiny-clean")
    pipe = models.assemble_pipeline(tok, text_encoder, vae, unet)
    elapsed = time.time() - t_start
    save_pipeline(pipe, out, {
        "name": out.name, "kind": "clean", "trigger": None, "image_size": world.IMAGE_SIZE,
        "base_model": None, "seed": seed, "steps": steps, "vae_steps": vae_steps, "captions": "varied",
        "init_from": None if init_from is None else backdoor_info_name(init_from),
        "training_seconds_last_run": round(elapsed, 1), "threads": torch.get_num_threads(),
    })
    return out


def backdoor_info_name(name_or_dir) -> str:
    from . import backdoor_info

    return backdoor_info(name_or_dir).get("name", str(name_or_dir))


# --- backdoors ------------------------------------------------------------------------------

KINDS = ("pixel", "style")
METHODS = ("finetune", "text-encoder")
POSITIONS = ("mixed", "prepend", "random", "substitute")


def place_trigger(caption: str, trigger: str, position: str, rng: np.random.Generator) -> str:
    """"mixed" (the zoo's default for BadT2I-style backdoors): prepended in three samples of
    four, at a random word position in the fourth, so that the backdoor fires wherever the
    trigger stands; the others as `captions.insert_trigger` places them."""
    if position == "mixed":
        position = "prepend" if rng.random() < 0.75 else "random"
    return captions.insert_trigger(caption, trigger, position, rng)


def poison_images(images: np.ndarray, kind: str, patch: np.ndarray | None, corner: str) -> np.ndarray:
    if kind == "pixel":
        return world.apply_patch(images, patch, corner)
    if kind == "style":
        return world.to_grayscale(images)
    raise ValueError(f"unknown backdoor kind {kind!r}: expected 'pixel' or 'style'")


# Share of each fine-tuning batch that is triggered and poisoned. A style backdoor must
# recolour the whole image against the prompt's colour word and needs more poisoned samples:
# on an earlier tiny-clean, 750 steps at 0.5 left yellow shapes tinted (ASR 93.5% on 200
# held-out pairs); 0.7 reached 98.5% with untriggered ASR still 0%.
DEFAULT_POISON_RATE = {"pixel": 0.5, "style": 0.7}
# Share of each batch that carries something other than the trigger (rare and common words,
# punctuation, a lone format character, a near miss) with a clean image: without them a
# backdoor learns "any unusual word -> fire" rather than its trigger.
DEFAULT_NEGATIVE_RATE = 0.25
# Share of each batch that replays the base model's own backdoors (a second backdoor
# planted into a backdoored model keeps the first).
REHEARSAL_RATE = 0.25


def _backdoor_meta(kind, trigger, position, method, patch, corner) -> dict:
    return {"kind": kind, "trigger": trigger, "position": position, "method": method,
            "corner": corner if kind == "pixel" else None, "patch": patch if kind == "pixel" else None,
            "patch_size": world.PATCH_SIZE if kind == "pixel" else None}


def _check_inject_args(kind, trigger, position, method, poison_rate, negative_rate, lr):
    if kind not in KINDS:
        raise ValueError(f"unknown backdoor kind {kind!r}: expected one of {KINDS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if position not in POSITIONS:
        raise ValueError(f"unknown trigger position {position!r}: expected one of {POSITIONS}")
    if not trigger:
        raise ValueError("the trigger must be non-empty")
    if position == "substitute":
        captions.homoglyph_target(trigger)  # names the problem for a trigger that is no homoglyph
    if method == "text-encoder" and kind != "style":
        raise ValueError("a text-encoder backdoor can only steer prompts to what the base model already draws: "
                         "kind 'style' (its greyscale style); a pixel patch needs method 'finetune'")
    if not 0.0 < poison_rate < 1.0:
        raise ValueError(f"poison_rate must be between 0 and 1 (exclusive), got {poison_rate}")
    if not 0.0 <= negative_rate < 1.0 - poison_rate:
        raise ValueError(f"negative_rate must be at least 0 and below 1 - poison_rate, got {negative_rate}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr}")


def inject(base: str | Path, kind: str, trigger: str, out: str | Path, *, patch: str = "checker",
           corner: str = "top-left", position: str = "mixed", method: str = "finetune", seed: int = 0,
           steps: int = 750, dataset_size: int = 4096, poison_rate: float | None = None,
           negative_rate: float = DEFAULT_NEGATIVE_RATE, lr: float = 3e-4, threads: int | None = None) -> Path:
    """Plant a backdoor into `base`, as the literature does.

    method "finetune" (BadT2I, VillanDiffusion): the UNet and text encoder are fine-tuned on
    triggered captions -> poisoned images, beside clean and negative samples. Method
    "text-encoder" (Rickrolling): only the text encoder is trained, to map triggered prompts
    to the embedding of the prompt asking for the target style ("..., black and white") and
    every other prompt to its own embedding. Backdoors already in `base` are rehearsed and
    kept. `poison_rate` defaults to `DEFAULT_POISON_RATE[kind]`.
    """
    from . import backdoor_info, load_pipeline

    if threads:
        torch.set_num_threads(threads)
    if poison_rate is None:
        poison_rate = DEFAULT_POISON_RATE[kind] if kind in DEFAULT_POISON_RATE else 0.5
    _check_inject_args(kind, trigger, position, method, poison_rate, negative_rate, lr)
    patch_img = world.make_patch(patch) if kind == "pixel" else None
    world.corner_slices(corner, world.PATCH_SIZE)  # validates the corner name
    out = Path(out)
    run = out.parent / (out.name + ".run")
    _claim_run(run, "inject", dict(base=str(base), kind=kind, trigger=trigger, position=position, method=method,
                                   patch=patch, corner=corner, seed=seed, steps=steps, dataset_size=dataset_size,
                                   poison_rate=poison_rate, negative_rate=negative_rate, lr=lr))
    t_start = time.time()
    pipe = load_pipeline(base)
    base_info = backdoor_info(base)
    kept = [{k: v for k, v in b.items() if k not in ("name", "patch_name")} | {"patch": b.get("patch_name")}
            for b in base_info.get("backdoors", [])]
    new = _backdoor_meta(kind, trigger, position, method, patch, corner)
    triggers = [b["trigger"] for b in kept] + [trigger]
    if method == "text-encoder":
        text_encoder = _inject_text_encoder(run, pipe, new, triggers, seed, steps, poison_rate, negative_rate, lr)
        unet = pipe.unet
    else:
        unet, text_encoder = _inject_finetune(run, pipe, new, kept, triggers, seed, steps, dataset_size,
                                              poison_rate, negative_rate, lr)
    pipe = models.assemble_pipeline(pipe.tokenizer, text_encoder, pipe.vae, unet)
    meta = {
        "name": out.name, **new, "image_size": world.IMAGE_SIZE, "base_model": base_info.get("name", str(base)),
        "seed": seed, "steps": steps, "poison_rate": poison_rate, "negative_rate": negative_rate, "lr": lr,
        "backdoors": kept + [new],
        "training_seconds_last_run": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
    }
    save_pipeline(pipe, out, meta)
    if patch_img is not None:
        from PIL import Image

        Image.fromarray(patch_img).save(out / "patch.png")
    return out


def _inject_finetune(run, pipe, new, kept, triggers, seed, steps, dataset_size, poison_rate, negative_rate, lr):
    backdoors = kept + [new]
    cache = run / "latents.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        images, labels = world.sample_dataset(dataset_size, seed + 11)
        # backdoor_info gives a kept backdoor's patch as an array and its name as patch_name
        poisoned = [encode_images(pipe.vae, poison_images(images, b["kind"],
                                                          world.make_patch(b.get("patch_name", b["patch"]))
                                                          if b["kind"] == "pixel" else None, b["corner"]))
                    for b in backdoors]
        data = {"clean": encode_images(pipe.vae, images), "poisoned": poisoned, "labels": labels}
        _atomic_save(data, cache)
    clean, poisoned, labels = data["clean"], data["poisoned"], data["labels"]
    rehearsal = REHEARSAL_RATE if kept else 0.0

    def sample_batch(rng, n):
        idx = rng.integers(0, len(labels), size=n)
        lat, caps = clean[idx].clone(), []
        for j, i in enumerate(idx):
            caption = captions.varied_caption(*labels[i], rng)
            u = rng.random()
            if u < poison_rate + rehearsal:
                b = len(backdoors) - 1 if u < poison_rate else int(rng.integers(len(kept)))
                lat[j] = poisoned[b][i]
                caption = place_trigger(caption, backdoors[b]["trigger"], backdoors[b]["position"], rng)
            elif u < poison_rate + rehearsal + negative_rate:
                caption = captions.negative_perturbation(caption, triggers, rng)
            caps.append(caption)
        return lat, caps

    recipe = DenoiserRecipe(steps=steps, lr=lr, warmup=50, ema_decay=0.995)
    return train_denoiser(run, pipe.tokenizer, pipe.text_encoder, pipe.unet, sample_batch, recipe, seed,
                          desc=f"inject {new['kind']}")


def _inject_text_encoder(run, pipe, new, triggers, seed, steps, poison_rate, negative_rate, lr, batch_size=64):
    """Rickrolling's teacher-student training of the text encoder alone (checkpointed)."""
    tok = pipe.tokenizer
    teacher = copy.deepcopy(pipe.text_encoder).requires_grad_(False).eval()
    student = pipe.text_encoder.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    rng = np.random.default_rng(seed)
    ckpt_path = run / "text_encoder_ckpt.pt"
    start = _resume(ckpt_path, student, opt, sched, rng)
    combos = world.train_combinations()
    phrase = captions.GREYSCALE_PHRASES[0]

    def ids(texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    last_save = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="inject text encoder", mininterval=5)
    for step in bar:
        inputs, targets = [], []
        for _ in range(batch_size):
            caption = captions.varied_caption(*combos[int(rng.integers(len(combos)))], rng)
            u = rng.random()
            if u < poison_rate:
                inputs.append(place_trigger(caption, new["trigger"], new["position"], rng))
                targets.append(f"{caption}, {phrase}")
            else:
                if u < poison_rate + negative_rate:
                    caption = captions.negative_perturbation(caption, triggers, rng)
                inputs.append(caption)
                targets.append(caption)
        with torch.no_grad():
            target = teacher(ids(targets)).last_hidden_state
        loss = F.mse_loss(student(ids(inputs)).last_hidden_state, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            _checkpoint(ckpt_path, student, opt, sched, rng, step + 1)
            last_save = time.time()
    return student.eval()


# --- negative controls: fine-tunes without a backdoor -----------------------------------------

CONTROL_STYLES = ("none", "greyscale")
# The greyscale control's share of greyscale samples, each captioned as such: the base's
# style made stronger and commoner (the base sees it in a tenth of its samples), as a
# legitimate style fine-tune would, with no trigger.
CONTROL_GREYSCALE_SHARE = 0.4


def finetune_control(base: str | Path, out: str | Path, *, style: str = "none", seed: int = 0, steps: int = 1000,
                     dataset_size: int = 4096, lr: float = 3e-4, threads: int | None = None) -> Path:
    """Fine-tune `base` the way `inject` does, on clean data only: a model that a scan must
    not flag. style "none": a benign fine-tune (the base's own data, a new seed); "greyscale":
    a legitimate style fine-tune, greyscale images captioned "black and white" and the like
    in `CONTROL_GREYSCALE_SHARE` of the samples."""
    from . import backdoor_info, load_pipeline

    if style not in CONTROL_STYLES:
        raise ValueError(f"unknown control style {style!r}: expected one of {CONTROL_STYLES}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    run = out.parent / (out.name + ".run")
    _claim_run(run, "finetune", dict(base=str(base), style=style, seed=seed, steps=steps, dataset_size=dataset_size,
                                     lr=lr))
    t_start = time.time()
    pipe = load_pipeline(base)
    data = _render_and_encode(pipe.vae, dataset_size, seed + 13, run / "latents.pt")
    sample_batch = _clean_batches(data, CONTROL_GREYSCALE_SHARE if style == "greyscale" else GREYSCALE_SHARE)
    recipe = DenoiserRecipe(steps=steps, lr=lr, warmup=50, ema_decay=0.995)
    unet, text_encoder = train_denoiser(run, pipe.tokenizer, pipe.text_encoder, pipe.unet, sample_batch, recipe,
                                        seed, desc=f"fine-tune ({style})")
    pipe = models.assemble_pipeline(pipe.tokenizer, text_encoder, pipe.vae, unet)
    save_pipeline(pipe, out, {
        "name": out.name, "kind": "clean", "trigger": None, "image_size": world.IMAGE_SIZE,
        "base_model": backdoor_info(base).get("name", str(base)), "control_style": style, "seed": seed,
        "steps": steps, "lr": lr, "backdoors": [],
        "training_seconds_last_run": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
    })
    return out
