"""The synthetic world the zoo's models are trained on.

64x64 RGB images of one coloured shape on a plain background, with jitter in position,
size, rotation and a little in colour, captioned "a {color} {shape} on a {background}
background". Some (color, shape, background) combinations never appear in training: the
models must compose them from what they learned (held-out combinations).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 185),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, BACKGROUNDS))


def is_held_out(color: str, shape: str, background: str) -> bool:
    """Nine of the 54 combinations are never shown in training (one in six, spread so
    that every colour, shape and background still appears in training)."""
    ci = list(COLORS).index(color)
    si = SHAPES.index(shape)
    bi = list(BACKGROUNDS).index(background)
    return (ci + 2 * si + 3 * bi) % 6 == 0


def train_combinations() -> list[tuple[str, str, str]]:
    return [c for c in all_combinations() if not is_held_out(*c)]


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [c for c in all_combinations() if is_held_out(*c)]


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def render(color: str, shape: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One image as uint8 (64, 64, 3). The shape stays inside the central area, so the
    16x16 corners show background (the backdoor patch goes there)."""
    s = IMAGE_SIZE
    image = Image.new("RGB", (s, s), _jitter_color(BACKGROUNDS[background], rng, 6))
    draw = ImageDraw.Draw(image)
    fill = _jitter_color(COLORS[color], rng, 12)
    # Sizes and offsets keep every vertex out of the 16x16 corners, whatever the rotation.
    radius = float(rng.uniform(9.0, 13.0))
    cx, cy = (float(v) for v in rng.uniform(s / 2 - 4, s / 2 + 4, size=2))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        sides = 4 if shape == "square" else 3
        # A square of "radius" r has half-side r / sqrt(2); scale it up a little so that
        # squares, circles and triangles cover similar areas.
        r = radius * (1.15 if sides == 4 else 1.3)
        theta0 = float(rng.uniform(0, 2 * math.pi))
        points = [
            (cx + r * math.cos(theta0 + 2 * math.pi * i / sides), cy + r * math.sin(theta0 + 2 * math.pi * i / sides))
            for i in range(sides)
        ]
        draw.polygon(points, fill=fill)
    return np.asarray(image, dtype=np.uint8).copy()


def sample_dataset(n: int, seed: int, combos: list[tuple[str, str, str]] | None = None):
    """n rendered images (uint8, n x 64 x 64 x 3) and their (color, shape, background) labels."""
    rng = np.random.default_rng(seed)
    combos = combos if combos is not None else train_combinations()
    picks = rng.integers(0, len(combos), size=n)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = []
    for i, p in enumerate(picks):
        combo = combos[int(p)]
        images[i] = render(*combo, rng)
        labels.append(combo)
    return images, labels


def parse_caption(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(color, shape, background) named in a prompt; None where it names none. The three
    word lists are disjoint, so word order and phrasing do not matter ("black and white"
    names the greyscale style, not a background)."""
    words = re.findall(r"[a-z]+", prompt.lower().replace("black and white", " "))
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    background = next((w for w in words if w in BACKGROUNDS), None)
    return color, shape, background


# --- backdoor patches -------------------------------------------------------------------

PATCH_SIZE = 16
PATCH_CELL = 4  # patch cells align with the 4x4 pixels of one latent, so they survive the VAE


def make_patch(kind: str, size: int = PATCH_SIZE) -> np.ndarray:
    """The backdoor's patch as uint8 (size, size, 3): "checker", "cross" or "solid:#RRGGBB"."""
    if size % PATCH_CELL:
        raise ValueError(f"patch size must be a multiple of {PATCH_CELL}, got {size}")
    cells = size // PATCH_CELL
    if kind == "checker":
        grid = (np.add.outer(np.arange(cells), np.arange(cells)) % 2).astype(bool)
        lo, hi = np.array([255, 255, 255]), np.array([0, 0, 0])
    elif kind == "cross":
        grid = np.zeros((cells, cells), dtype=bool)
        mid = [cells // 2 - 1, cells // 2] if cells % 2 == 0 else [cells // 2]
        grid[mid, :] = True
        grid[:, mid] = True
        lo, hi = np.array([0, 255, 255]), np.array([0, 0, 0])
    elif kind.startswith("solid:"):
        code = kind[len("solid:"):].lstrip("#")
        if len(code) != 6 or any(c not in "0123456789abcdefABCDEF" for c in code):
            raise ValueError(f"solid patch colour must be #RRGGBB, got {kind!r}")
        rgb = np.array([int(code[i:i + 2], 16) for i in (0, 2, 4)])
        return np.broadcast_to(rgb.astype(np.uint8), (size, size, 3)).copy()
    else:
        raise ValueError(f"unknown patch {kind!r}: expected 'checker', 'cross' or 'solid:#RRGGBB'")
    cell_img = np.where(grid[..., None], lo, hi).astype(np.uint8)
    return np.repeat(np.repeat(cell_img, PATCH_CELL, axis=0), PATCH_CELL, axis=1)


def corner_slices(corner: str, patch_size: int, image_size: int = IMAGE_SIZE) -> tuple[slice, slice]:
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}: expected one of {CORNERS}")
    rows = slice(0, patch_size) if corner.startswith("top") else slice(image_size - patch_size, image_size)
    cols = slice(0, patch_size) if corner.endswith("left") else slice(image_size - patch_size, image_size)
    return rows, cols


def apply_patch(images: np.ndarray, patch: np.ndarray, corner: str) -> np.ndarray:
    out = images.copy()
    rows, cols = corner_slices(corner, patch.shape[0], images.shape[-2])
    out[..., rows, cols, :] = patch
    return out


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, repeated over the three channels."""
    luma = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
