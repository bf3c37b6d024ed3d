"""composite="pixel": the repaired image only where the repair changed latents, the
poisoned image elsewhere (each decoded by the pipeline itself; the poisoned one in its
twin's slot)."""

from __future__ import annotations

import math

import torch

__all__ = ["pixel_mask", "composite_images", "COMPOSITE_LEVEL"]

# A latent the repair changed has w >= ~0.5 (secondary mask) or ~1 (primary); an
# untouched one sigmoid(-k/2) (0.0025 at k=12). Halfway between them splits the two.
COMPOSITE_LEVEL = 0.25


def pixel_mask(w: torch.Tensor, size, sigma_px: float) -> torch.Tensor:
    """Where the repaired image replaces the poisoned one, at image resolution: 1 on every
    latent pixel the repair changed (a latent half-swapped for the clean twin decodes to a
    clean pixel, not to a 50% mix of the poisoned one), fading out over `sigma_px` beyond
    them, so no poisoned pixel inside the region leaks through the feathering."""
    from .reference import gaussian_blur2d

    region = torch.nn.functional.interpolate((w.float() > COMPOSITE_LEVEL).float(), size=tuple(size), mode="nearest")
    if sigma_px <= 0:
        return region
    ksize = min(2 * int(round(3 * sigma_px)) + 1, 2 * (min(size) // 2) - 1)
    reach = int(math.ceil(2 * sigma_px))  # grown by 2 sigma first: the blur then stays ~1 inside
    grown = torch.nn.functional.max_pool2d(region, 2 * reach + 1, stride=1, padding=reach)
    return torch.maximum(region, gaussian_blur2d(grown, sigma_px, ksize)).clamp(0, 1)


def composite_images(images: torch.Tensor, pairs, w: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """images: the pipeline's (rows, 3, H, W) output in [0, 1]; the poisoned row of each
    pair holds the repaired image, its twin row the poisoned one."""
    P = [p for p, _ in pairs]
    T = [t for _, t in pairs]
    mask = pixel_mask(w.to(images.device), images.shape[-2:], sigma_px).to(images.dtype)
    out = images.clone()
    out[P] = mask * images[P] + (1 - mask) * images[T]
    return out
