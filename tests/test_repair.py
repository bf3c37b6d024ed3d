"""The repair op: reference against independent implementations, every backend against the
reference, the op's registration (opcheck, torch.compile, out=), layouts and bad input."""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sau_kernels as sk
from sau_kernels import reference
from sau_kernels.ops import MAX_KSIZE, _use

from repair_helpers import assert_close_report, assert_matches_reference, make_inputs

CPU_BACKENDS = sk.available_backends("cpu")
HAS_TRITON = "triton" in CPU_BACKENDS

SHAPES = {
    "sd15": (1, 4, 64, 64),
    "sd15_batch2_768": (2, 4, 96, 96),
    "odd": (3, 4, 37, 53),
    "narrow_8ch": (1, 8, 20, 11),
    "smallest": None,  # H = W = blur_ksize // 2 + 1, resolved per case
}
BLUR = [(k, s) for k in (1, 3, 5, 7) for s in (0.2, 2.0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _shape(name, ksize):
    if SHAPES[name] is None:
        n = ksize // 2 + 1
        return (2, 4, n, n)
    return SHAPES[name]


def _check_backend(backend, shape, dtype, blend, similarity, gate, ksize, sigma, seed=0):
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=similarity, gate=gate, seed=seed)
    params = dict(blend=blend, similarity=similarity, gate=gate, blur_ksize=ksize, blur_sigma=sigma)
    expected = reference.repair(z_p, z_c, delta, act, **params)
    actual = sk.repair(z_p, z_c, delta, act, backend=backend, **params)
    assert_matches_reference(actual, expected, dtype, label=f"{backend} {shape} {dtype} {params}")


# ---------------------------------------------------------------------------
# The reference against independent implementations of its pieces
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ksize,sigma", BLUR + [(9, 1.3)])
def test_reference_blur_matches_kornia(ksize, sigma):
    kornia = pytest.importorskip("kornia")
    x = torch.randn(2, 3, 17, 23, generator=torch.Generator().manual_seed(ksize))
    expected = kornia.filters.gaussian_blur2d(x, (ksize, ksize), (sigma, sigma), border_type="reflect")
    assert_close_report(reference.gaussian_blur2d(x, sigma, ksize), expected, atol=1e-6, rtol=1e-6,
                        label="blur vs kornia")


def test_reference_blur_reflects_without_repeating_the_edge():
    # 1-D check by hand: with taps (a, b, a), out[0] = a*x[1] + b*x[0] + a*x[1].
    x = torch.tensor([[1.0, 2.0, 4.0]]).expand(3, 3).contiguous()
    g = reference.gaussian_taps(1.0, 3)
    out = reference.gaussian_blur2d(x, 1.0, 3)
    a, b = g[0].item(), g[1].item()
    assert out[1, 0].item() == pytest.approx(2 * a * 2.0 + b * 1.0, rel=1e-6)
    assert out[1, 2].item() == pytest.approx(2 * a * 2.0 + b * 4.0, rel=1e-6)


def test_reference_taps():
    g = reference.gaussian_taps(2.0, 7)
    assert g.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(g, g.flip(0))
    assert g.argmax().item() == 3
    assert reference.gaussian_taps(0.0, 5).tolist() == [1.0]  # sigma 0: identity
    assert reference.gaussian_taps(0.7, 1).tolist() == [1.0]


def test_reference_cosine_matches_torch():
    # torch clamps the product of the norms at eps, the spec each norm: equal for norms >> eps.
    g = torch.Generator().manual_seed(1)
    v, d = torch.randn(3, 4, 9, 7, generator=g), torch.randn(4, 9, 7, generator=g)
    expected = F.cosine_similarity(v, d.unsqueeze(0), dim=1, eps=1e-8)
    assert_close_report(reference.cosine_map(v, d), expected, atol=1e-6, rtol=1e-6, label="cosine")


def test_reference_blend_by_hand():
    # One pixel per mask combination, no blur, delta = e0 everywhere:
    # (0,0) S=1 act=.9 -> M1 M2; (0,1) S=1 act=.1 -> M1; (1,0) S=-1 act=.9 -> M2; (1,1) neither.
    delta = torch.zeros(2, 2, 2)
    delta[0] = 1.0
    z_p = torch.zeros(1, 2, 2, 2)
    z_p[0, 0] = torch.tensor([[3.0, 3.0], [-3.0, -3.0]])
    z_c = torch.full((1, 2, 2, 2), 2.0)
    act = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    k, alpha = 12.0, 0.8
    hi, lo = 1 / (1 + math.exp(-k / 2)), 1 / (1 + math.exp(k / 2))  # sigmoid(+-k/2)
    common = dict(k=k, alpha=alpha, blur_ksize=1)

    paper = reference.repair(z_p, z_c, delta, act, blend="paper", **common)[0, 0]
    convex = reference.repair(z_p, z_c, delta, act, blend="convex", **common)[0, 0]
    for (h, w), (m1, m2) in {(0, 0): (hi, hi), (0, 1): (hi, lo), (1, 0): (lo, hi), (1, 1): (lo, lo)}.items():
        zp, zc = z_p[0, 0, h, w].item(), 2.0
        assert paper[h, w].item() == pytest.approx(
            zp * (1 - m1) * (1 - m2) + alpha * m1 * zc + alpha / 2 * m2 * zc, rel=1e-5)
        wgt = 1 - (1 - alpha * m1) * (1 - alpha / 2 * m2)
        assert convex[h, w].item() == pytest.approx((1 - wgt) * zp + wgt * zc, rel=1e-5)
    # The spec's remark: where both masks fire, "paper" scales z_c by about 1 + alpha/2.
    assert paper[0, 0].item() == pytest.approx((alpha + alpha / 2) * 2.0, rel=1e-2)


def test_reference_gate_and_difference():
    z_p, z_c, delta, act = make_inputs((1, 4, 16, 16), gate=0.6, similarity="difference")
    masks_free = reference.repair_masks(z_p, z_c, delta, act, similarity="difference")
    masks_gated = reference.repair_masks(z_p, z_c, delta, act, similarity="difference", gate=0.6)
    expected = masks_free["M1"] * (act > 0.6).float()
    assert torch.equal(masks_gated["M1"], expected)
    assert masks_gated["M1"].sum() > 0  # the test inputs do exercise the mask


def test_secondary_map_follows_spec():
    kornia = pytest.importorskip("kornia")
    delta = torch.randn(4, 12, 10, generator=torch.Generator().manual_seed(3))
    a = delta.norm(dim=0)
    a_hat = (a - a.min()) / (a.max() - a.min())
    expected = kornia.filters.gaussian_blur2d(a_hat[None, None], (5, 5), (2.0, 2.0), border_type="reflect")[0, 0]
    assert_close_report(sk.secondary_map(delta), expected, atol=1e-6, rtol=1e-6, label="secondary_map")
    assert torch.equal(sk.secondary_map(torch.ones(4, 12, 10)), torch.zeros(12, 10))


def test_secondary_map_rejects_bad_input():
    with pytest.raises(ValueError, match="delta must be"):
        sk.secondary_map(torch.randn(4, 12))
    with pytest.raises(TypeError, match="float tensor"):
        sk.secondary_map(torch.ones(4, 12, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="blur_ksize"):
        sk.secondary_map(torch.randn(4, 12, 10), ksize=4)
    with pytest.raises(ValueError, match="blur_sigma"):
        sk.secondary_map(torch.randn(4, 12, 10), sigma=-1.0)
    with pytest.raises(ValueError, match="reflect border"):
        sk.secondary_map(torch.randn(4, 2, 10), ksize=5)


# ---------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------

GRID = list(itertools.product(SHAPES, DTYPES, ("convex", "paper"), ("latent", "difference"),
                              (None, 0.45), BLUR))


def _grid_id(case):
    shape, dtype, blend, sim, gate, (ksize, sigma) = case
    return f"{shape}-{str(dtype)[6:]}-{blend}-{sim}-gate{gate}-k{ksize}s{sigma}"


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_cpp_matches_reference(case):
    shape, dtype, blend, sim, gate, (ksize, sigma) = case
    _check_backend("cpp", _shape(shape, ksize), dtype, blend, sim, gate, ksize, sigma)


# The interpreter runs a Triton program in ~0.1 s: a fixed sample of the grid,
# covering every shape, dtype, blend, similarity and blur at least once.
def _triton_sample():
    rng = random.Random(0)
    sample = rng.sample(GRID, 14)
    for axis in range(6):
        for value in {case[axis] for case in GRID} - {case[axis] for case in sample}:
            sample.append(next(c for c in GRID if c[axis] == value and c not in sample))
    return sample


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", _triton_sample(), ids=_grid_id)
def test_triton_matches_reference(case):
    shape, dtype, blend, sim, gate, (ksize, sigma) = case
    _check_backend("triton", _shape(shape, ksize), dtype, blend, sim, gate, ksize, sigma)


def _triton_gpu_compiler() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_gpu_compiler(), reason="triton's NVIDIA backend is not installed")
def test_triton_kernel_compiles_for_the_gpu(tmp_path):
    # Without a GPU: every window the autotuner times lowers to PTX and assembles for sm_90
    # (fp16, every mode on, contiguous 64x64 latents), so a kernel the GPU cannot compile
    # fails here, not on first use.
    from sau_kernels.triton_repair import GPU_WINDOWS

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_ptx.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    compiled = [line for line in res.stdout.splitlines() if "registers" in line]
    assert len(compiled) == 2 * len(GPU_WINDOWS), res.stdout  # each window, plain and aligned halo
    # windows whose halo is aligned to 8 columns read and write in 128-bit accesses only
    aligned = [line for line in compiled if "halo  8" in line]
    assert len(aligned) == len(GPU_WINDOWS)
    for line in aligned:
        loads, stores = line.split("; loads ")[1].split("; stores ")
        assert set(re.findall(r"x (\d+) B", loads)) == {"16"} and set(re.findall(r"x (\d+) B", stores)) == {"16"}, line


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_a_pinned_triton_window_is_used_and_falls_back_when_the_blur_outgrows_it():
    # SAU_TRITON_WINDOW pins one window (no tuning): a 16x32 aligned-halo window runs radius 2,
    # and radius 15 (30 rows of halo) falls back to a window that holds it.
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from sau_kernels import triton_repair, reference\n"
        "from repair_helpers import make_inputs, assert_matches_reference\n"
        "[c] = triton_repair._repair_tuned.configs\n"
        "assert (c.kwargs['BLOCK_H'], c.kwargs['BLOCK_W'], c.kwargs['ALIGN_HALO'], c.num_warps) == (16, 32, True, 8)\n"
        "for ksize in (5, 31):\n"
        "    z_p, z_c, delta, act = make_inputs((1, 4, 40, 37), seed=3)\n"
        "    out, cov = torch.empty_like(z_p), torch.empty(1, 2)\n"
        "    triton_repair._launch(z_p, z_c, delta, act, out, cov, 0.5, 0.3, 12.0, 1.0, 1.0, ksize, 'convex',\n"
        "                          'latent', None)\n"
        "    expected = reference.repair(z_p, z_c, delta, act, blur_sigma=1.0, blur_ksize=ksize)\n"
        "    assert_matches_reference(out, expected, torch.float32)\n"
        "    assert torch.equal(cov, reference.repair_coverage(z_p, z_c, delta, act))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", SAU_TRITON_WINDOW="16x32a:8")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.join(os.path.dirname(__file__), ".."), timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_the_autotuner_times_only_windows_that_hold_the_blur():
    from sau_kernels import triton_repair as tr

    configs = [tr._config(h, w, align, warps) for h, w, warps in tr.GPU_WINDOWS for align in (False, True)]

    def kept(radius):
        return {(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["ALIGN_HALO"])
                for c in tr._fitting_windows(configs, {}, RADIUS=radius)}

    assert len(kept(2)) == 6  # every window shape (3), both halos (warps aside)
    assert all(not align for _, _, align in kept(0))  # no halo: the aligned one is the same window
    assert kept(7) == {(32, 64, False), (32, 64, True)}  # 16-row windows would be mostly halo
    assert kept(8) == {(32, 64, False)}  # an 8-column halo is already aligned
    for radius in (9, 15):  # nothing of the GPU's holds it: the 64x64 fallback
        assert kept(radius) == {(64, 64, False)}


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_a_malformed_pinned_triton_window_is_named():
    from sau_kernels.triton_repair import pinned_window

    assert pinned_window("16x64") == (16, 64, False, 4)
    assert pinned_window(" 32x128a:8 ") == (32, 128, True, 8)
    for bad in ("16x48", "16x64b", "64", "16x64a:3", "16x64:64", "0x64"):
        with pytest.raises(ValueError, match="SAU_TRITON_WINDOW"):
            pinned_window(bad)


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape,ksize,block", [
    ((2, 3, 45, 70), 5, (32, 32, False)), ((2, 3, 45, 70), 5, (16, 64, False)), ((2, 3, 45, 70), 5, (16, 128, False)),
    ((2, 3, 45, 70), 5, (16, 64, True)), ((2, 3, 45, 70), 5, (32, 32, True)),  # halo 8: 16 of 32 columns out
    ((1, 4, 9, 6), 5, (16, 32, True)),  # the whole image inside one window, both edges reflected in it
    ((1, 2, 40, 37), 15, (32, 64, True)), ((1, 2, 40, 37), 19, (64, 64, True)),  # halos of 8 and 16
])
def test_triton_small_window_tiles(shape, ksize, block):
    # The windows the GPU's autotuner chooses among (the interpreter runs 64 x 64, plain
    # halo): several tiles per image, channels rounded up to a power of two (masked), plain
    # halos and halos aligned to 8 columns.
    from sau_kernels import triton_repair

    z_p, z_c, delta, act = make_inputs(shape, seed=5)
    out, coverage = torch.empty_like(z_p), torch.full((shape[0], 2), float("nan"))
    triton_repair._launch(z_p, z_c, delta, act, out, coverage, 0.5, 0.3, 12.0, 1.0, 1.0, ksize, "convex", "latent",
                          None, block=block)
    expected = reference.repair(z_p, z_c, delta, act, blur_sigma=1.0, blur_ksize=ksize)
    assert_matches_reference(out, expected, torch.float32)
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_parameters(backend):
    z_p, z_c, delta, act = make_inputs((1, 4, 24, 24), seed=7)
    assert_matches_reference(sk.repair(z_p, z_c, delta, act, backend=backend),
                             reference.repair(z_p, z_c, delta, act), torch.float32, label=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    z = torch.empty(0, 4, 8, 8)
    out = sk.repair(z, z, torch.randn(4, 8, 8), torch.rand(8, 8), backend=backend)
    assert out.shape == (0, 4, 8, 8)


# ---------------------------------------------------------------------------
# Mask coverage (return_coverage=True)
# ---------------------------------------------------------------------------

COVERAGE_CASES = [
    ((1, 4, 64, 64), torch.float32, "convex", "latent", None, (5, 0.2)),
    ((3, 4, 37, 53), torch.float16, "paper", "difference", 0.45, (3, 2.0)),
    ((2, 8, 20, 11), torch.bfloat16, "convex", "difference", None, (7, 2.0)),
    ((2, 4, 1, 1), torch.float32, "paper", "latent", 0.45, (1, 0.2)),
    ((2, 4, 4, 4), torch.float16, "convex", "latent", None, (7, 0.2)),  # smallest legal for k=7
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", COVERAGE_CASES, ids=str)
def test_coverage_matches_reference(backend, case):
    shape, dtype, blend, similarity, gate, (ksize, sigma) = case
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=similarity, gate=gate, seed=31)
    params = dict(blend=blend, similarity=similarity, gate=gate, blur_ksize=ksize, blur_sigma=sigma)
    out, coverage = sk.repair(z_p, z_c, delta, act, backend=backend, return_coverage=True, **params)
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, **params), dtype, label=backend)
    assert coverage.shape == (shape[0], 2) and coverage.dtype == torch.float32 and coverage.device == z_p.device
    # Exactly the means the pipeline reads off the reference's masks, image by image.
    masks = reference.repair_masks(z_p, z_c, delta, act, blend=blend, similarity=similarity, gate=gate)
    for i in range(shape[0]):
        assert coverage[i, 0] == masks["M1"][i].mean(), (backend, i, "M1")
        assert coverage[i, 1] == masks["M2"][i].mean(), (backend, i, "M2")
    if shape[2] * shape[3] >= 16:
        assert masks["M1"].sum() > 0 and masks["M2"].sum() > 0  # both columns are exercised


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
def test_coverage_over_row_blocks():
    # With more threads than images, the C++ kernel splits each image into row blocks, each
    # counting its own rows: the counts must add up to the image's, not count halos twice.
    z_p, z_c, delta, act = make_inputs((1, 4, 96, 80), seed=37, gate=0.4)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _, coverage = sk.repair(z_p, z_c, delta, act, gate=0.4, blur_ksize=7, blur_sigma=2.0,
                                backend="cpp", return_coverage=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act, gate=0.4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coverage_with_out(backend):
    z_p, z_c, delta, act = make_inputs((2, 4, 21, 17), torch.float16, seed=41)
    out = torch.full_like(z_p, float("nan")).transpose(2, 3).contiguous().transpose(2, 3)
    result, coverage = sk.repair(z_p, z_c, delta, act, backend=backend, out=out, return_coverage=True)
    assert result is out
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act), torch.float16, label=backend)
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act))
    empty = torch.empty(0, 4, 8, 8)
    out, coverage = sk.repair(empty, empty, delta[:, :8, :8], act[:8, :8], backend=backend, return_coverage=True)
    assert out.shape == (0, 4, 8, 8) and coverage.shape == (0, 2)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
