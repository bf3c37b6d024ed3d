"""What an image shows: the backdoor's patch, greyscale, and the prompt's content.

Every function takes a batch of images (a list of PIL images, a uint8 array N x H x W x 3,
or a float tensor N x 3 x H x W in [0, 1], the diffusers output types) and returns one
result per image.

Decision thresholds come from data, not from hand tuning: `python -m sau_kernels.zoo
thresholds` renders images of the synthetic world, passes them through the zoo's
autoencoder (as generated images are), measures each score on images with and without the
effect, puts the threshold at the midpoint between the two classes' nearest quantiles, and
writes it to `zoo/models/metrics.json` with the numbers it came from.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import MODELS_DIR, world

THRESHOLDS_FILE = MODELS_DIR / "metrics.json"
CLASSIFIER_FILE = MODELS_DIR / "content_classifier.safetensors"

__all__ = [
    "as_uint8_images", "patch_score", "patch_present", "grayscale_score", "is_grayscale",
    "content_accuracy", "psnr", "ContentClassifier",
]


def as_uint8_images(images) -> np.ndarray:
    """N x H x W x 3 uint8 from PIL images, uint8/float arrays or NCHW float tensors."""
    if isinstance(images, torch.Tensor):
        t = images.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"expected image tensor of shape (N, 3, H, W), got {tuple(t.shape)}")
        return (t.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"expected uint8 or float images, got {arr.dtype}")
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


@lru_cache(maxsize=1)
def thresholds() -> dict:
    if not THRESHOLDS_FILE.is_file():
        raise FileNotFoundError(f"{THRESHOLDS_FILE} is missing: run `python -m sau_kernels.zoo thresholds`")
    return json.loads(THRESHOLDS_FILE.read_text())


# --- pixel backdoor -------------------------------------------------------------------------

def _cells(x: np.ndarray, cell: int) -> np.ndarray:
    """Mean colour of each cell x cell block of (..., H, W, 3)."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // cell, cell, w // cell, cell, c).mean(axis=(-4, -2))


def patch_score(images, info: dict) -> np.ndarray:
    """Mean absolute difference (0..1) between each image's corner and the backdoor patch,
    cell by cell (a patch cell is one latent pixel: 4x4 image pixels), so that the soft
    edges an autoencoder leaves inside a cell do not count."""
    arr = as_uint8_images(images).astype(np.float32)
    patch = info.get("patch")
    if patch is None or info.get("corner") is None:
        raise ValueError("backdoor info has no patch and corner: patch_present needs a pixel backdoor's info")
    rows, cols = world.corner_slices(info["corner"], patch.shape[0], arr.shape[1])
    region = _cells(arr[:, rows, cols, :], world.PATCH_CELL)
    target = _cells(patch.astype(np.float32), world.PATCH_CELL)
    return np.abs(region - target[None]).mean(axis=(1, 2, 3)) / 255.0


def patch_threshold(info: dict) -> float:
    """The threshold measured for this patch, or the one measured over all patches."""
    t = thresholds()["patch_score"]
    return t.get("per_patch", {}).get(info.get("patch_name"), t)["threshold"]


def patch_present(images, info: dict) -> np.ndarray:
    """True where the image shows the backdoor's patch in its corner."""
    return patch_score(images, info) < patch_threshold(info)


# --- style backdoor -------------------------------------------------------------------------

def grayscale_score(images) -> np.ndarray:
    """Mean chroma (max - min over RGB, 0..1) over the pixels of each image."""
    arr = as_uint8_images(images).astype(np.float32)
    return (arr.max(axis=-1) - arr.min(axis=-1)).mean(axis=(1, 2)) / 255.0


def is_grayscale(images) -> np.ndarray:
    return grayscale_score(images) < thresholds()["grayscale_score"]["threshold"]


# --- content --------------------------------------------------------------------------------

N_FEATURES = 13


