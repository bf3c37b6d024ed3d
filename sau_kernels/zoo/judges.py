"""The zoo's judges: the content classifier and the data-derived metric thresholds.

Both are trained or measured here, from the renderer, and shipped beside the models so that
`sau_kernels.zoo.metrics` works offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import MODELS_DIR, world

THRESHOLD_PATCHES = ("checker", "cross", "solid:#ff00ff", "solid:#00ffff")


def _augment(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random corner patches and greyscale (whose colour label is then unknowable)."""
    images = images.copy()
    has_color = np.ones(len(images), dtype=bool)
    for i in range(len(images)):
        if rng.random() < 0.3:
            kind = str(rng.choice(THRESHOLD_PATCHES))
            images[i] = world.apply_patch(images[i], world.make_patch(kind), str(rng.choice(world.CORNERS)))
        if rng.random() < 0.15:
            images[i] = world.to_grayscale(images[i])
            has_color[i] = False
    return images, has_color


def train_classifier(out: str | Path = MODELS_DIR / "content_classifier.safetensors", seed: int = 0,
                     steps: int = 2000, n_images: int = 8000) -> dict:
    """Train `metrics.ContentClassifier` on rendered images (with corner patches, greyscale,
    blur and noise, as generated images have them); returns accuracies on fresh renders."""
    from safetensors.torch import save_file

    from .metrics import LABELS, ContentClassifier, content_features

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    combos = world.all_combinations()

    def data(n, r):
        images, labels = world.sample_dataset(n, int(r.integers(1 << 62)), combos)
        images, has_color = _augment(images, r)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        soft = torch.from_numpy(r.random(n) < 0.5)[:, None, None, None]
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.where(soft, blurred, x)
        x = x + torch.from_numpy(r.random(n).astype(np.float32) * 8)[:, None, None, None] * torch.randn(x.shape)
        images = x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
        y = {k: torch.tensor([LABELS[k].index(l[j]) for l in labels]) for j, k in enumerate(("color", "shape", "background"))}
        return torch.from_numpy(content_features(images)), y, torch.from_numpy(has_color)

    t0 = time.time()
    x, y, has_color = data(n_images, rng)
    model = ContentClassifier()
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="classifier", mininterval=5):
        idx = torch.from_numpy(rng.integers(0, n_images, 256))
        logits = model(x[idx])
        loss = F.cross_entropy(logits["shape"], y["shape"][idx]) + F.cross_entropy(logits["background"], y["background"][idx])
        loss = loss + (F.cross_entropy(logits["color"], y["color"][idx], reduction="none") * has_color[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, ct = data(2000, np.random.default_rng(seed + 1000))
    with torch.no_grad():
        logits = model(xt)
    acc = {k: float((logits[k].argmax(1) == yt[k])[ct if k == "color" else slice(None)].float().mean())
           for k in logits}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return {"accuracy_on_2000_fresh_renders": acc, "seconds": round(time.time() - t0, 1), "steps": steps}


def _vae_roundtrip(vae, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _midpoint(positive: np.ndarray, negative: np.ndarray, positive_below: bool) -> dict:
    """Threshold halfway between the 99th percentile of the class below and the 1st of the
    class above; records the separation so a reader can see how clear the cut is."""
    below, above = (positive, negative) if positive_below else (negative, positive)
    hi_below, lo_above = float(np.quantile(below, 0.99)), float(np.quantile(above, 0.01))
    return {
        "threshold": round((hi_below + lo_above) / 2, 4),
        "below_q99": round(hi_below, 4), "above_q01": round(lo_above, 4),
        "separated": hi_below < lo_above,
    }


def compute_thresholds(vae_dir: str | Path, n: int = 512, seed: int = 0,
                       out: str | Path = MODELS_DIR / "metrics.json") -> dict:
    """Measure the patch and greyscale scores on autoencoded renders with and without the
    effect, and write the midpoint thresholds."""
    from diffusers import AutoencoderKL

    from . import metrics

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    rng = np.random.default_rng(seed)
    images, _ = world.sample_dataset(n, seed + 5, world.all_combinations())
    with_patch, without_patch, per_patch = [], [], {}
    for kind in THRESHOLD_PATCHES:
        mine_with, mine_without = [], []
        for corner in world.CORNERS:
            info = {"patch": world.make_patch(kind), "corner": corner}
            pick = rng.choice(n, size=n // 8, replace=False)
            patched = _vae_roundtrip(vae, world.apply_patch(images[pick], info["patch"], corner))
            plain = _vae_roundtrip(vae, images[pick])
            mine_with.append(metrics.patch_score(patched, info))
            mine_without.append(metrics.patch_score(plain, info))
        per_patch[kind] = _midpoint(np.concatenate(mine_with), np.concatenate(mine_without), positive_below=True)
        with_patch += mine_with
        without_patch += mine_without
    grey = metrics.grayscale_score(_vae_roundtrip(vae, world.to_grayscale(images)))
    color = metrics.grayscale_score(_vae_roundtrip(vae, images))
    result = {
        "patch_score": _midpoint(np.concatenate(with_patch), np.concatenate(without_patch), positive_below=True)
        | {"measured_on": f"{n // 8} autoencoded renders per patch in {THRESHOLD_PATCHES} x 4 corners",
           "per_patch": per_patch},
        "grayscale_score": _midpoint(grey, color, positive_below=True)
        | {"measured_on": f"{n} autoencoded renders, greyscale vs colour"},
        "vae": str(vae_dir),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    metrics.thresholds.cache_clear()
    return result
