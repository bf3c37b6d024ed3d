"""Property test: the C++ kernel agrees with the reference on random shapes and parameters."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sau_kernels as sk  # noqa: E402
from sau_kernels import reference  # noqa: E402

from repair_helpers import assert_matches_reference, make_inputs  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif("cpp" not in sk.available_backends("cpu"), reason="sau_kernels._C not built")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    ksize=st.sampled_from([1, 3, 5, 7, 9]),
    blend=st.sampled_from(["convex", "paper"]),
    similarity=st.sampled_from(["latent", "difference"]),
    dtype=st.sampled_from(DTYPES),
)
def test_cpp_property(data, ksize, blend, similarity, dtype):
    r = ksize // 2
    shape = (data.draw(st.integers(1, 3), "B"), data.draw(st.integers(1, 6), "C"),
             data.draw(st.integers(r + 1, 40), "H"), data.draw(st.integers(r + 1, 40), "W"))
    params = dict(
        tau1=data.draw(st.floats(-0.9, 0.9), "tau1"),
        tau2=data.draw(st.floats(0.0, 1.0), "tau2"),
        k=data.draw(st.floats(0.5, 30.0), "k"),
        alpha=data.draw(st.floats(0.0, 1.0), "alpha"),
        blur_sigma=data.draw(st.sampled_from([0.0, 0.2, 0.7, 2.0, 3.5]), "sigma"),
        gate=data.draw(st.one_of(st.none(), st.floats(0.0, 1.0)), "gate"),
    )
    z_p, z_c, delta, act = make_inputs(shape, dtype, similarity=similarity, tau1=params["tau1"],
                                       tau2=params["tau2"], gate=params["gate"],
                                       seed=data.draw(st.integers(0, 2**16), "seed"))
    kwargs = dict(params, blur_ksize=ksize, blend=blend, similarity=similarity)
    assert_matches_reference(sk.repair(z_p, z_c, delta, act, backend="cpp", **kwargs),
                             reference.repair(z_p, z_c, delta, act, **kwargs), dtype, label=str(kwargs))

