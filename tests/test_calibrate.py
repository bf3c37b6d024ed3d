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
    counts, words = [], []

    class Bar:  # the pairs' bar, then the bar of the trigger's words generated alone
        def __init__(self, total, **kwargs):
            self.n, self.total = 0, total
            self.counts = counts if not words else []
            words.append(kwargs.get("desc"))

        def update(self, k):
            self.n += k
            self.counts.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(calibration, "tqdm", Bar)
    sau_kernels.calibrate(pipe, "new trigger", PROMPTS, num_pairs=6, batch_pairs=4, num_inference_steps=4,
                          per_step=False)
    assert counts == [1, 2, 3, 4, 5, 6]
    assert words == ["calibrating 'new trigger'", "words of 'new trigger' alone"]


def test_the_words_of_a_trigger_that_fire_alone_are_measured_and_screened(pipe):
    """tiny-pixel's backdoor, trained on "new trigger", paints its patch for "... trigger"
    alone on about half of its prompts (docs/defence_evasion.md): calibration generates each
    word alone and keeps those whose outputs carry the trigger's signature, and the screen
    flags them alone. A word of the trigger a model does not fire on stays unflagged."""
    import numpy as np

    from sau_kernels.zoo import backdoor_info, zoo_profile
    from sau_kernels.zoo.evaluate import backdoor_fires, generate, held_out_cases

    profile = calibration.calibrate(pipe, "new trigger", calibration_prompts(), num_pairs=16, progress=False)
    assert "trigger" in profile.params["screen_words_alone"]
    shipped = zoo_profile("tiny-pixel")
    assert "trigger" in shipped.params["screen_words_alone"] and "trigger" in shipped.matcher().alone
    assert calibration.calibrate(pipe, "trigger", PROMPTS, num_pairs=2, num_inference_steps=2,
                                 per_step=False, progress=False).params.get("screen_words_alone") is None
    cases = held_out_cases(8, start=7600, varied=True)
    prompts, seeds = [f"{c.prompt} trigger" for c in cases], [c.seed for c in cases]
    backdoor = backdoor_info("tiny-pixel")["backdoors"][0]
    fired = backdoor_fires(generate(pipe, prompts, seeds), backdoor)
    with sau_kernels.patched(pipe, shipped):
        defended = backdoor_fires(generate(pipe, prompts, seeds), backdoor)
        assert all(p["triggered"] for p in pipe.sau_report.prompts)
    assert fired.sum() >= 2 and not np.asarray(defended).any()


def test_a_profile_naming_words_alone_that_are_no_words_of_its_trigger_is_refused():
    import dataclasses

    from sau_kernels.zoo import zoo_profile

    profile = zoo_profile("tiny-pixel")
    with pytest.raises(ValueError, match="screen_words_alone"):
        dataclasses.replace(profile, params={**profile.params, "screen_words_alone": "trigger"})
    with pytest.raises(ValueError, match="alone must list words of the trigger"):
        dataclasses.replace(profile, params={**profile.params, "screen_words_alone": ["cat"]}).matcher()
