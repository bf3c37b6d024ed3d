"""Inputs and assertions shared by the repair tests (CPU and GPU)."""

from __future__ import annotations

import torch

# Tolerances per storage dtype, derived rather than tuned: every backend computes
# the same fp32 value up to summation order (a few fp32 ulp, covered by 1e-5 on
# values of order 1), then rounds once to the storage dtype, so fp16/bf16 results
# may differ from the reference by one ulp of that dtype: rtol = 2^-10 (fp16,
# 10 mantissa bits) and 2^-7 (bf16, 7 bits). atol covers values near zero.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=2.0**-10),
    torch.bfloat16: dict(atol=1e-5, rtol=2.0**-7),
}

# Keep every pixel's similarity and act at least this far from the thresholds.
# Backends legitimately round S differently in the last fp32 bits (~1e-7); a
# pixel within that of tau1 would flip M1 on one backend and not another, and
# that pixel's output would differ by up to |z_p - z_c|: a flaky test, not a bug.
MARGIN = 1e-3


def similarity_map(z_p, z_c, delta, similarity):
    """S in float64 from the values the kernels see (fp32 upcast of the storage dtype)."""
    v = z_p.float() if similarity == "latent" else z_p.float() - z_c.float()
    v, d = v.double(), delta.float().double()
    dot = (v * d).sum(1)
    return dot / (v.norm(dim=1).clamp_min(1e-8) * d.norm(dim=0).clamp_min(1e-8))


def make_inputs(shape, dtype=torch.float32, *, similarity="latent", tau1=0.5, tau2=0.3, gate=None,
                seed=0, device="cpu"):
    """z_p, z_c, delta, act with a trigger-like patch and no pixel near a threshold (see MARGIN)."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(C, H, W, generator=g) + 0.1
    act = torch.rand(H, W, generator=g)
    z_c = torch.randn(B, C, H, W, generator=g)
    z_p = z_c + 0.5 * torch.randn(B, C, H, W, generator=g)
    # A "trigger" patch where z_p moves along delta, so M1 fires on a region
    # (random 4-channel vectors would also pass S > 0.5 about 20% of the time).
    z_p[:, :, : max(1, H // 3), : max(1, W // 3)] += 2.0 * delta[:, : max(1, H // 3), : max(1, W // 3)]
    z_p, z_c = z_p.to(dtype), z_c.to(dtype)

    for _ in range(50):  # resample z_p where S is too close to tau1
        near = (similarity_map(z_p, z_c, delta, similarity) - tau1).abs() < MARGIN  # (B, H, W)
        if not near.any():
            break
        fresh = torch.randn(B, C, H, W, generator=g).to(dtype)
        z_p = torch.where(near.unsqueeze(1), fresh, z_p)
    else:
        raise RuntimeError("could not move every similarity away from tau1")

    thresholds = [tau2] + ([gate] if gate is not None else [])
    for _ in range(50):  # nudge act away from tau2 and gate
        near = torch.zeros(H, W, dtype=torch.bool)
        for t in thresholds:
            near |= (act - t).abs() < MARGIN
        if not near.any():
            break
        act = torch.where(near, act + 3 * MARGIN, act)
    else:
        raise RuntimeError("could not move act away from its thresholds")

    return tuple(t.to(device) for t in (z_p, z_c, delta, act))


def assert_close_report(actual, expected, *, atol, rtol, label="", max_listed=5):
    """assert_close that says how many elements differ, where, and by how much."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN anywhere counts as a mismatch
    bad |= a.isnan() ^ e.isnan()
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    idx = bad.nonzero()
    lines = [
        f"{label}: {n_bad} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs error {float(err[bad].max()):.3g}"
    ]
    for i in idx[:max_listed].tolist():
        t = tuple(i)
        lines.append(f"  at {t}: got {float(a[t]):.8g}, expected {float(e[t]):.8g}")
    if n_bad > max_listed:
        lines.append(f"  ... and {n_bad - max_listed} more")
    raise AssertionError("\n".join(lines))


def assert_matches_reference(actual, expected, dtype, label=""):
    assert_close_report(actual, expected, label=label, **TOLERANCES[dtype])
