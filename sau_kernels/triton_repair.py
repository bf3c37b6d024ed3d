"""The SAU repair as one Triton kernel: an implementation of the sau::repair operator.

`sau_kernels.ops` registers `repair` and `repair_out` below as the kernels of
torch.ops.sau.repair / repair_out for the CUDA dispatch key when the Triton backend is
chosen (for the CPU key under TRITON_INTERPRET=1), so there is one operator whatever the
backend. This module imports triton; nothing imports it until that backend is used.

Each program owns one image and a BLOCK_H x BLOCK_W window of it, every channel, including
the blur halo. It reads the window of z_p, z_c and delta once from global memory as
(channels, rows, columns) tiles, reduces the channels to the mask class of each pixel,
blends y and blurs it in registers: Triton has no shared memory to shift through, so the
separable passes shift the tile with tl.gather. Columns off the image are masked rather
than reflected at the load (the horizontal pass gathers their reflections), so a window's
columns are one contiguous run; with ALIGN_HALO its halo is rounded up to 8 columns and
every access is 128-bit. With coverage asked, each program also adds the M1 and M2 counts
of its own tile to its image's row. Window shape, halo and warps are autotuned on the GPU
(`_window_configs`); the interpreter runs one fixed window. docs/kernels.md has the layout
and what `benchmarks/triton_ptx.py` reads in the compiled kernel.
"""

from __future__ import annotations

import math
import os
import re

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_H, BLOCK_W, warps) the GPU's autotuner times, each with a plain and an aligned halo
# (benchmarks/triton_ptx.py compiles each): every one is a compile on a shape's first call,
# so few. 32x32 windows keep half their columns with an aligned halo, 64x64 ones and 4 warps
# on 2048-element windows need all 255 registers (docs/kernels.md).
GPU_WINDOWS = ((16, 64, 4), (16, 64, 8), (32, 64, 8), (16, 128, 8))
_MAX_GRID_Z = 65535