def test_coverage_out_op_allocates_nothing():
    _use("cpu", "cpp")
    z_p, z_c, delta, act = make_inputs((2, 4, 32, 32), seed=43)
    out, coverage = torch.empty_like(z_p), torch.empty(2, 2)
    args = (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    torch.ops.sau.repair_out(*args, out=out, coverage=coverage)  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ops.sau.repair_out(*args, out=out, coverage=coverage)
    events = [e for e in prof.events() if e.name.startswith("sau::repair")]
    assert events and sum(e.cpu_memory_usage for e in events) == 0
    assert torch.equal(coverage, reference.repair_coverage(z_p, z_c, delta, act))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_coverage(backend):
    torch._dynamo.reset()
    z_p, z_c, delta, act = make_inputs((2, 4, 12, 12), seed=47)

    def f(z_p, z_c, delta, act):
        out, coverage = sk.repair(z_p, z_c, delta, act, gate=0.5, backend=backend, return_coverage=True)
        return out * 2, coverage[:, 0] + coverage[:, 1]

    out, total = torch.compile(f, fullgraph=True, backend="aot_eager")(z_p, z_c, delta, act)
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, gate=0.5) * 2, torch.float32, label=backend)
    assert torch.equal(total, reference.repair_coverage(z_p, z_c, delta, act, gate=0.5).sum(1))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
