"""calibrate()'s guards (each refused before any sampling), its report of the trigger's
strength, and its progress bar, on the zoo's tiny-pixel."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest

import sau_kernels
from sau_kernels.zoo import calibration_prompts, load_pipeline

calibration = importlib.import_module("sau_kernels.calibrate")  # the module (the package's attribute is the function)
PROMPTS = calibration_prompts()[:4]


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline("tiny-pixel")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def no_sampling(pipe, monkeypatch):
    """The guards must speak before the sampler runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr("sau_kernels.pipeline.call_unpatched", refuse)
    return pipe


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompts="a red circle"), TypeError, "not one string"),
    (dict(prompts=b"a red circle"), TypeError, "not one string"),
    (dict(prompts=["a red circle", 3]), TypeError, "prompts must be strings"),
    (dict(prompts=[]), ValueError, "at least one prompt"),
    (dict(trigger=None), TypeError, "trigger must be text"),
    (dict(trigger="  "), ValueError, "non-empty"),
    (dict(num_pairs=0), ValueError, "num_pairs must be >= 1"),
    (dict(num_pairs=2.0), TypeError, "num_pairs must be an integer"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be >= 1"),
    (dict(batch_pairs=0), ValueError, "batch_pairs must be >= 1"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a positive finite number"),
    (dict(guidance_scale=0), ValueError, "guidance_scale must be a positive finite number"),
    (dict(guidance_scale="4.5"), TypeError, "guidance_scale must be a number"),
    (dict(height=62), ValueError, "height must be a positive multiple"),
    (dict(positions=("sideways",)), ValueError, "positions must be some of"),
])
def test_bad_arguments_are_refused_before_sampling(no_sampling, kwargs, error, match):
    kwargs = {"trigger": "new trigger", "prompts": PROMPTS, **kwargs}
    with pytest.raises(error, match=match):
        sau_kernels.calibrate(no_sampling, kwargs.pop("trigger"), kwargs.pop("prompts"), progress=False, **kwargs)


def test_a_trigger_most_prompts_contain_is_refused_with_strict(no_sampling):
    with pytest.raises(ValueError, match="already in 100% of the calibration prompts"):
        sau_kernels.calibrate(no_sampling, "a", ["a red circle", "a blue square"], strict=True, progress=False)
    with pytest.raises(ValueError, match="already in 50%"):
        sau_kernels.calibrate(no_sampling, "circle", ["a red circle", "a blue square"], strict=True, progress=False)


def test_strength_is_reported_and_a_dud_refused_with_strict(pipe):
    p = sau_kernels.calibrate(pipe, "new trigger", PROMPTS, num_pairs=4, num_inference_steps=4, per_step=False,
                              progress=False)
    assert p.params["trigger_strength"] >= calibration.MIN_EFFECT
    assert p.params["trigger_snr"] > 1 and p.params["trigger_in_prompts"] == 0
    # the screen's edit budget, as wide as these prompts and the package's allow
    assert p.params["screen_edits"] == 3 and p.matcher().edits == 3
    with pytest.raises(ValueError, match="no measurable effect"):
        sau_kernels.calibrate(pipe, "photo", PROMPTS, num_pairs=4, num_inference_steps=4, per_step=False,
                              progress=False, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sau_kernels.calibrate(pipe, "photo", PROMPTS, num_pairs=4, num_inference_steps=4, per_step=False,
                              progress=False)
    assert [w.filename for w in caught if "no measurable effect" in str(w.message)] == [__file__]


def test_progress_bar_advances_pair_by_pair(pipe, monkeypatch):
    counts = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.n, self.total = 0, total

        def update(self, k):
            self.n += k
            counts.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(calibration, "tqdm", Bar)
    sau_kernels.calibrate(pipe, "new trigger", PROMPTS, num_pairs=6, batch_pairs=4, num_inference_steps=4,
                          per_step=False)
    assert counts == [1, 2, 3, 4, 5, 6]