@triton.jit
def _repair_window(
    zp_ptr, zc_ptr, delta_ptr, act_ptr, out_ptr, cov_ptr,
    C, H, W,
    zp_sb, zp_sc, zp_sh, zp_sw,
    zc_sb, zc_sc, zc_sh, zc_sw,
    out_sb, out_sc, out_sh, out_sw,
    cov_sb, cov_sc,
    tau1, tau2, gate, sigma,
    cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3,
    HAS_GATE: tl.constexpr, DIFFERENCE: tl.constexpr, RADIUS: tl.constexpr, HAS_COV: tl.constexpr,
    C_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN_HALO: tl.constexpr,
):
    # Columns of halo each side: the radius, or (ALIGN_HALO) the radius rounded up to 8
    # elements, so that every window starts on 16 bytes and its loads can be 128-bit.
    HALO_W: tl.constexpr = RADIUS + ALIGN_HALO * ((RADIUS + 7) // 8 * 8 - RADIUS)
    OUT_H: tl.constexpr = BLOCK_H - 2 * RADIUS
    OUT_W: tl.constexpr = BLOCK_W - 2 * HALO_W
    h0 = tl.program_id(1) * OUT_H
    ws = tl.program_id(0) * OUT_W - HALO_W  # the window's first column
    b = tl.program_id(2).to(tl.int64)
    ch = tl.arange(0, C_BLOCK)
    i = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_W)

    # Window rows, reflected (index -1 reads 1, index H reads H - 2). Past the last row
    # an in-bounds tile needs, clamp first: those rows feed no output, and the clamp keeps
    # every load in bounds. Columns are not reflected here, so that a window's columns stay
    # one contiguous run: those off the image are masked, and the horizontal pass reads
    # their reflections, which the window holds.
    hh = tl.minimum(h0 - RADIUS + i, H - 1 + RADIUS)
    hh = tl.where(hh < 0, -hh, tl.where(hh >= H, 2 * (H - 1) - hh, hh))
    ww = ws + j
    col_ok = (ww >= 0) & (ww < W)
    c3 = ch.to(tl.int64)[:, None, None]
    h3 = hh.to(tl.int64)[None, :, None]
    w3 = ww.to(tl.int64)[None, None, :]
    c_ok = (ch < C)[:, None, None]  # C_BLOCK is C rounded up to a power of two
    in_image = c_ok & col_ok[None, None, :]

    # The whole window, every channel, read once from global memory.
    zp = tl.load(zp_ptr + b * zp_sb + c3 * zp_sc + h3 * zp_sh + w3 * zp_sw, mask=in_image, other=0.0)
    zc = tl.load(zc_ptr + b * zc_sb + c3 * zc_sc + h3 * zc_sh + w3 * zc_sw, mask=in_image, other=0.0)
    d = tl.load(delta_ptr + c3 * H * W + h3 * W + w3, mask=in_image, other=0.0)
    zp = zp.to(tl.float32)
    zc = zc.to(tl.float32)

    # Cosine of v with delta over the channels, then the mask class per pixel.
    v = zp
    if DIFFERENCE:
        v = zp - zc
    dot = tl.sum(v * d, axis=0)
    vv = tl.sum(v * v, axis=0)
    dd = tl.sum(d * d, axis=0)
    # IEEE sqrt and division: the thresholds below must see the same S as the
    # C++ and CUDA kernels, not a 2-ulp approximation.
    s = tl.div_rn(dot, tl.maximum(tl.sqrt_rn(vv), 1e-8) * tl.maximum(tl.sqrt_rn(dd), 1e-8))
    a = tl.load(act_ptr + hh.to(tl.int64)[:, None] * W + ww.to(tl.int64)[None, :], mask=col_ok[None, :], other=0.0)
    m1 = s > tau1
    if HAS_GATE:
        m1 = m1 & (a > gate)
    m2 = a > tau2
    cp = tl.where(m1, tl.where(m2, cp3, cp2), tl.where(m2, cp1, cp0))
    cc = tl.where(m1, tl.where(m2, cc3, cc2), tl.where(m2, cc1, cc0))
    if HAS_COV:  # counts over the program's own tile, not its halo (exact in fp32)
        own = ((i >= RADIUS) & (i < RADIUS + OUT_H) & (h0 - RADIUS + i < H))[:, None] & \
              ((j >= HALO_W) & (j < HALO_W + OUT_W) & (ww < W))[None, :]
        tl.atomic_add(cov_ptr + b * cov_sb, tl.sum(tl.where(own & m1, 1.0, 0.0)))
        tl.atomic_add(cov_ptr + b * cov_sb + cov_sc, tl.sum(tl.where(own & m2, 1.0, 0.0)))

    y = cp[None, :, :] * zp + cc[None, :, :] * zc
    if RADIUS == 0:
        res = y
    else:
        # Taps' normaliser (the taps themselves are two flops each, recomputed).
        norm = 0.0
        for t in tl.static_range(2 * RADIUS + 1):
            norm += tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma))
        # Triton has no shared memory to shift through: the separable passes shift the
        # register tile with tl.gather. Horizontal: window column j takes columns j - r .. j
        # + r, each reflected at the image's edges (clamped where no output needs it: those
        # lanes are masked at the store). Vertical: output row i takes window rows i .. i + 2r.
        row = tl.broadcast_to(i[None, :, None], (C_BLOCK, BLOCK_H, BLOCK_W))
        hb = tl.zeros([C_BLOCK, BLOCK_H, BLOCK_W], tl.float32)
        for t in tl.static_range(2 * RADIUS + 1):
            g = tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma)) / norm
            src = ww + (t - RADIUS)
            src = tl.where(src < 0, -src, tl.where(src >= W, 2 * (W - 1) - src, src)) - ws
            src = tl.minimum(tl.maximum(src, 0), BLOCK_W - 1)
            hb += g * tl.gather(y, tl.broadcast_to(src[None, None, :], (C_BLOCK, BLOCK_H, BLOCK_W)), axis=2)
        res = tl.zeros([C_BLOCK, BLOCK_H, BLOCK_W], tl.float32)
        for t in tl.static_range(2 * RADIUS + 1):
            g = tl.exp(-((t - RADIUS) * (t - RADIUS)) / (2.0 * sigma * sigma)) / norm
            res += g * tl.gather(hb, tl.minimum(row + t, BLOCK_H - 1), axis=1)

    oh = (h0 + i).to(tl.int64)[None, :, None]
    o_mask = c_ok & ((i < OUT_H) & (h0 + i < H))[None, :, None] & \
        ((j >= HALO_W) & (j < HALO_W + OUT_W) & (ww < W))[None, None, :]
    tl.store(out_ptr + b * out_sb + c3 * out_sc + oh * out_sh + w3 * out_sw,
             res.to(out_ptr.dtype.element_ty), mask=o_mask)


