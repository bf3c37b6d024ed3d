"""The SAU repair as one Triton kernel: an implementation of the sau::repair operator.

`sau_kernels.ops` registers `repair` and `repair_out` below as the kernels of
torch.ops.sau.repair / repair_out for the CUDA dispatch key when the Triton backend is
chosen (for the CPU key under TRITON_INTERPRET=1), so there is one operator whatever the
backend. This module imports triton; nothing imports it until that backend is used.

Each program owns one image and a BLOCK_H x BLOCK_W window of y (the blended
latent) including the blur halo, so it writes an output tile of
(BLOCK_H - 2r) x (BLOCK_W - 2r). It computes the mask class of every window
pixel once (a loop over channels), then per channel: y, the horizontal taps,
the vertical taps. Triton has no shared memory to shift through, so the
separable passes shift the register tile with tl.gather. With coverage asked,
each program also adds the M1 and M2 counts of its own tile to its image's row.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_GRID_Z = 65535


@triton.jit
def _repair_kernel(
    zp_ptr, zc_ptr, delta_ptr, act_ptr, out_ptr, cov_ptr,
    C, H, W,
    zp_sb, zp_sc, zp_sh, zp_sw,
    zc_sb, zc_sc, zc_sh, zc_sw,
    out_sb, out_sc, out_sh, out_sw,
    cov_sb, cov_sc,
    tau1, tau2, gate, sigma,
    cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3,
    HAS_GATE: tl.constexpr, DIFFERENCE: tl.constexpr, RADIUS: tl.constexpr, HAS_COV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    OUT_H: tl.constexpr = BLOCK_H - 2 * RADIUS
    OUT_W: tl.constexpr = BLOCK_W - 2 * RADIUS
    h0 = tl.program_id(1) * OUT_H
    w0 = tl.program_id(0) * OUT_W
    b = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_W)

    # Window coordinates, reflected (index -1 reads 1, index H reads H - 2).
    # Past the last row/column an in-bounds tile needs, clamp first: those
    # pixels feed no output, and the clamp keeps every load in bounds.
    hh = tl.minimum(h0 - RADIUS + i, H - 1 + RADIUS)
    hh = tl.where(hh < 0, -hh, tl.where(hh >= H, 2 * (H - 1) - hh, hh))
    ww = tl.minimum(w0 - RADIUS + j, W - 1 + RADIUS)
    ww = tl.where(ww < 0, -ww, tl.where(ww >= W, 2 * (W - 1) - ww, ww))
    hh = hh.to(tl.int64)[:, None]
    ww = ww.to(tl.int64)[None, :]
    zp_win = zp_ptr + b * zp_sb + hh * zp_sh + ww * zp_sw
    zc_win = zc_ptr + b * zc_sb + hh * zc_sh + ww * zc_sw
    dl_off = hh * W + ww

    # Cosine of v with delta over the channels, then the mask class per pixel.
    dot = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    vv = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    dd = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    p_ptr = zp_win
    q_ptr = zc_win
    d_ptr = delta_ptr + dl_off
    for _c in range(C):
        v = tl.load(p_ptr).to(tl.float32)
        if DIFFERENCE:
            v = v - tl.load(q_ptr).to(tl.float32)
        d = tl.load(d_ptr)
        dot += v * d
        vv += v * v
        dd += d * d
        p_ptr += zp_sc
        q_ptr += zc_sc
        d_ptr += H * W
    # IEEE sqrt and division: the thresholds below must see the same S as the
    # C++ and CUDA kernels, not a 2-ulp approximation.
    s = tl.div_rn(dot, tl.maximum(tl.sqrt_rn(vv), 1e-8) * tl.maximum(tl.sqrt_rn(dd), 1e-8))
    a = tl.load(act_ptr + dl_off)
    m1 = s > tau1
    if HAS_GATE:
        m1 = m1 & (a > gate)
    m2 = a > tau2
    cp = tl.where(m1, tl.where(m2, cp3, cp2), tl.where(m2, cp1, cp0))
    cc = tl.where(m1, tl.where(m2, cc3, cc2), tl.where(m2, cc1, cc0))
    if HAS_COV:  # counts over the program's own tile, not its halo (exact in fp32)
        own = ((i >= RADIUS) & (i < RADIUS + OUT_H) & (h0 - RADIUS + i < H))[:, None] & \
              ((j >= RADIUS) & (j < RADIUS + OUT_W) & (w0 - RADIUS + j < W))[None, :]
        tl.atomic_add(cov_ptr + b * cov_sb, tl.sum(tl.where(own & m1, 1.0, 0.0)))
        tl.atomic_add(cov_ptr + b * cov_sb + cov_sc, tl.sum(tl.where(own & m2, 1.0, 0.0)))

    # Taps' normaliser (the taps themselves are two flops each, recomputed).
    norm = 0.0
    for t in tl.static_range(2 * RADIUS + 1):
        norm += tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma))

    oh = h0 + i
    ow = w0 + j
    o_mask = ((i < OUT_H) & (oh < H))[:, None] & ((j < OUT_W) & (ow < W))[None, :]
    o_ptr = out_ptr + b * out_sb + oh.to(tl.int64)[:, None] * out_sh + ow.to(tl.int64)[None, :] * out_sw
    # Index j + t of the window for output column j (clamped: masked lanes only).
    col = tl.broadcast_to(j[None, :], (BLOCK_H, BLOCK_W))
    row = tl.broadcast_to(i[:, None], (BLOCK_H, BLOCK_W))
    p_ptr = zp_win
    q_ptr = zc_win
    for _c in range(C):
        y = cp * tl.load(p_ptr).to(tl.float32) + cc * tl.load(q_ptr).to(tl.float32)
        if RADIUS == 0:
            res = y
        else:
            hb = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
            for t in tl.static_range(2 * RADIUS + 1):
                g = tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma)) / norm
                hb += g * tl.gather(y, tl.minimum(col + t, BLOCK_W - 1), axis=1)
            res = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
            for t in tl.static_range(2 * RADIUS + 1):
                g = tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma)) / norm
                res += g * tl.gather(hb, tl.minimum(row + t, BLOCK_H - 1), axis=0)
        tl.store(o_ptr, res.to(out_ptr.dtype.element_ty), mask=o_mask)
        p_ptr += zp_sc
        q_ptr += zc_sc
        o_ptr += out_sc


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def blend_coeffs(k: float, alpha: float, blend: str) -> tuple[list[float], list[float]]:
    """(z_p, z_c) weights for cls = 2*M1 + M2, as sau_blend_coeffs in csrc/sau_repair.h."""
    cp, cc = [], []
    for cls in range(4):
        m1 = _sigmoid(k * ((cls >> 1) - 0.5))
        m2 = _sigmoid(k * ((cls & 1) - 0.5))
        if blend == "paper":
            cp.append((1 - m1) * (1 - m2))
            cc.append(alpha * m1 + 0.5 * alpha * m2)
        else:
            w = 1 - (1 - alpha * m1) * (1 - 0.5 * alpha * m2)
            cp.append(1 - w)
            cc.append(w)
    return cp, cc


def _launch(z_p, z_c, delta, act, out, coverage, tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend,
            similarity, gate, block=None):
    """out (and coverage, unless None) from checked inputs; delta and act fp32 contiguous."""
    B, C, H, W = z_p.shape
    if coverage is not None:
        coverage.zero_()
    if B == 0:
        return
    radius = 0 if blur_ksize == 1 or blur_sigma == 0 else blur_ksize // 2
    # The window must outgrow its halo; 32 keeps 28 of 32 columns useful at r = 2.
    # The interpreter's cost is per program, not per element: use big windows there.
    if block is None:
        block = 32 if radius <= 7 and not _INTERPRET else 64
    out_tile = block - 2 * radius
    cp, cc = blend_coeffs(k, alpha, blend)
    cov = coverage if coverage is not None else out  # a placeholder pointer when HAS_COV is off
    cov_strides = coverage.stride() if coverage is not None else (0, 0)
    for b0 in range(0, B, _MAX_GRID_Z):  # the batch is grid axis 2, at most 65535 programs
        zp, zc, o = z_p[b0:b0 + _MAX_GRID_Z], z_c[b0:b0 + _MAX_GRID_Z], out[b0:b0 + _MAX_GRID_Z]
        cv = cov[b0:b0 + _MAX_GRID_Z] if coverage is not None else cov
        grid = (triton.cdiv(W, out_tile), triton.cdiv(H, out_tile), zp.shape[0])
        _repair_kernel[grid](
            zp, zc, delta, act, o, cv,
            C, H, W,
            *zp.stride(), *zc.stride(), *o.stride(), *cov_strides,
            tau1, tau2, 0.0 if gate is None else gate, blur_sigma if radius else 1.0,
            *cp, *cc,
            HAS_GATE=gate is not None, DIFFERENCE=similarity == "difference", RADIUS=radius,
            HAS_COV=coverage is not None,
            BLOCK_H=block, BLOCK_W=block,
            num_warps=4,
        )
    if coverage is not None:
        coverage.div_(H * W)  # counts -> means (fp32 division, as torch's mean of the mask)


# The kernels of torch.ops.sau.repair / repair_out for the dispatch key ops.py registers them
# for: the schema's arguments, the same checks as the C++ kernels (sau_kernels.ops), then launch.
def repair(z_p, z_c, delta, act, tau1=0.5, tau2=0.3, k=12.0, alpha=1.0, blur_sigma=0.2, blur_ksize=5,
           blend="convex", similarity="latent", gate=None):
    from .ops import check_inputs

    check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate)
    out = torch.empty(z_p.shape, dtype=z_p.dtype, device=z_p.device)
    _launch(z_p, z_c, delta.to(torch.float32).contiguous(), act.to(torch.float32).contiguous(), out, None,
            tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate)
    return out


def repair_out(z_p, z_c, delta, act, tau1=0.5, tau2=0.3, k=12.0, alpha=1.0, blur_sigma=0.2, blur_ksize=5,
               blend="convex", similarity="latent", gate=None, *, out, coverage=None):
    from .ops import check_inputs

    check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out, coverage)
    _launch(z_p, z_c, delta.to(torch.float32).contiguous(), act.to(torch.float32).contiguous(), out, coverage,
            tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate)
