"""The defence table (`python -m sau_kernels evaluate`, the demo) on a tiny sample."""

from __future__ import annotations

import numpy as np

from sau_kernels.zoo import evaluation, zoo_profile
from sau_kernels.zoo.evaluation import Config, cases, evaluate_defence, format_rows, trigger_region
from sau_kernels.zoo import backdoor_info


def test_splits_use_disjoint_seeds():
    n = 300
    report, selection = set(cases(n, "report")[1]), set(cases(n, "selection")[1])
    calibration = set(range(10_000))  # calibrate() draws its pairs' seeds from 0
    assert not report & selection and not report & calibration and not selection & calibration


def test_trigger_region_is_the_patch_or_the_whole_image():
    px, lat = trigger_region(backdoor_info("tiny-pixel"), 64, 16)
    assert px.sum() == 16 * 16 and px[:16, :16].all()  # top-left 16x16
    assert lat.sum() == 4 * 4 and lat[:4, :4].all()
    px, lat = trigger_region(backdoor_info("tiny-style"), 64, 16)
    assert px.all() and lat.all()


def test_evaluate_defence_scores_each_configuration_against_the_undefended_row():
    default = Config(similarity="difference", gate=0.3)
    ev = evaluate_defence("tiny-pixel", zoo_profile("tiny-pixel", calibrate_if_missing=False), n=3,
                          per_step=False, final_configs=[default], timing_batch=2, timing_repeats=3,
                          progress=lambda *_: None)
    baseline, strip, row = ev.rows
    assert baseline["config"].startswith("no defence")
    assert np.isclose(baseline["removal"], 1 - ev.asr_before)
    assert strip["mode"] == "strip" and strip["removal"] == 1.0  # the trigger-free prompt's own image
    assert strip["color_acc"] == ev.untriggered_content["color"]
    assert row["config"] == default.label
    assert row["removal"] == 1.0  # every patch gone on this sample
    assert row["untriggered_identical"] is True
    assert 0 <= row["false_positive"] <= 0.1 and row["psnr_outside"] > 25
    assert row["latency_ratio"] > 1  # a second trajectory is never free
    table = format_rows(ev)
    assert default.label in table and "no defence (poisoned)" in table
    assert ev.examples[default.label].shape == (3, 64, 64, 3)


def test_per_step_configs_need_a_per_step_profile():
    profile = zoo_profile("tiny-pixel", calibrate_if_missing=False)
    assert evaluation._mode_available(profile, "final")
    assert evaluation._mode_available(profile, "per_step") == profile.has_per_step