def halo_columns(radius: int, align: bool) -> int:
    """Columns of halo each side of a window (HALO_W in the kernel)."""
    return -(-radius // 8) * 8 if align else radius


def _config(h: int, w: int, align: bool, warps: int):
    return triton.Config({"BLOCK_H": h, "BLOCK_W": w, "ALIGN_HALO": align}, num_warps=warps)


# Fits every radius the op allows (15): what runs when no other window does.
_FALLBACK = (64, 64, False, 4)


def pinned_window(text: str) -> tuple[int, int, bool, int]:
    """SAU_TRITON_WINDOW's value, "HxW[a][:warps]" ("16x64a:8": 16 rows, 64 columns, the
    halo aligned to 8 columns, 8 warps), as (BLOCK_H, BLOCK_W, ALIGN_HALO, warps)."""
    m = re.fullmatch(r"(\d+)x(\d+)(a?)(?::(\d+))?", text.strip())
    sizes = [int(m.group(1)), int(m.group(2)), int(m.group(4) or 4)] if m else []
    if not m or any(v < 1 or v & (v - 1) for v in sizes) or sizes[2] > 32:
        raise ValueError(f"SAU_TRITON_WINDOW={text!r}: expected HxW[a][:warps] with powers of two, "
                         "e.g. '16x64a:8' (16 rows, 64 columns, halo aligned to 8 columns, 8 warps)")
    return sizes[0], sizes[1], m.group(3) == "a", sizes[2]


def _window_configs() -> list:
    """The windows the autotuner times on the GPU (a halo of 2r rows and columns makes wide
    windows cheaper per output pixel, big ones cost registers; an aligned halo buys 128-bit
    loads with wider halo columns). One window, untimed: SAU_TRITON_WINDOW's (a pinned
    choice: no tuning on a shape's first call), or under the interpreter, whose cost is per
    program rather than per element, a big one."""
    if os.environ.get("SAU_TRITON_WINDOW"):
        return [_config(*pinned_window(os.environ["SAU_TRITON_WINDOW"]))]
    if _INTERPRET:
        return [_config(*_FALLBACK)]
    return [_config(h, w, align, warps) for h, w, warps in GPU_WINDOWS for align in (False, True)]


def _output_share(h: int, w: int, align: bool, radius: int) -> float:
    """The smaller of the shares of a window's rows and columns that are output, not halo."""
    return min((h - 2 * radius) / h, (w - 2 * halo_columns(radius, align)) / w)


def _fitting_windows(configs, named_args, **kwargs):
    """Windows with at least half of each row and column output, one of each that behaves
    alike (an aligned halo of a radius already a multiple of 8 is the plain one); if none
    does (a wide blur), the one with most output, `_FALLBACK` included."""
    radius = kwargs["RADIUS"]

    def output_share(c) -> float:
        return _output_share(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["ALIGN_HALO"], radius)

    fit, seen = [], set()
    for c in sorted(configs, key=lambda c: c.kwargs["ALIGN_HALO"]):
        same = (c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], halo_columns(radius, c.kwargs["ALIGN_HALO"]), c.num_warps)
        if output_share(c) >= 0.5 and same not in seen:
            seen.add(same)
            fit.append(c)
    return fit or [max([*configs, _config(*_FALLBACK)], key=output_share)]


# Tuned once per shape, blur, mode and dtype (triton adds the tensors' dtypes to the key),
# on the first call: warm up before capturing a CUDA graph. Timing runs add coverage counts,
# so the autotuner zeroes them before each run and before the chosen one.
_repair_tuned = triton.autotune(
    configs=_window_configs(), key=["C", "H", "W", "RADIUS", "HAS_GATE", "DIFFERENCE", "HAS_COV"],
    prune_configs_by={"early_config_prune": _fitting_windows}, reset_to_zero=["cov_ptr"],
)(_repair_window)


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
    cp, cc = blend_coeffs(k, alpha, blend)
    cov = coverage if coverage is not None else out  # a placeholder pointer when HAS_COV is off
    cov_strides = coverage.stride() if coverage is not None else (0, 0)
    if block is None and len(_repair_tuned.configs) > 1:
        kernel, window = _repair_tuned, {}
    else:  # one window: the tests' (BLOCK_H, BLOCK_W, ALIGN_HALO[, warps]), or the only config, which
        # the autotuner would launch without pruning: if it cannot hold the blur, _FALLBACK
        if block is None:
            c = _repair_tuned.configs[0]
            block = (c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["ALIGN_HALO"], c.num_warps)
            if _output_share(*block[:3], radius) <= 0:
                block = _FALLBACK
        h, w, align, warps = (*block, 4)[:4]
        kernel, window = _repair_window, dict(BLOCK_H=h, BLOCK_W=w, ALIGN_HALO=align, num_warps=warps)
    for b0 in range(0, B, _MAX_GRID_Z):  # the batch is grid axis 2, at most 65535 programs
        zp, zc, o = z_p[b0:b0 + _MAX_GRID_Z], z_c[b0:b0 + _MAX_GRID_Z], out[b0:b0 + _MAX_GRID_Z]
        cv = cov[b0:b0 + _MAX_GRID_Z] if coverage is not None else cov

        def grid(meta, n=zp.shape[0]):
            out_w = meta["BLOCK_W"] - 2 * halo_columns(radius, meta["ALIGN_HALO"])
            return (triton.cdiv(W, out_w), triton.cdiv(H, meta["BLOCK_H"] - 2 * radius), n)

        kernel[grid](
            zp, zc, delta, act, o, cv,
            C, H, W,
            *zp.stride(), *zc.stride(), *o.stride(), *cov_strides,
            tau1, tau2, 0.0 if gate is None else gate, blur_sigma if radius else 1.0,
            *cp, *cc,
            HAS_GATE=gate is not None, DIFFERENCE=similarity == "difference", RADIUS=radius,
            HAS_COV=coverage is not None, C_BLOCK=triton.next_power_of_2(C),
            **window,
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
