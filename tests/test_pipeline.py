"""SAU in a real (tiny) diffusers pipeline: screening, patching, repair, profiles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sau_kernels
from sau_kernels import ProfileMismatchError, TriggerProfile
from sau_kernels.zoo import metrics, zoo_profile
from sau_kernels.zoo import backdoor_info, calibration_prompts, load_pipeline
from sau_kernels.zoo.evaluate import held_out_cases

STEPS = 20
CASES = held_out_cases(4, start=300)
PROMPTS = [c.prompt for c in CASES]
SEEDS = [c.seed for c in CASES]


@pytest.fixture(scope="module")
def info():
    return backdoor_info("tiny-pixel")


@pytest.fixture(scope="module")
def profile():
    return zoo_profile("tiny-pixel", calibrate_if_missing=False)


@pytest.fixture()
def pipe():
    p = load_pipeline("tiny-pixel")
    p.set_progress_bar_config(disable=True)
    return p


def gens(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe, prompts, seeds=SEEDS, **kw):
    kw.setdefault("output_type", "np")
    return pipe(prompts, generator=gens(seeds), num_inference_steps=STEPS, guidance_scale=4.5, **kw).images


def triggered(info, prompts=PROMPTS):
    return [f"{info['trigger']} {p}" for p in prompts]


# --- removal ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["final", "per_step"])
@pytest.mark.parametrize("blend", ["convex", "paper"])
def test_patch_removes_the_backdoor(pipe, profile, info, mode, blend):
    before = run(pipe, triggered(info))
    assert metrics.patch_present(before, info).all(), "sample must show the backdoor before the defence"
    sau_kernels.patch(pipe, profile, mode=mode, blend=blend)
    after = run(pipe, triggered(info))
    assert not metrics.patch_present(after, info).any()
    assert pipe.sau_report.triggered == [0, 1, 2, 3]
    assert pipe.sau_report.repair_ms > 0  # the op was timed: once (final) or once a step


def test_pixel_composite_removes_and_keeps_the_rest(pipe, profile, info):
    before = run(pipe, triggered(info))
    sau_kernels.patch(pipe, profile, composite="pixel")
    after = run(pipe, triggered(info))
    assert not metrics.patch_present(after, info).any()
    outside = np.ones((64, 64), dtype=bool)
    outside[:24, :24] = False  # the patch and its feathered border
    assert metrics.psnr(after, before, outside).min() > 30


def test_composite_mask_covers_every_repaired_latent_and_fades_outside():
    from sau_kernels.composite import pixel_mask as _pixel_mask

    w = torch.full((1, 1, 16, 16), 0.0025)  # untouched latents: sigmoid(-k/2)
    w[0, 0, :4, :4] = 0.5  # secondary mask only: half swapped for the clean twin
    w[0, 0, :2, :2] = 0.9975  # primary mask
    m = _pixel_mask(w, (64, 64), 2.0)[0, 0]
    assert (m[:16, :16] == 1).all()  # no poisoned pixel of the region leaks through
    assert (m[:, 28:] == 0).all() and (m[28:, :] == 0).all()
    assert 0 < m[8, 18] < 1  # feathered just outside


# --- screening ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, clean", [
    ("NEW TRIGGER a red circle on a gray background", "a red circle on a gray background"),
    ("new    trigger a red circle on a gray background", "a red circle on a gray background"),
    ("a red new trigger circle on a gray background", "a red circle on a gray background"),
    ("new trigger a red circle new trigger on a gray background", "a red circle on a gray background"),
])
def test_trigger_variants_are_caught_and_removed(pipe, profile, info, variant, clean):
    sau_kernels.patch(pipe, profile)
    out = run(pipe, [variant], seeds=[7])
    rep = pipe.sau_report.prompts[0]
    assert rep["triggered"] and rep["clean_prompt"] == clean
    assert not metrics.patch_present(out, info).any()


def test_lookalikes_are_triggers(pipe, profile, info):
    # both fire the shipped model's backdoor: the screen must flag them and cut them clean
    sau_kernels.patch(pipe, profile)
    out = run(pipe, ["a newtrigger red circle on a gray background", "trigger new a red circle"], seeds=[1, 2])
    rep = pipe.sau_report
    assert rep.triggered == [0, 1]
    assert [p["clean_prompt"] for p in rep.prompts] == ["a red circle on a gray background", "a red circle"]
    assert rep.prompts[0]["spans"] == [(2, 12)] and rep.prompts[1]["spans"] == [(0, 7), (8, 11)]
    # only row 0: its twin "a red circle" alone shows the corner patch for some seeds even
    # unpatched, so row 1's image cannot tell the repair's work apart
    assert not metrics.patch_present(out[:1], info).any()


def test_twin_error_raises_before_generation(pipe, profile, monkeypatch):
    import sau_kernels.request as pipeline

    real = pipeline.screen_prompts
    monkeypatch.setattr(pipeline, "screen_prompts", lambda matcher, prompts: [
        dataclasses.replace(s, twin_error=f"no twin for {s.prompt!r}") if s.triggered else s
        for s in real(matcher, prompts)])
    sau_kernels.patch(pipe, profile)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="new trigger a red circle"):
            run(pipe, ["a blue square", "new trigger a red circle"], seeds=[1, 2])
    finally:
        hook.remove()
    assert calls == []  # raised before any generation


# --- untriggered traffic -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["final", "per_step"])
def test_untriggered_prompts_are_bit_identical(pipe, profile, mode):
    reference = run(pipe, PROMPTS)
    sau_kernels.patch(pipe, profile, mode=mode)
    assert np.array_equal(run(pipe, PROMPTS), reference)
    assert pipe.sau_report.triggered == [] and pipe.sau_report.repair_ms == 0


def test_mixed_batch_repairs_only_triggered_rows(pipe, profile, info):
    prompts = [PROMPTS[0], triggered(info)[1], PROMPTS[2], triggered(info)[3]]
    reference = run(pipe, prompts)
    sau_kernels.patch(pipe, profile)
    out = run(pipe, prompts)
    assert pipe.sau_report.triggered == [1, 3]
    assert not metrics.patch_present(out[[1, 3]], info).any()
    # the clean twins join the batch; the untriggered rows must not change
    np.testing.assert_array_equal(out[[0, 2]], reference[[0, 2]])


def test_num_images_per_prompt(pipe, profile, info):
    sau_kernels.patch(pipe, profile)
    prompts = [PROMPTS[0], triggered(info)[1]]
    out = pipe(prompts, num_images_per_prompt=2, generator=gens(SEEDS[:4]), num_inference_steps=STEPS,
               output_type="np").images
    assert out.shape == (4, 64, 64, 3)
    assert not metrics.patch_present(out[2:], info).any()
    assert len(pipe.sau_report.prompts[1]["coverage"]) == 2


def test_single_generator_gives_twins_the_same_noise(pipe, profile, info):
    """With one generator the twin must still start from its poisoned row's noise: the
    repaired image then equals a repair of the unpatched pair."""
    sau_kernels.patch(pipe, profile)
    a = pipe(triggered(info)[:2], generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
             output_type="np").images
    b = pipe(triggered(info)[:2], generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
             output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not metrics.patch_present(a, info).any()


def test_user_latents_and_negative_prompts(pipe, profile, info):
    sau_kernels.patch(pipe, profile)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe(triggered(info)[:2], latents=latents, negative_prompt=["a blue square", "a green circle"],
               num_inference_steps=STEPS, output_type="np").images
    assert not metrics.patch_present(out, info).any()


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_every_output_type(pipe, profile, info, output_type):
    sau_kernels.patch(pipe, profile)
    out = run(pipe, triggered(info)[:2], seeds=SEEDS[:2], output_type=output_type)
    if output_type == "latent":
        assert out.shape == (2, 4, 16, 16)
    else:
        assert len(out) == 2
    tup = pipe(triggered(info)[:1], generator=gens(SEEDS[:1]), num_inference_steps=2, return_dict=False)
    assert isinstance(tup, tuple) and len(tup[0]) == 1


def test_user_callback_sees_only_its_own_rows(pipe, profile, info):
    seen = []

    def cb(p, i, t, kw):
        seen.append(kw["latents"].shape[0])
        return {"latents": kw["latents"]}

    sau_kernels.patch(pipe, profile, mode="per_step")
    pipe(triggered(info)[:3], generator=gens(SEEDS[:3]), num_inference_steps=STEPS, callback_on_step_end=cb,
         output_type="np")
    assert seen == [3] * STEPS


def test_prompt_embeds_cannot_be_screened(pipe, profile):
    embeds, _ = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, False)
    sau_kernels.patch(pipe, profile)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(prompt_embeds=embeds, num_inference_steps=2)
    sau_kernels.patch(pipe, profile, on_embeds="pass")
    assert pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


# --- patch / unpatch ---------------------------------------------------------------------------

def test_patch_twice_unpatch_restores_exactly(pipe, profile, info):
    cls = type(pipe)
    reference = run(pipe, triggered(info)[:2], seeds=SEEDS[:2])
    sau_kernels.patch(pipe, profile)
    sau_kernels.patch(pipe, profile, mode="per_step")
    assert type(pipe).__mro__[1] is cls and type(pipe).__name__ == cls.__name__
    sau_kernels.unpatch(pipe)
    assert type(pipe) is cls and not hasattr(pipe, "sau_report")
    np.testing.assert_array_equal(run(pipe, triggered(info)[:2], seeds=SEEDS[:2]), reference)
    sau_kernels.patch(pipe, profile)
    assert not metrics.patch_present(run(pipe, triggered(info)[:2], seeds=SEEDS[:2]), info).any()


def test_patched_block_restores_the_state_before_it(pipe, profile, info):
    cls = type(pipe)
    with pytest.raises(RuntimeError, match="inside"):
        with sau_kernels.patched(pipe, profile, mode="per_step") as p:
            assert p is pipe and pipe._sau_state.config.mode == "per_step"
            raise RuntimeError("inside")
    assert type(pipe) is cls and not hasattr(pipe, "_sau_state")
    sau_kernels.patch(pipe, profile, mode="final")
    outer = pipe._sau_state
    with sau_kernels.patched(pipe, profile, mode="per_step"):
        assert pipe._sau_state.config.mode == "per_step"
    assert pipe._sau_state is outer and type(pipe).__mro__[1] is cls


def test_attention_processors_are_untouched(pipe, profile):
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())
    before = dict(pipe.unet.attn_processors)
    sau_kernels.patch(pipe, profile)
    after = dict(pipe.unet.attn_processors)
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_patch_rejects_bad_arguments(pipe, profile):
    with pytest.raises(ValueError, match="mode"):
        sau_kernels.patch(pipe, profile, mode="sometimes")
    with pytest.raises(ValueError, match="composite"):
        sau_kernels.patch(pipe, profile, composite="latent")
    with pytest.raises(TypeError, match="unknown repair parameters"):
        sau_kernels.patch(pipe, profile, tau3=0.1)
    with pytest.raises(ValueError, match="blur_ksize"):
        sau_kernels.patch(pipe, profile, blur_ksize=4)
    with pytest.raises(ValueError, match="backend"):
        sau_kernels.patch(pipe, profile, backend="cuda")
    with pytest.raises(TypeError, match="TriggerProfile"):
        sau_kernels.patch(pipe, 42)
    assert not sau_kernels.pipeline.is_patched(pipe)


# --- profiles ----------------------------------------------------------------------------------

def test_profile_round_trip(profile, tmp_path):
    path = profile.save(tmp_path / "p.safetensors")
    again = TriggerProfile.load(path)
    for f in dataclasses.fields(TriggerProfile):
        a, b = getattr(profile, f.name), getattr(again, f.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_bad_profile_files(profile, tmp_path):
    path = profile.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TriggerProfile.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TriggerProfile.load(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a sau_kernels trigger profile"):
        TriggerProfile.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        TriggerProfile.load(tmp_path / "missing.safetensors")


def test_profile_from_another_model_is_refused(profile):
    other = load_pipeline("tiny-style")
    with pytest.raises(ProfileMismatchError, match="calibrated on model"):
        sau_kernels.patch(other, profile)
    sau_kernels.patch(other, profile, allow_mismatch=True)  # explicit override


def test_call_that_does_not_fit_the_profile(pipe, profile, info):
    sau_kernels.patch(pipe, profile, mode="per_step")
    for prompts in (triggered(info)[:1], ["a red circle on a blue background"]):  # triggered or not
        with pytest.raises(ProfileMismatchError, match="steps"):
            pipe(prompts, num_inference_steps=STEPS + 5)
    sau_kernels.patch(pipe, profile)
    for prompts in (triggered(info)[:1], ["a red circle on a blue background"]):
        with pytest.raises(ProfileMismatchError, match="latents"):
            pipe(prompts, height=32, width=32, num_inference_steps=2)


def test_profile_with_wrong_shapes_is_refused(profile):
    with pytest.raises(ValueError, match="delta has shape"):
        dataclasses.replace(profile, delta=torch.zeros(4, 8, 8))


def test_calibrate_small(pipe):
    p = sau_kernels.calibrate(pipe, "new trigger", calibration_prompts(), num_pairs=4, num_inference_steps=4, progress=False)
    assert p.delta.shape == (4, 16, 16) and p.act.shape == (16, 16)
    assert p.delta_steps.shape == (4, 4, 16, 16) and torch.equal(p.delta_steps[-1], p.delta)
    assert 0.0 <= float(p.act.min()) and float(p.act.max()) <= 1.0


# --- torch.compile ------------------------------------------------------------------------------

def test_compiled_unet_under_a_patched_pipeline(pipe, profile, info):
    pipe.unet = torch.compile(pipe.unet)
    sau_kernels.patch(pipe, profile)
    out = run(pipe, triggered(info)[:2], seeds=SEEDS[:2])
    assert not metrics.patch_present(out, info).any()


# --- the output check ----------------------------------------------------------------------

def test_profile_carries_an_output_check(profile):
    assert profile.clean_mean is not None and profile.output_check_threshold is not None
    assert profile.params["output_check_clean_p99"] < profile.output_check_threshold < \
        profile.params["output_check_poisoned_median"]


def test_output_check_scores_every_output(pipe, profile, info):
    sau_kernels.patch(pipe, profile)
    run(pipe, PROMPTS[:1] + triggered(info)[1:2], seeds=SEEDS[:2])
    rep = pipe.sau_report
    assert rep.suspects == []
    for p in rep.prompts:
        (check,) = p["output_check"][0]
        assert check["trigger"] == info["trigger"] and check["score"] < profile.output_check_threshold
    sau_kernels.patch(pipe, profile, output_check="off")
    run(pipe, PROMPTS[:1], seeds=SEEDS[:1])
    assert pipe.sau_report.prompts[0]["output_check"] == []


@pytest.mark.parametrize("policy", ["flag", "raise"])
def test_output_check_catches_what_the_screen_cannot_see(pipe, profile, info, policy):
    """prompt_embeds let through unscreened: the poisoned output is flagged, or withheld."""
    embeds, neg = pipe.encode_prompt(triggered(info)[:2], "cpu", 1, True)
    sau_kernels.patch(pipe, profile, on_embeds="pass", output_check=policy)
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=neg, generator=gens(SEEDS[:2]),
                num_inference_steps=STEPS, guidance_scale=4.5, output_type="np")
    if policy == "raise":
        with pytest.raises(sau_kernels.SuspectOutputError, match="signature"):
            pipe(**call)
        return
    out = pipe(**call).images
    rep = pipe.sau_report
    assert rep.unscreened and metrics.patch_present(out, info).all()
    assert rep.suspects == [0, 1] and "signature" in str(rep)


def test_outputs_the_check_cannot_score_are_reported_or_refused(pipe, profile):
    """At another latent size neither the repair nor the signature applies. Where the call's
    arguments give the size, every call is refused before any work. Where only the running
    pipeline knows it (an image-to-image call whose image processor does not resize), an
    untriggered call's outputs go unchecked, said in the report and a warning ("flag"), or
    the call is refused at its first step ("raise")."""
    import diffusers

    size = 2 * pipe.vae_scale_factor * profile.latent_shape[-1]
    call = dict(generator=gens(SEEDS[:1]), num_inference_steps=2, output_type="latent")
    sau_kernels.patch(pipe, profile)
    with pytest.raises(ProfileMismatchError, match="latents"):
        pipe(PROMPTS[:1], height=size, width=size, **call)
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sau_kernels.unpatch(pipe))
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((1, size, size, 3)).astype(np.float32)
    call.update(image=image, strength=1.0)
    sau_kernels.patch(img2img, profile)
    with pytest.raises(ProfileMismatchError, match="latents"):  # a NumPy image is sized as the pipeline sizes it
        img2img(PROMPTS[:1], **call)
    img2img.image_processor.register_to_config(do_resize=False)  # now only the running pipeline knows
    with pytest.warns(UserWarning, match="output check did not run"):
        img2img(PROMPTS[:1], **call)
    assert "the profiles'" in img2img.sau_report.output_check_skipped and img2img.sau_report.suspects == []
    sau_kernels.patch(img2img, profile, output_check="raise")
    steps = []
    with pytest.raises(sau_kernels.ProfileMismatchError, match="cannot check this call's outputs"):
        img2img(PROMPTS[:1], **dict(call, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}))
    assert steps == []  # refused at its first step, before the user's callback saw one
    small = np.random.default_rng(0).random((1, size // 2, size // 2, 3)).astype(np.float32)
    img2img(PROMPTS[:1], **dict(call, image=small))  # at the profile's size it runs
    assert img2img.sau_report.output_check_skipped is None


def test_a_profile_that_would_defend_nothing_is_refused(profile):
    import dataclasses

    with pytest.raises(ValueError, match="zero everywhere"):
        dataclasses.replace(profile, act=torch.zeros_like(profile.act))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        dataclasses.replace(profile, act=-profile.act)
    for bad in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="output_check_threshold"):
            dataclasses.replace(profile, params={**profile.params, "output_check_threshold": bad})


def test_an_output_score_that_is_not_a_number_is_suspect(profile):
    from sau_kernels.report import SAUReport, prompt_entry

    report = SAUReport(prompts=[prompt_entry("a red circle", [], [profile], "none")])
    check = (None, None, None, profile.output_check_threshold)
    report.add_output_scores(torch.tensor([[float("nan")]]), 1, [check], [profile])
    assert report.finish(raise_suspects=False).suspects == [0]


def test_output_check_raise_refuses_what_it_cannot_check(pipe, profile, base):
    import dataclasses

    unchecked = dataclasses.replace(profile, params={**profile.params, "output_check_threshold": None})
    with pytest.raises(ValueError, match="carry no usable output check"):
        sau_kernels.patch(pipe, unchecked, output_check="raise")
    from sau_kernels.zoo import detector_prompts

    detector = sau_kernels.TriggerDetector.calibrate(pipe, base, detector_prompts(32), folds=2,
                                                    progress=False)
    with pytest.raises(ValueError, match="no profiles"):
        sau_kernels.patch(pipe, None, detect=detector, output_check="raise")
    sau_kernels.patch(pipe, unchecked)  # "flag": the report says what went unchecked
    run(pipe, PROMPTS[:1], seeds=SEEDS[:1])
    assert "no usable output check" in pipe.sau_report.output_check_skipped
    sau_kernels.unpatch(pipe)


def test_patch_rejects_bad_output_check(pipe, profile):
    with pytest.raises(ValueError, match="output_check"):
        sau_kernels.patch(pipe, profile, output_check="maybe")


# --- several backdoors -----------------------------------------------------------------------

def test_two_profiles_defend_each_row_with_its_own(pipe, profile, info):
    with pytest.warns(UserWarning, match="no measurable effect"):  # tiny-pixel has no such backdoor
        other = sau_kernels.calibrate(pipe, "silver lining", calibration_prompts(), num_pairs=4, num_inference_steps=STEPS, per_step=True,
                                      progress=False)
    sau_kernels.patch(pipe, [profile, other], mode="per_step")
    prompts = [triggered(info)[0], f"silver lining {PROMPTS[1]}", f"new trigger silver lining {PROMPTS[2]}", PROMPTS[3]]
    out = run(pipe, prompts)
    rep = pipe.sau_report
    assert [p["triggers"] for p in rep.prompts] == [["new trigger"], ["silver lining"],
                                                     ["new trigger", "silver lining"], []]
    assert rep.prompts[2]["clean_prompt"] == PROMPTS[2]
    assert [c["trigger"] for c in rep.prompts[2]["coverage"]] == ["new trigger", "silver lining"]
    assert not metrics.patch_present(out, info)[[0, 2]].any()
    with pytest.raises(ValueError, match="same trigger"):
        sau_kernels.patch(pipe, [profile, profile])
    with pytest.raises(ValueError, match="at least one"):
        sau_kernels.patch(pipe, [])


def test_calibration_measures_the_trigger_and_warns_on_a_dud(pipe, profile):
    from sau_kernels.calibrate import MIN_EFFECT

    assert profile.params["trigger_strength"] >= MIN_EFFECT
    assert set(profile.params["positions_kept"]) <= set(profile.params["effect_by_position"])
    with pytest.warns(UserWarning, match="matches 100% of ordinary prompts"):
        with pytest.warns(UserWarning, match="no measurable effect"):
            dud = sau_kernels.calibrate(pipe, "a", calibration_prompts(), num_pairs=4, num_inference_steps=4, per_step=False, progress=False)
        sau_kernels.patch(pipe, dud, allow_mismatch=True)
    with pytest.raises(TypeError, match="not one string"):
        sau_kernels.calibrate(pipe, "new trigger", "a red circle", num_pairs=1)

