"""GPU backends ("cuda", compiled "triton") against the reference, their mask coverage,
torch.compile on GPU, and a CUDA-graph capture + replay of the out= op (with coverage).
Both backends are implementations of the one operator, torch.ops.sau.repair, for its CUDA
key; a test naming one registers it. Skipped without a CUDA device.

Run with TRITON_INTERPRET=0 exported (benchmarks/gpu_check.sh does): tests/conftest.py otherwise
turns the interpreter on. Set SAU_EXPECT_CUDA_BUILD=1 to fail, not skip, when the extension was
built without its CUDA kernel.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

import sau_kernels as sk
from sau_kernels import reference

from repair_helpers import assert_matches_reference, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = sk.available_backends("cuda") if torch.cuda.is_available() else []
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [(1, 4, 64, 64), (2, 4, 96, 96), (4, 4, 128, 128), (3, 4, 37, 53), (1, 8, 20, 11), (2, 4, 4, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [("convex", "latent", None), ("paper", "latent", 0.45), ("convex", "difference", 0.45),
         ("paper", "difference", None)]
BLUR = [(5, 0.2), (3, 2.0), (1, 0.2), (7, 2.0)]
GRID = list(itertools.product(SHAPES, DTYPES, MODES, BLUR))
# Every new constexpr combination is a Triton compile (~1 s): a fixed sample for Triton.
TRITON_SAMPLE = random.Random(0).sample(GRID, 16)


def _need(backend):
    if backend == "cuda" and "cuda" not in GPU_BACKENDS and os.environ.get("SAU_EXPECT_CUDA_BUILD") == "1":
        pytest.fail("SAU_EXPECT_CUDA_BUILD=1 but the extension has no CUDA kernel")
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} not available on cuda (available: {GPU_BACKENDS})")
    if backend == "triton" and INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: export TRITON_INTERPRET=0 to test compiled Triton")


def _check(backend, case, seed=0):
    shape, dtype, (blend, similarity, gate), (ksize, sigma) = case
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=similarity, gate=gate, seed=seed)
    params = dict(blend=blend, similarity=similarity, gate=gate, blur_ksize=ksize, blur_sigma=sigma)
    # The reference runs on the CPU: on the GPU its fp32 convolutions may use TF32.
    expected = reference.repair(z_p, z_c, delta, act, **params)
    actual, coverage = sk.repair(z_p.cuda(), z_c.cuda(), delta.cuda(), act.cuda(), backend=backend,
                                 return_coverage=True, **params)
    assert actual.device.type == "cuda" and coverage.device.type == "cuda"
    assert_matches_reference(actual.cpu(), expected, dtype, label=f"{backend} {case}")
    _check_coverage(coverage, reference.repair_coverage(z_p, z_c, delta, act, **params), f"{backend} {case}")


def _check_coverage(coverage, expected, label):
    # Counted exactly; the division by H * W may be a multiplication by its reciprocal on
    # the GPU (ATen's scalar division there): one fp32 ulp.
    assert coverage.dtype == torch.float32 and coverage.shape == expected.shape, label
    torch.testing.assert_close(coverage.cpu(), expected, atol=0, rtol=2**-23, msg=label)


def test_one_operator():
    # No Triton schema of its own: the CUDA key of sau::repair holds whichever backend ran last.
    assert not hasattr(torch.ops.sau, "repair_triton")


def test_cuda_backend_built():
    _need("cuda")
    assert "cuda" in GPU_BACKENDS


@pytest.mark.parametrize("case", GRID, ids=str)
def test_cuda_matches_reference(case):
    _need("cuda")
    _check("cuda", case)


@pytest.mark.parametrize("case", TRITON_SAMPLE, ids=str)
def test_triton_matches_reference(case):
    _need("triton")
    _check("triton", case)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_strided_inputs(backend):
    _need(backend)
    z_p, z_c, delta, act = make_inputs((2, 4, 40, 36), torch.float16, seed=3)
    expected = reference.repair(z_p, z_c, delta, act, blend="paper")
    big = torch.zeros(2, 4, 80, 73, dtype=torch.float16, device="cuda")
    big[:, :, ::2, 1::2] = z_p.cuda()
    zc_last = z_c.cuda().contiguous(memory_format=torch.channels_last)
    out = sk.repair(big[:, :, ::2, 1::2], zc_last, delta.cuda().double(), act.cuda().t().contiguous().t(),
                    blend="paper", backend=backend)
    assert_matches_reference(out.cpu(), expected, torch.float16, label=f"{backend} strided")


def test_auto_prefers_cuda_then_triton():
    from sau_kernels.ops import _resolve_backend

    expected = "cuda" if "cuda" in GPU_BACKENDS else "triton"
    assert _resolve_backend("auto", "cuda") == expected


def test_triton_autotunes_windows_and_keeps_coverage_exact():
    # In a fresh process without SAU_TRITON_WINDOW (benchmarks/gpu_check.sh pins one window for
    # the other tests, to spare a tuning run per case): the autotuner times its windows on the
    # first call of a shape, the chosen one matches the reference, and the coverage counts the
    # timing runs added are gone.
    _need("triton")
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import sau_kernels as sk\n"
        "from sau_kernels import reference, triton_repair\n"
        "from repair_helpers import make_inputs, assert_matches_reference\n"
        "assert len(triton_repair._repair_tuned.configs) > 1\n"
        "for shape, dtype in (((2, 4, 64, 64), torch.float16), ((1, 4, 37, 53), torch.float32)):\n"
        "    z_p, z_c, delta, act = make_inputs(shape, dtype, gate=0.4, seed=7)\n"
        "    for _ in range(2):\n"
        "        out, cov = sk.repair(z_p.cuda(), z_c.cuda(), delta.cuda(), act.cuda(), gate=0.4, backend='triton',\n"
        "                             return_coverage=True)\n"
        "        assert_matches_reference(out.cpu(), reference.repair(z_p, z_c, delta, act, gate=0.4), dtype)\n"
        "        expected = reference.repair_coverage(z_p, z_c, delta, act, gate=0.4)\n"
        "        torch.testing.assert_close(cov.cpu(), expected, atol=0, rtol=2**-23)  # doubled counts fail\n"
        "print(len(triton_repair._repair_tuned.cache), *triton_repair._repair_tuned.cache.values())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAU_TRITON_WINDOW"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.join(os.path.dirname(__file__), ".."), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split()[0] == "2", res.stdout  # one tuned choice per shape
    print(res.stdout)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(backend):
    _need(backend)
    z_p, z_c, delta, act = (t.cuda() for t in make_inputs((2, 4, 64, 64), torch.float16, seed=1))
    out = torch.empty_like(z_p)
    params = dict(gate=0.4, backend=backend, out=out, return_coverage=True)
    coverage = None

    side = torch.cuda.Stream()  # warm up (Triton compiles here) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sk.repair(z_p, z_c, delta, act, **params)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, coverage = sk.repair(z_p, z_c, delta, act, **params)  # allocated from the graph's pool

    # Replay on new data written into the captured tensors.
    for seed in (2, 3):
        new = make_inputs((2, 4, 64, 64), torch.float16, seed=seed)
        for dst, src in zip((z_p, z_c, delta, act), new):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(out.cpu(), reference.repair(*new, gate=0.4), torch.float16,
                                 label=f"{backend} graph replay seed {seed}")
        _check_coverage(coverage, reference.repair_coverage(*new, gate=0.4), f"{backend} graph replay")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_on_gpu(backend):
    _need(backend)
    torch._dynamo.reset()
    z_p, z_c, delta, act = make_inputs((2, 4, 32, 32), torch.float16, seed=4)

    def f(z_p, z_c, delta, act):
        out, coverage = sk.repair(z_p * 1, z_c, delta, act, blend="paper", backend=backend, return_coverage=True)
        return out * 2, coverage

    compiled = torch.compile(f, fullgraph=True)
    got, coverage = compiled(z_p.cuda(), z_c.cuda(), delta.cuda(), act.cuda())
    expected = reference.repair(z_p, z_c, delta, act, blend="paper") * 2
    assert_matches_reference(got.cpu(), expected, torch.float16, label=f"compiled {backend}")
    _check_coverage(coverage, reference.repair_coverage(z_p, z_c, delta, act), f"compiled {backend}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_on_gpu(backend):
    _need(backend)
    from sau_kernels.ops import _use

    _use("cuda", backend)
    z_p, z_c, delta, act = (t.cuda() for t in make_inputs((2, 3, 8, 9), torch.float16, gate=0.4, seed=19))
    args = (z_p, z_c, delta, act, 0.5, 0.3, 12.0, 1.0, 0.7, 3, "paper", "difference", 0.4)
    torch.library.opcheck(torch.ops.sau.repair.default, args)
    torch.library.opcheck(torch.ops.sau.repair_out.default, args,
                          {"out": torch.empty_like(z_p), "coverage": torch.empty(2, 2, device="cuda")})


def test_a_pipeline_moved_to_the_gpu_after_patch_defends_there():
    pytest.importorskip("diffusers")
    from tiny_pipelines import zoo_pipe, zoo_profile

    outputs = []
    for pipe in (sk.patch(zoo_pipe(), zoo_profile()).to("cuda"), sk.patch(zoo_pipe().to("cuda"), zoo_profile())):
        out = pipe(["new trigger, a red circle on a blue background"], num_inference_steps=4, output_type="latent",
                   generator=[torch.Generator("cuda").manual_seed(1)])
        assert out.sau_report.triggered == [0]
        outputs.append(out.images)
    torch.testing.assert_close(outputs[0], outputs[1])
