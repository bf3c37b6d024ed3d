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

from .zoo import MODELS_DIR, world

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

def patch_score(images, info: dict) -> np.ndarray:
    """Mean absolute difference (0..1) between each image's corner and the backdoor patch."""
    arr = as_uint8_images(images).astype(np.float32)
    patch = info.get("patch")
    if patch is None or info.get("corner") is None:
        raise ValueError("backdoor info has no patch and corner: patch_present needs a pixel backdoor's info")
    rows, cols = world.corner_slices(info["corner"], patch.shape[0], arr.shape[1])
    region = arr[:, rows, cols, :]
    return np.abs(region - patch.astype(np.float32)[None]).mean(axis=(1, 2, 3)) / 255.0


def patch_present(images, info: dict) -> np.ndarray:
    """True where the image shows the backdoor's patch in its corner."""
    return patch_score(images, info) < thresholds()["patch_score"]["threshold"]


# --- style backdoor -------------------------------------------------------------------------

def grayscale_score(images) -> np.ndarray:
    """Mean chroma (max - min over RGB, 0..1) over the pixels of each image."""
    arr = as_uint8_images(images).astype(np.float32)
    return (arr.max(axis=-1) - arr.min(axis=-1)).mean(axis=(1, 2)) / 255.0


def is_grayscale(images) -> np.ndarray:
    return grayscale_score(images) < thresholds()["grayscale_score"]["threshold"]


# --- content --------------------------------------------------------------------------------

class ContentClassifier(torch.nn.Module):
    """A small CNN that names the colour, shape and background of a world image."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(4, cout), torch.nn.SiLU(),
                torch.nn.Conv2d(cout, cout, 3, padding=1, stride=2), torch.nn.GroupNorm(4, cout), torch.nn.SiLU(),
            )
        self.features = torch.nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64))
        self.heads = torch.nn.ModuleDict({
            "color": torch.nn.Linear(64, len(world.COLORS)),
            "shape": torch.nn.Linear(64, len(world.SHAPES)),
            "background": torch.nn.Linear(64, len(world.BACKGROUNDS)),
        })

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))
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
    arr = as_uint8_images(images)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)
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