@pytest.mark.parametrize("name,coverage,exc,match", [
    ("shape", torch.empty(3, 2), ValueError, r"coverage shape"),
    ("dtype", torch.empty(2, 2, dtype=torch.float64), TypeError, "coverage must be float32"),
    ("device", torch.empty(2, 2, device="meta"), ValueError, "coverage device"),
    ("expanded", torch.empty(1, 2).expand(2, 2), ValueError, "share memory"),
])
def test_bad_coverage_raises(name, coverage, exc, match):
    g = _good()
    args = (g["z_p"], g["z_c"], g["delta"], g["act"], 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    for impl in CPU_BACKENDS[1:]:  # each implementation of the operator, C++ and Triton
        _use("cpu", impl)
        with pytest.raises(exc, match=match):
            torch.ops.sau.repair_out(*args, out=torch.empty_like(g["z_p"]), coverage=coverage)
    _use("cpu", "cpp")


# ---------------------------------------------------------------------------
# Layouts, out=, registration
# ---------------------------------------------------------------------------


def _layouts(z):
    """Non-contiguous views with the same values as z (B, C, H, W)."""
    B, C, H, W = z.shape
    big = torch.zeros(B, C, H * 2, W * 2 + 1, dtype=z.dtype)
    big[:, :, ::2, 1::2] = z
    return {
        "channels_last": z.contiguous(memory_format=torch.channels_last),
        "transposed": z.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": big[:, :, ::2, 1::2],
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(backend, layout, dtype):
    z_p, z_c, delta, act = make_inputs((2, 4, 19, 26), dtype, seed=11)
    expected = reference.repair(z_p, z_c, delta, act, blend="paper")
    zp_v, zc_v = _layouts(z_p)[layout], _layouts(z_c)[layout]
    assert not zp_v.is_contiguous()
    # delta and act may have any float dtype and strides: float64 transposed views here.
    delta_v = delta.double().transpose(1, 2).contiguous().transpose(1, 2)
    act_v = act.double().t().contiguous().t()
    actual = sk.repair(zp_v, zc_v, delta_v, act_v, blend="paper", backend=backend)
    assert_matches_reference(actual, expected, dtype, label=f"{backend} {layout}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "transposed"])
def test_out_variant(backend, out_layout):
    z_p, z_c, delta, act = make_inputs((2, 4, 21, 17), torch.float16, seed=13)
    out = torch.full_like(z_p, float("nan"))
    if out_layout == "transposed":
        out = out.transpose(2, 3).contiguous().transpose(2, 3)
    ptr, stride = out.data_ptr(), out.stride()
    result = sk.repair(z_p, z_c, delta, act, gate=0.4, backend=backend, out=out)
    assert result is out
    assert out.data_ptr() == ptr and out.stride() == stride
    assert_matches_reference(out, reference.repair(z_p, z_c, delta, act, gate=0.4), torch.float16,
                             label=f"{backend} out={out_layout}")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
def test_out_variant_allocates_nothing():
    _use("cpu", "cpp")
    z_p, z_c, delta, act = make_inputs((2, 4, 32, 32), seed=17)
    out = torch.empty_like(z_p)
    sk.repair(z_p, z_c, delta, act, out=out)  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        sk.repair(z_p, z_c, delta, act, out=out)
    events = [e for e in prof.events() if e.name.startswith("sau::repair")]
    assert events, "the op did not show up in the profile"
    allocated = sum(e.cpu_memory_usage for e in events)
    assert allocated == 0, f"sau::repair_out allocated {allocated} bytes"


def _op_args(dtype=torch.float32, shape=(2, 3, 8, 9), gate=0.4):
    z_p, z_c, delta, act = make_inputs(shape, dtype, gate=gate, seed=19)
    return (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.7, 3, "paper", "difference", gate)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype):
    _use("cpu", "cpp")
    args = _op_args(dtype)
    torch.library.opcheck(torch.ops.sau.repair.default, args)
    torch.library.opcheck(torch.ops.sau.repair.default, args[:-1] + (None,))
    torch.library.opcheck(torch.ops.sau.repair_out.default, args, {"out": torch.empty_like(args[0])})
    torch.library.opcheck(torch.ops.sau.repair_out.default, args,
                          {"out": torch.empty_like(args[0]), "coverage": torch.empty(2, 2)})


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_opcheck_triton():
    # The same operator with Triton registered as its implementation (for the CPU key here,
    # under the interpreter; for the CUDA key on a GPU).
    _use("cpu", "triton")
    args = _op_args()
    torch.library.opcheck(torch.ops.sau.repair.default, args)
    torch.library.opcheck(torch.ops.sau.repair_out.default, args, {"out": torch.empty_like(args[0])})
    torch.library.opcheck(torch.ops.sau.repair_out.default, args,
                          {"out": torch.empty_like(args[0]), "coverage": torch.empty(2, 2)})


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
def test_torch_compile_fullgraph():
    _use("cpu", "cpp")
    torch._dynamo.reset()
    z_p, z_c, delta, act = make_inputs((2, 4, 16, 16), seed=23)

    def f(z_p, z_c, delta, act):
        y = torch.ops.sau.repair(z_p * 1.0, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
        return y + 1.0

    compiled = torch.compile(f, fullgraph=True)
    assert_matches_reference(compiled(z_p, z_c, delta, act), reference.repair(z_p, z_c, delta, act) + 1.0,
                             torch.float32, label="compiled op")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_wrapper(backend):
    # The public function (checks, backend choice) traces too; aot_eager keeps it quick.
    torch._dynamo.reset()
    z_p, z_c, delta, act = make_inputs((1, 4, 12, 12), seed=29)

    def f(z_p, z_c, delta, act):
        return sk.repair(z_p, z_c, delta, act, blend="paper", gate=0.5, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_matches_reference(compiled(z_p, z_c, delta, act),
                             reference.repair(z_p, z_c, delta, act, blend="paper", gate=0.5),
                             torch.float32, label=f"compiled wrapper {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("alias", ["z_p", "z_c", "delta_view", "overlapping", "expanded"])
def test_out_aliasing_an_input_raises(backend, alias):
    z_p, z_c, delta, act = make_inputs((2, 4, 10, 12), seed=53)
    buf = torch.randn(3, 4, 10, 12)
    if alias == "z_p":
        out = z_p
    elif alias == "z_c":
        out = z_c
    elif alias == "delta_view":
        out = delta.expand(2, 4, 10, 12).clone()
        delta = out[0]
    elif alias == "overlapping":  # z_c and out are shifted windows of one buffer
        z_c, out = buf[:2], buf[1:]
    else:
        out = torch.empty(1, 4, 10, 12).expand(2, 4, 10, 12)
    match = "share memory" if alias == "expanded" else "out must not alias an input"
    before = {name: t.clone() for name, t in (("z_p", z_p), ("z_c", z_c), ("delta", delta))}
    with pytest.raises(ValueError, match=match):
        sk.repair(z_p, z_c, delta, act, backend=backend, out=out)
    for name, t in (("z_p", z_p), ("z_c", z_c), ("delta", delta)):
        assert torch.equal(t, before[name]), f"{name} was written"


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
def test_out_aliasing_raises_from_the_op():
    _use("cpu", "cpp")
    z_p, z_c, delta, act = make_inputs((1, 4, 8, 8), seed=59)
    args = (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    with pytest.raises(ValueError, match="shares memory with z_p"):
        torch.ops.sau.repair_out(*args, out=z_p)
    with pytest.raises(ValueError, match="coverage must not alias an input"):
        torch.ops.sau.repair_out(*args, out=torch.empty_like(z_p), coverage=act[:1, :2])
    out = torch.empty(1, 4, 8, 8)
    with pytest.raises(ValueError, match="coverage must not alias out"):
        torch.ops.sau.repair_out(*args, out=out, coverage=out[0, 0, :1, :2])


# ---------------------------------------------------------------------------
# One operator: the backends are its implementations
# ---------------------------------------------------------------------------


def _cpu_kernel_source():
    table = torch._C._dispatch_dump_table("sau::repair")
    line = next(ln for ln in table.splitlines() if ln.startswith("CPU:"))
    return "triton" if "ops.py" in line else "cpp" if "sau_repair_cpu.cpp" in line else line


def test_one_operator():
    assert not hasattr(torch.ops.sau, "repair_triton")
    assert not hasattr(torch.ops.sau, "repair_triton_out")


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_backend_selects_the_registered_implementation():
    z_p, z_c, delta, act = make_inputs((1, 4, 16, 16), seed=61)
    expected = reference.repair(z_p, z_c, delta, act)
    args = (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.2, 5, "convex", "latent", None)
    for backend in ("triton", "cpp", "triton", "auto"):
        assert_matches_reference(sk.repair(z_p, z_c, delta, act, backend=backend), expected, torch.float32)
        impl = "cpp" if backend == "auto" else backend
        assert sk.ops._ACTIVE["cpu"] == impl and _cpu_kernel_source() == impl
        # A direct call of the operator runs the implementation the last call selected.
        assert_matches_reference(torch.ops.sau.repair(*args), expected, torch.float32)


def test_import_is_lazy():
    # A fresh process: importing the package (and a CPU repair) imports no triton, no
    # torch._dynamo, no diffusers, initialises no CUDA; the Triton backend imports triton when first used.
    code = (
        "import sys, torch\n"
        "import sau_kernels as sk\n"
        "z = torch.randn(1, 4, 8, 8)\n"
        "sk.repair(z, z, torch.randn(4, 8, 8), torch.rand(8, 8))\n"
        "print('triton' in sys.modules, 'torch._dynamo' in sys.modules, torch.cuda.is_initialized(),\n"
        "      'diffusers' in sys.modules)\n"
        "sk.repair(z, z, torch.randn(4, 8, 8), torch.rand(8, 8), backend='triton')\n"
        "print('triton' in sys.modules)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False", "False", "True"], res.stdout


def test_package_import_loads_names_on_first_use():
    # `import sau_kernels` (and the command line's parser) import no torch; a name loads its
    # module on first use; `calibrate` stays the function whichever module loads its module first.
    code = (
        "import sys, types\n"
        "import sau_kernels as sk\n"
        "from sau_kernels.cli import build_parser\n"
        "build_parser()\n"
        "print('torch' in sys.modules)\n"
        "import sau_kernels.scan\n"  # imports the calibrate module before anyone named the function
        "print(isinstance(sk.calibrate, types.FunctionType), sk.calibrate.__module__)\n"
        "import torch\n"
        "print(hasattr(torch.ops.sau, 'repair'))\n"
        "sk.repair\n"
        "print(hasattr(torch.ops.sau, 'repair'), sorted(set(sk.__all__) - set(dir(sk))))\n"
        "try:\n"
        "    sk.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(type(e).__name__)\n"
        "from unittest import mock\n"
        "with mock.patch('sau_kernels.calibrate', len):\n"
        "    print(sk.calibrate is len)\n"
        "print(sk.calibrate.__module__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True", "sau_kernels.calibrate", "False", "True", "[]",
                                  "AttributeError", "True", "sau_kernels.calibrate"], res.stdout


# ---------------------------------------------------------------------------
# Backend choice and bad input
# ---------------------------------------------------------------------------


def test_available_backends_cpu():
    assert CPU_BACKENDS[:2] == ["reference", "cpp"]
    assert ("triton" in CPU_BACKENDS) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert "cuda" not in CPU_BACKENDS
    assert set(sk.available_backends("cpu")) <= {"reference", "cpp", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert sk.available_backends("cuda") == ["reference"]


def test_auto_is_cpp_on_cpu():
    from sau_kernels.ops import _resolve_backend

    assert _resolve_backend("auto", "cpu") == "cpp"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available on cuda"):
            _resolve_backend("auto", "cuda")


def test_triton_needs_interpreter_flag_on_cpu():
    # A fresh process without TRITON_INTERPRET: no Triton on CPU, and asking for it says why.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, sau_kernels as sk\n"
        "print(sk.available_backends('cpu'))\n"
        "z = torch.randn(1, 4, 8, 8)\n"
        "try:\n"
        "    sk.repair(z, z, torch.randn(4, 8, 8), torch.rand(8, 8), backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "['reference', 'cpp']" in res.stdout
    assert "ValueError" in res.stdout and "TRITON_INTERPRET=1" in res.stdout


def _good():
    return dict(z_p=torch.randn(2, 4, 8, 9), z_c=torch.randn(2, 4, 8, 9), delta=torch.randn(4, 8, 9),
                act=torch.rand(8, 9))


BAD_INPUTS = {
    "z_p not a tensor": (dict(z_p=[1.0]), TypeError, "z_p must be a torch.Tensor"),
    "z_p int": (dict(z_p=torch.ones(2, 4, 8, 9, dtype=torch.int32)), TypeError, "z_p must be float16"),
    "z_p float64": (dict(z_p=torch.randn(2, 4, 8, 9, dtype=torch.float64)), TypeError, "z_p must be float16"),
    "mixed dtypes": (dict(z_c=torch.randn(2, 4, 8, 9).half()), TypeError, "z_c dtype"),
    "delta int": (dict(delta=torch.ones(4, 8, 9, dtype=torch.int64)), TypeError, "delta must be a float"),
    "act bool": (dict(act=torch.ones(8, 9, dtype=torch.bool)), TypeError, "act must be a float"),
    "devices differ": (dict(delta=torch.randn(4, 8, 9, device="meta")), ValueError, "one device"),
    "z_p 3-D": (dict(z_p=torch.randn(4, 8, 9), z_c=torch.randn(4, 8, 9)), ValueError, r"\(B, C, H, W\)"),
    "z_c shape": (dict(z_c=torch.randn(2, 4, 8, 8)), ValueError, "z_c shape"),
    "delta channels": (dict(delta=torch.randn(3, 8, 9)), ValueError, "delta shape"),
    "delta spatial": (dict(delta=torch.randn(4, 9, 8)), ValueError, "delta shape"),
    "act shape": (dict(act=torch.rand(8, 8)), ValueError, "act shape"),
    "act 3-D": (dict(act=torch.rand(1, 8, 9)), ValueError, "act shape"),
    "even ksize": (dict(blur_ksize=4), ValueError, "blur_ksize must be odd"),
    "zero ksize": (dict(blur_ksize=0), ValueError, "blur_ksize must be odd"),
    "negative ksize": (dict(blur_ksize=-3), ValueError, "blur_ksize must be odd"),
    "ksize too wide": (dict(blur_ksize=MAX_KSIZE + 2), ValueError, "blur_ksize must be odd"),
    "float ksize": (dict(blur_ksize=5.0), TypeError, "blur_ksize must be an int"),
    "negative sigma": (dict(blur_sigma=-0.1), ValueError, "blur_sigma must be >= 0"),
    "nan sigma": (dict(blur_sigma=float("nan")), ValueError, "blur_sigma must be >= 0"),
    "too small for reflect": (dict(blur_ksize=17), ValueError, "reflect border"),
    "unknown blend": (dict(blend="linear"), ValueError, "unknown blend"),
    "unknown similarity": (dict(similarity="cosine"), ValueError, "unknown similarity"),
    "gate not a number": (dict(gate="0.5"), TypeError, "gate must be None or a number"),
    "out not a tensor": (dict(out=[0.0]), TypeError, "out must be a torch.Tensor"),
    "out shape": (dict(out=torch.empty(2, 4, 9, 8)), ValueError, "out shape"),
    "out dtype": (dict(out=torch.empty(2, 4, 8, 9, dtype=torch.float16)), TypeError, "out dtype"),
    "out device": (dict(out=torch.empty(2, 4, 8, 9, device="meta")), ValueError, "out device"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises(backend, name):
    change, exc, match = BAD_INPUTS[name]
    kwargs = {**_good(), **change}
    z_p, z_c, delta, act = (kwargs.pop(k) for k in ("z_p", "z_c", "delta", "act"))
    with pytest.raises(exc, match=match):
        sk.repair(z_p, z_c, delta, act, backend=backend, **kwargs)


@pytest.mark.parametrize("backend,match", [("gpu", "unknown backend"), ("cuda", "'cuda' is not available on cpu"),
                                           ("CPP", "unknown backend")])
def test_bad_backend_raises(backend, match):
    g = _good()
    with pytest.raises(ValueError, match=match) as info:
        sk.repair(g["z_p"], g["z_c"], g["delta"], g["act"], backend=backend)
    if backend == "cuda":
        assert str(CPU_BACKENDS) in str(info.value)  # lists what is available


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="sau_kernels._C not built")
@pytest.mark.parametrize("name", ["mixed dtypes", "delta channels", "act shape", "even ksize", "negative sigma",
                                  "too small for reflect", "unknown blend", "unknown similarity", "out shape",
                                  "out dtype"])
def test_bad_input_raises_from_the_op(name):
    # Direct torch.ops calls skip the Python checks; the C++ ones raise the same types.
    _use("cpu", "cpp")
    change, exc, _ = BAD_INPUTS[name]
    a = {**_good(), "blur_sigma": 0.2, "blur_ksize": 5, "blend": "convex", "similarity": "latent", **change}
    args = (a["z_p"], a["z_c"], a["delta"], a["act"], 0.5, 0.3, 12.0, 1.0, a["blur_sigma"], a["blur_ksize"],
            a["blend"], a["similarity"], None)
    with pytest.raises(exc):
        if "out" in a:
            torch.ops.sau.repair_out.default(*args, out=a["out"])
        else:
            torch.ops.sau.repair.default(*args)
