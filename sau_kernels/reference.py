"""docs/method.md, sections 2-4, in eager PyTorch: the oracle every backend is tested against.

Written for clarity, not speed: each line is one formula of the spec. All
arithmetic is fp32 whatever the storage dtype; the result is cast back to
z_p's dtype. No argument checking here: `sau_kernels.ops` validates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def gaussian_taps(sigma: float, ksize: int, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (fp32). ksize 1 or sigma 0 is the identity."""
    if ksize == 1 or sigma == 0:
        return torch.ones(1, dtype=torch.float32, device=device)
    x = torch.arange(ksize, dtype=torch.float32, device=device) - ksize // 2
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def gaussian_blur2d(x: torch.Tensor, sigma: float, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur of the last two dims (rows, then columns), reflect border.

    Same as kornia.filters.gaussian_blur2d(..., border_type="reflect").
    """
    taps = gaussian_taps(sigma, ksize, device=x.device)
    r = (taps.numel() - 1) // 2
    if r == 0:
        return x.clone()
    H, W = x.shape[-2:]
    x4 = F.pad(x.reshape(-1, 1, H, W), (r, r, r, r), mode="reflect")
    x4 = F.conv2d(x4, taps.view(1, 1, 1, -1))  # along W
    x4 = F.conv2d(x4, taps.view(1, 1, -1, 1))  # along H
    return x4.reshape(x.shape)


def cosine_map(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """S[b,h,w] = <v, delta> / (max(|v|, eps) * max(|delta|, eps)) over channels."""
    dot = (v * delta).sum(dim=1)
    nv = torch.linalg.vector_norm(v, dim=1).clamp_min(EPS)
    nd = torch.linalg.vector_norm(delta, dim=0).clamp_min(EPS)
    return dot / (nv * nd)


def secondary_map(delta: torch.Tensor, sigma: float = 2.0, ksize: int = 5) -> torch.Tensor:
    """act = G(min-max normalised channel L2 norm of delta), (H, W) fp32 (spec section 2)."""
    a = torch.linalg.vector_norm(delta.float(), dim=0)
    lo, hi = a.min(), a.max()
    # torch.where instead of `if hi == lo`: no host sync; a constant map gives zeros.
    a_hat = torch.where(hi > lo, (a - lo) / (hi - lo), torch.zeros_like(a))
    return gaussian_blur2d(a_hat, sigma, ksize)


def repair_masks(
    z_p: torch.Tensor,
    z_c: torch.Tensor,
    delta: torch.Tensor,
    act: torch.Tensor,
    *,
    tau1: float = 0.5,
    tau2: float = 0.3,
    k: float = 12.0,
    alpha: float = 1.0,
    similarity: str = "latent",
    gate: float | None = None,
    blend: str = "convex",
) -> dict[str, torch.Tensor]:
    """The masks of spec section 3, (B, 1, H, W) fp32 each.

    s: the similarity map; M1, M2: the hard masks (0/1); m1, m2: their sigmoids; w: the
    share of z_c in the convex blend (what "paper" replaces too, without its scaling).
    `blend` is accepted (and ignored) so that repair's keywords pass straight through.
    """
    zp, zc = z_p.float(), z_c.float()
    d, a = delta.float(), act.float()
    v = zp if similarity == "latent" else zp - zc
    s = cosine_map(v, d)  # (B, H, W)

    M1 = s > tau1
    if gate is not None:
        M1 = M1 & (a > gate)
    M2 = (a > tau2).expand_as(M1)
    m1 = torch.sigmoid(k * (M1.float() - 0.5)).unsqueeze(1)  # (B, 1, H, W)
    m2 = torch.sigmoid(k * (M2.float() - 0.5)).unsqueeze(1)
    w = 1 - (1 - alpha * m1) * (1 - (alpha / 2) * m2)
    return {"s": s.unsqueeze(1), "M1": M1.float().unsqueeze(1), "M2": M2.float().unsqueeze(1),
            "m1": m1, "m2": m2, "w": w}


def repair_coverage(z_p: torch.Tensor, z_c: torch.Tensor, delta: torch.Tensor, act: torch.Tensor,
                    **params) -> torch.Tensor:
    """Mask coverage, (B, 2) fp32: per image the mean over H x W of M1 (column 0) and of
    M2 (column 1). `params` are repair's; those the masks do not use are ignored."""
    keys = ("tau1", "tau2", "k", "alpha", "similarity", "gate")
    masks = repair_masks(z_p, z_c, delta, act, **{k: v for k, v in params.items() if k in keys})
    return torch.stack([masks["M1"].mean(dim=(1, 2, 3)), masks["M2"].mean(dim=(1, 2, 3))], dim=1)


def repair(
    z_p: torch.Tensor,
    z_c: torch.Tensor,
    delta: torch.Tensor,
    act: torch.Tensor,
    *,
    tau1: float = 0.5,
    tau2: float = 0.3,
    k: float = 12.0,
    alpha: float = 1.0,
    blur_sigma: float = 0.2,
    blur_ksize: int = 5,
    blend: str = "convex",
    similarity: str = "latent",
    gate: float | None = None,
) -> torch.Tensor:
    """The SAU repair of spec section 3: blend z_p towards z_c where the trigger acts, then blur."""
    zp, zc = z_p.float(), z_c.float()
    masks = repair_masks(z_p, z_c, delta, act, tau1=tau1, tau2=tau2, k=k, alpha=alpha,
                         similarity=similarity, gate=gate)
    m1, m2 = masks["m1"], masks["m2"]

    if blend == "paper":
        y = zp * (1 - m1) * (1 - m2) + alpha * m1 * zc + (alpha / 2) * m2 * zc
    else:
        w = masks["w"]
        y = (1 - w) * zp + w * zc

    return gaussian_blur2d(y, blur_sigma, blur_ksize).to(z_p.dtype)