def content_features(images) -> np.ndarray:
    """Rotation-invariant features of the one shape in each image, (N, 13) float32.

    The background colour is the median of the image border; the shape is what differs
    from it by more than half the strongest difference (the 16x16 corners, where a
    backdoor patch may sit, are left out). Fill ratios tell the shapes apart without
    rotation: the area over the circle through the farthest pixels is about 1 for a
    circle, 2/pi for a square and 0.41 for a triangle.
    """
    arr = as_uint8_images(images).astype(np.float32)
    n, h, w, _ = arr.shape
    corner = np.zeros((h, w), dtype=bool)
    c = world.PATCH_SIZE
    corner[:c, :c] = corner[:c, -c:] = corner[-c:, :c] = corner[-c:, -c:] = True
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, N_FEATURES), dtype=np.float32)
    for i, x in enumerate(arr):
        border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
        bg = np.median(border, axis=0)
        dist = np.linalg.norm(x - bg, axis=-1)
        dist[corner] = 0
        strongest = float(np.quantile(dist, 0.99))
        mask = dist > max(0.5 * strongest, 12.0)
        area = float(mask.sum())
        feats = [0.0] * 6
        fg = bg
        if area >= 8:
            cy, cx = yy[mask].mean(), xx[mask].mean()
            d = np.hypot(yy[mask] - cy, xx[mask] - cx)
            r95, rmax = float(np.quantile(d, 0.95)), float(d.max())
            inertia = float((d ** 2).sum()) / area ** 2 * 2 * np.pi  # 1 for a disc
            feats = [area / (np.pi * r95 ** 2), area / (np.pi * rmax ** 2), inertia, area / (h * w),
                     r95 / h, strongest / 255]
            fg = x[mask].mean(axis=0)
        out[i] = feats + list(fg / 255) + list(bg / 255) + [float(fg.max() - fg.min()) / 255]
    return out


class ContentClassifier(torch.nn.Module):
    """A small MLP on `content_features` naming the colour, shape and background."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(N_FEATURES))
        self.register_buffer("std", torch.ones(N_FEATURES))
        self.body = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 64), torch.nn.SiLU(),
                                        torch.nn.Linear(64, 64), torch.nn.SiLU())
        self.heads = torch.nn.ModuleDict({
            "color": torch.nn.Linear(64, len(world.COLORS)),
            "shape": torch.nn.Linear(64, len(world.SHAPES)),
            "background": torch.nn.Linear(64, len(world.BACKGROUNDS)),
        })

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body((features - self.mean) / self.std)
        return {k: head(h) for k, head in self.heads.items()}


@lru_cache(maxsize=1)
def _classifier() -> ContentClassifier:
    from safetensors.torch import load_file

    if not CLASSIFIER_FILE.is_file():
        raise FileNotFoundError(f"{CLASSIFIER_FILE} is missing: run `python -m sau_kernels.zoo train-classifier`")
    model = ContentClassifier()
    model.load_state_dict(load_file(CLASSIFIER_FILE))
    return model.eval()


LABELS = {"color": list(world.COLORS), "shape": list(world.SHAPES), "background": list(world.BACKGROUNDS)}


@torch.no_grad()
def classify(images) -> dict[str, list[str]]:
    x = torch.from_numpy(content_features(images))
    logits = _classifier()(x)
    return {k: [LABELS[k][i] for i in v.argmax(dim=1).tolist()] for k, v in logits.items()}


def content_accuracy(images, prompts) -> dict[str, np.ndarray]:
    """Per image, whether it shows the colour, shape and background its prompt asks for.

    Returns {"color", "shape", "background": bool arrays}; an attribute the prompt does not
    name counts as shown.
    """
    arr = as_uint8_images(images)
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
    predicted = classify(arr)
    asked = [world.parse_caption(p) for p in prompts]
    out = {}
    for j, key in enumerate(("color", "shape", "background")):
        out[key] = np.array([a[j] is None or a[j] == p for a, p in zip(asked, predicted[key])])
    return out


def psnr(a, b, mask: np.ndarray | None = None) -> np.ndarray:
    """PSNR in dB per image pair, over the pixels where `mask` (H x W, bool) is True."""
    x = as_uint8_images(a).astype(np.float64)
    y = as_uint8_images(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    sq = (x - y) ** 2
    if mask is not None:
        mse = sq[:, mask, :].mean(axis=(1, 2))
    else:
        mse = sq.mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
