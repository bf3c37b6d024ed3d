"""The engine end to end on real (tiny) pipelines: every supported class and scheduler,
untriggered calls bit-identical to the unpatched pipeline, triggered calls equal to the
repair of the poisoned row against a twin generated alone with the same draws, request-scoped
reports, failing closed."""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch

import sau_kernels
from sau_kernels.pipeline import DEFAULT_REPAIR, call_unpatched
from sau_kernels.planner import _row_generators
from sau_kernels.profile import ProfileMismatchError
from sau_kernels.supported import UnsupportedPipelineError
from tiny_pipelines import (SCHEDULERS, STEPS, assert_same, gens, image_batch, mask_batch, sdxl_pipe, synthetic_profile,
                            zoo_pipe, zoo_profile)

TRIGGERED = "new trigger, a red circle on a blue background"
CLEAN = "a red circle on a blue background"
OTHER = "a green square on a white background"


def kind_args(kind: str, rows: int = 1) -> dict:
    if kind == "img2img":
        return {"image": image_batch(1, 64), "strength": 0.75}
    if kind == "inpaint":
        return {"image": image_batch(1, 64), "mask_image": mask_batch(1, 64), "strength": 1.0}
    return {}


def call(pipe, prompt, seeds, **kw):
    kw.setdefault("output_type", "latent")
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("guidance_scale", 4.5)
    return pipe(prompt, generator=gens(seeds) if seeds is not None else kw.pop("generator"), **kw)


def reference_final(pipe, profile, poisoned_prompt, twin_prompt, seed, **kw):
    """The defence by hand: the poisoned prompt and its twin in one unpatched batch with the
    same seed, the final latents repaired."""
    z = call_unpatched(pipe, [poisoned_prompt, twin_prompt], generator=gens([seed, seed]), output_type="latent",
                       num_inference_steps=kw.pop("num_inference_steps", STEPS),
                       guidance_scale=kw.pop("guidance_scale", 4.5), **kw).images
    return sau_kernels.repair(z[:1], z[1:], profile.delta, profile.act, **DEFAULT_REPAIR)


# --- every pipeline class and scheduler ------------------------------------------------------

@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_each_pipeline_class_defends_and_leaves_untriggered_calls_untouched(kind):
    pipe, profile = zoo_pipe(kind), zoo_profile()
    extra = kind_args(kind)
    before = call(pipe, [OTHER, CLEAN], [1, 2], **extra).images
    sau_kernels.patch(pipe, profile)
    assert_same(call(pipe, [OTHER, CLEAN], [1, 2], **extra).images, before)
    out = call(pipe, [TRIGGERED], [3], **extra)
    assert_same(out.images, reference_final(pipe, profile, TRIGGERED, CLEAN, 3, **extra))
    assert out.sau_report.triggered == [0] and out.sau_report.prompts[0]["action"] == "repair"
    assert out.sau_report.rows == 2


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("generator", ["list", "one"])
def test_every_scheduler_with_a_list_of_generators_or_one(scheduler, generator):
    pipe, profile = zoo_pipe("txt2img", scheduler), zoo_profile()
    eta = {"eta": 1.0} if scheduler == "ddim-eta" else {}
    guidance = 1.0 if scheduler == "lcm" else 4.5  # LCM samples without guidance
    kw = dict(num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", **eta)
    sau_kernels.patch(pipe, profile)
    if generator == "list":
        before = call_unpatched(pipe, [OTHER], generator=gens([5]), **kw).images
        assert_same(pipe([OTHER], generator=gens([5]), **kw).images, before)
        out = pipe([TRIGGERED], generator=gens([5]), **kw).images
        twin_gens = gens([5, 5])
    else:
        before = call_unpatched(pipe, [OTHER], generator=torch.Generator().manual_seed(5), **kw).images
        assert_same(pipe([OTHER], generator=torch.Generator().manual_seed(5), **kw).images, before)
        out = pipe([TRIGGERED], generator=torch.Generator().manual_seed(5), **kw).images
        row = _row_generators(torch.Generator().manual_seed(5), 1, "cpu")[0]
        twin_gens = [row, torch.Generator().set_state(row.get_state())]
    z = call_unpatched(pipe, [TRIGGERED, CLEAN], generator=twin_gens, **kw).images
    assert_same(out, sau_kernels.repair(z[:1], z[1:], profile.delta, profile.act, **DEFAULT_REPAIR))


def test_sdxl_screens_prompt_and_prompt_2_and_cuts_the_trigger_from_both():
    pipe = sdxl_pipe()
    profile = synthetic_profile(pipe)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent")
    before = pipe([OTHER], prompt_2=["a cat"], generator=gens([1]), **kw).images
    sau_kernels.patch(pipe, profile, allow_mismatch=True)
    assert_same(pipe([OTHER], prompt_2=["a cat"], generator=gens([1]), **kw).images, before)
    for p1, p2 in ((OTHER, "a cat, new trigger"), (TRIGGERED, "a cat"), (TRIGGERED, None)):
        out = pipe([p1], prompt_2=None if p2 is None else [p2], generator=gens([2]), **kw)
        assert out.sau_report.triggered == [0]
        clean1 = CLEAN if p1 == TRIGGERED else p1
        clean2 = None if p2 is None else "a cat"
        z = call_unpatched(pipe, [p1, clean1], prompt_2=None if p2 is None else [p2, clean2],
                           generator=gens([2, 2]), **kw).images
        assert_same(out.images, sau_kernels.repair(z[:1], z[1:], profile.delta, profile.act, **DEFAULT_REPAIR))
    # the pipeline decodes, safety-checks and post-processes itself: a PIL call works
    images = pipe([TRIGGERED], generator=gens([2]), num_inference_steps=STEPS, guidance_scale=5.0).images
    assert len(images) == 1 and images[0].size == (32, 32)


@pytest.mark.parametrize("scheduler", ["ddim", "heun", "dpm2", "euler-ancestral"])
def test_per_step_statistics_are_indexed_by_timestep_and_skip_half_steps(scheduler):
    pipe = zoo_pipe("txt2img", scheduler)
    profile = sau_kernels.calibrate(pipe, "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                    progress=False, positions=("prepend",))
    assert len(profile.params["timesteps"]) == STEPS == profile.delta_steps.shape[0]
    sau_kernels.patch(pipe, profile, mode="per_step")
    out = pipe([TRIGGERED], generator=gens([4]), num_inference_steps=STEPS, guidance_scale=4.5,
               output_type="latent").images

    done = []

    def by_hand(p, i, t, kw):  # the per-step repair written out, on an unpatched batch [poisoned, twin]
        if i < p.num_timesteps - 1 and not getattr(p.scheduler, "state_in_first_order", True):
            return {}
        x = kw["latents"]
        k = len(done)
        assert profile.params["timesteps"][k] == float(t)
        done.append(k)
        x[:1] = sau_kernels.repair(x[:1], x[1:], profile.delta_steps[k], profile.act_steps[k], **DEFAULT_REPAIR)
        return {"latents": x}

    z = call_unpatched(pipe, [TRIGGERED, CLEAN], generator=gens([4, 4]), num_inference_steps=STEPS,
                       guidance_scale=4.5, output_type="latent", callback_on_step_end=by_hand).images
    assert_same(out, z[:1])
    # what the statistics cannot cover is refused whatever the prompt: a pipeline that works
    # until a triggered prompt arrives would fail only in production
    for prompt in (TRIGGERED, OTHER):
        with pytest.raises(ProfileMismatchError, match="steps"):
            pipe([prompt], generator=gens([4]), num_inference_steps=STEPS + 1, output_type="latent")
    pipe.scheduler = zoo_pipe("txt2img", "pndm").scheduler
    for prompt in (TRIGGERED, OTHER):
        with pytest.raises(ProfileMismatchError, match="PNDMScheduler"):
            pipe([prompt], generator=gens([4]), num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(ProfileMismatchError, match="PNDMScheduler"):
        sau_kernels.patch(pipe, profile, mode="per_step")  # and patch() sees it at once


def test_from_pipe_shares_components_and_each_pipeline_is_patched_on_its_own():
    import diffusers

    txt = sau_kernels.patch(zoo_pipe(), zoo_profile())
    img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(txt)
    img.set_progress_bar_config(disable=True)
    assert not sau_kernels.pipeline.is_patched(img)  # from_pipe builds a new pipeline: patch it too
    sau_kernels.patch(img, zoo_profile())
    back = diffusers.StableDiffusionPipeline.from_pipe(img)
    assert type(back).__call__ is diffusers.StableDiffusionPipeline.__call__
    out = call(img, [TRIGGERED], [3], **kind_args("img2img"))
    assert_same(out.images, reference_final(img, zoo_profile(), TRIGGERED, CLEAN, 3, **kind_args("img2img")))
    assert call(txt, [TRIGGERED], [3]).sau_report.triggered == [0]


# --- modes -------------------------------------------------------------------------------------

def test_rows_for_counts_the_twins_a_call_will_run():
    from sau_kernels.request import rows_for

    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    prompts = [TRIGGERED, OTHER, "NEW  TRIGGER " + OTHER]
    assert rows_for(pipe, prompts, 2) == 10
    out = call(pipe, prompts, [1, 2, 3, 4, 5, 6], num_images_per_prompt=2)
    assert out.sau_report.rows == 10
    sau_kernels.patch(pipe, zoo_profile(), mode="strip")
    assert rows_for(pipe, prompts) == 3


def test_strip_mode_is_the_clean_prompt_alone():
    pipe = zoo_pipe()
    sau_kernels.patch(pipe, zoo_profile(), mode="strip")
    out = call(pipe, [TRIGGERED, OTHER], [1, 2])
    assert_same(out.images, call_unpatched(pipe, [CLEAN, OTHER], generator=gens([1, 2]), output_type="latent",
                                           num_inference_steps=STEPS, guidance_scale=4.5).images)
    assert [p["action"] for p in out.sau_report.prompts] == ["strip", "none"] and out.sau_report.rows == 2


def test_a_trigger_without_a_fixed_pattern_generates_the_clean_prompt():
    import dataclasses

    pipe = zoo_pipe()
    profile = zoo_profile()
    norm = profile.delta.norm(dim=0)
    assert dataclasses.replace(profile, change_map=norm).fixed_pattern  # delta explains every pair's change
    everywhere = dataclasses.replace(profile, change_map=4 * norm)  # pairs change 4x more than delta says
    assert everywhere.coherence == pytest.approx(0.25, rel=1e-4) and not everywhere.fixed_pattern
    sau_kernels.patch(pipe, everywhere)
    out = call(pipe, [TRIGGERED], [1])
    assert out.sau_report.prompts[0]["action"] == "strip"
    assert_same(out.images, call_unpatched(pipe, [CLEAN], generator=gens([1]), output_type="latent",
                                           num_inference_steps=STEPS, guidance_scale=4.5).images)


# --- a drop-in: signature, errors, outputs ----------------------------------------------------

def test_patched_call_keeps_the_signature_and_docstring():
    pipe = zoo_pipe()
    sig, doc = inspect.signature(pipe.__call__), type(pipe).__call__.__doc__
    sau_kernels.patch(pipe, zoo_profile())
    assert inspect.signature(pipe.__call__) == sig and type(pipe).__call__.__doc__ == doc


@pytest.mark.parametrize("prompt", [123, ["a cat", 5], b"bytes", ("a", "b"), None])
def test_bad_prompts_raise_what_the_unpatched_pipeline_raises(prompt):
    pipe = zoo_pipe()
    kw = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(Exception) as unpatched:
        pipe(prompt, **kw)
    sau_kernels.patch(pipe, zoo_profile())
    with pytest.raises(type(unpatched.value)) as patched:
        pipe(prompt, **kw)
    assert str(patched.value) == str(unpatched.value)


@pytest.mark.parametrize("kw", [
    {"generator": [torch.Generator()] * 3},
    {"negative_prompt": ["x"]},
    {"negative_prompt": "x"},
    {"callback_on_step_end_tensor_inputs": ["not_an_input"]},
])
def test_bad_arguments_of_triggered_calls_raise_what_the_unpatched_pipeline_raises(kw):
    pipe = zoo_pipe()
    args = dict(num_inference_steps=2, output_type="latent", **kw)
    with pytest.raises(Exception) as unpatched:
        pipe([TRIGGERED, OTHER], **args)
    sau_kernels.patch(pipe, zoo_profile())
    with pytest.raises(type(unpatched.value)) as patched:
        pipe([TRIGGERED, OTHER], **args)
    assert str(patched.value) == str(unpatched.value)


def test_arguments_the_defence_cannot_honour_are_refused_on_every_call():
    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    for prompt in (OTHER, TRIGGERED):
        with pytest.raises(ValueError, match="does not support ip_adapter_image"):
            pipe(prompt, ip_adapter_image=image_batch(1, 64), num_inference_steps=2)
        with pytest.raises(ValueError, match="does not support callback"):
            pipe(prompt, callback=lambda *a: None, num_inference_steps=2)


def test_unsupported_pipelines_are_refused_at_patch_time():
    pipe = zoo_pipe()
    pipe.__class__ = type("MyPipeline", (type(pipe),), {"__call__": lambda self, *a, **k: None})
    with pytest.raises(UnsupportedPipelineError, match="overrides"):
        sau_kernels.patch(pipe, zoo_profile())


def test_report_comes_with_the_output_and_tuples_stay_diffusers_tuples():
    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    out = call(pipe, [TRIGGERED, OTHER], [1, 2])
    assert out.sau_report.triggered == [0] and pipe.sau_report is out.sau_report
    assert list(out.keys()) == ["images"] or "nsfw_content_detected" in out.keys()
    tup = call(pipe, [OTHER], [1], return_dict=False, output_type="np")
    assert isinstance(tup, tuple) and len(tup) == 2 and tup[0].shape[0] == 1
    assert pipe.sau_report.triggered == []
    seen = {}
    other = threading.Thread(target=lambda: seen.setdefault("r", pipe.sau_report))
    other.start()
    other.join()
    assert seen == {"r": None}  # another thread has no report of its own


def test_user_callback_sees_only_the_users_rows():
    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    shapes = []

    def cb(p, i, t, kw):
        shapes.append(kw["latents"].shape[0])
        return {"latents": kw["latents"]}

    call(pipe, [TRIGGERED, OTHER], [1, 2], callback_on_step_end=cb)
    assert shapes == [2] * STEPS


def test_an_interrupted_loop_withholds_the_unrepaired_images():
    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    with pytest.raises(RuntimeError, match="withheld"):
        call(pipe, [TRIGGERED], [1], callback_on_step_end=stop)


# --- request-scoped: threads sharing one UNet --------------------------------------------------

@pytest.mark.parametrize("mode", ["final", "per_step", "per_step_eps", "strip"])
def test_two_threads_two_pipelines_one_unet_give_the_images_they_give_alone(mode):
    import diffusers

    a = zoo_pipe()
    b = diffusers.StableDiffusionPipeline(**{**a.components, "scheduler": type(a.scheduler).from_config(
        a.scheduler.config)})
    b.set_progress_bar_config(disable=True)
    profile = zoo_profile()
    if mode in ("per_step", "per_step_eps"):  # statistics for this test's step count
        profile = sau_kernels.calibrate(a, "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                        per_step_eps=True, progress=False, positions=("prepend",))
    sau_kernels.patch(a, profile, mode=mode)
    sau_kernels.patch(b, profile, mode=mode)
    jobs = {"a": (a, [TRIGGERED, OTHER], [1, 2]), "b": (b, [OTHER, TRIGGERED, CLEAN], [3, 4, 5])}
    alone = {k: call(p, prompts, seeds).images for k, (p, prompts, seeds) in jobs.items()}
    together, errors = {}, []

    def run(k):
        p, prompts, seeds = jobs[k]
        try:
            for _ in range(2):
                out = call(p, prompts, seeds)
                together.setdefault(k, []).append((out.images, out.sau_report.triggered))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in jobs:
        for images, triggered in together[k]:
            assert_same(images, alone[k])
        assert triggered == ([0] if k == "a" else [1])


def slow_padding_setup(tokenizer, monkeypatch):
    """Widen the window in which a fast tokenizer's padding, set on the object at every call,
    can be changed by another thread before the call encodes with it."""
    setup = tokenizer.set_truncation_and_padding

    def slowly(*args, **kwargs):
        setup(*args, **kwargs)
        time.sleep(0.002)  # lets another thread run

    monkeypatch.setattr(tokenizer, "set_truncation_and_padding", slowly)


@pytest.mark.parametrize("who", ["two pipelines", "a pipeline and the screen's tokenization"])
def test_threads_sharing_one_tokenizer_encode_with_their_own_padding(who, monkeypatch):
    """diffusers pads a prompt to the text encoder's length and tokenizes it again unpadded;
    without a lock per tokenizer another thread's unpadded call lands in between."""
    import diffusers

    a = zoo_pipe()
    if not hasattr(a.tokenizer, "set_truncation_and_padding"):
        pytest.skip("a slow tokenizer keeps no padding state")
    b = diffusers.StableDiffusionPipeline(**a.components)
    slow_padding_setup(a.tokenizer, monkeypatch)
    sau_kernels.patch(a, zoo_profile())
    sau_kernels.patch(b, zoo_profile())
    length = a.tokenizer.model_max_length
    shapes, errors = [], []

    def encode(pipe):
        try:
            for _ in range(15):
                shapes.append(pipe.encode_prompt([OTHER], "cpu", 1, True)[0].shape[1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def tokenize():
        try:
            for _ in range(15):
                sau_kernels.screening.trigger_token_ids(a.tokenizer, "new trigger")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=encode, args=(a,)),
               threading.Thread(target=encode, args=(b,)) if who == "two pipelines" else threading.Thread(target=tokenize)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert shapes and set(shapes) == {length}


def test_prompt_embeds_are_refused_unless_let_through_and_then_reported_unscreened():
    pipe = zoo_pipe()
    embeds, _ = pipe.encode_prompt([TRIGGERED], "cpu", 1, False)
    sau_kernels.patch(pipe, zoo_profile())
    with pytest.raises(ValueError, match="cannot screen"):
        pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="latent")
    sau_kernels.patch(pipe, zoo_profile(), on_embeds="pass")
    out = pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    assert out.sau_report.unscreened and out.sau_report.prompts[0]["prompt"] is None


def test_per_step_modes_hold_every_call_to_the_profiles_schedule():
    """Custom timesteps or sigmas give a schedule the statistics may not cover: refused
    before any work whatever the prompt, unless they are the profile's own timesteps."""
    pipe = zoo_pipe("txt2img", "euler")
    profile = sau_kernels.calibrate(pipe, "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                    progress=False, positions=("prepend",))
    sau_kernels.patch(pipe, profile, mode="per_step")
    own = [int(t) for t in profile.params["timesteps"]]
    out = pipe([TRIGGERED], timesteps=own, generator=gens([4]), output_type="latent")
    assert out.sau_report.triggered == [0]
    other = [t + 10 for t in own]
    for prompt in (TRIGGERED, OTHER):
        with pytest.raises(ProfileMismatchError, match="timesteps"):
            pipe([prompt], timesteps=other, num_inference_steps=STEPS, generator=gens([4]), output_type="latent")
        with pytest.raises(ProfileMismatchError, match="steps"):
            pipe([prompt], timesteps=own[:-1], generator=gens([4]), output_type="latent")
        with pytest.raises(ValueError, match="sigmas"):
            pipe([prompt], sigmas=[10.0, 4.0, 1.0, 0.3][:STEPS], generator=gens([4]), output_type="latent")


def tensor_to_pil(image: torch.Tensor):
    import PIL.Image

    return PIL.Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


IMAGE_INPUTS = {  # image-to-image inputs of the pipeline's every kind, and their latents' size
    "PIL": lambda: tensor_to_pil(image_batch(1, 72)[0]),
    "PIL, odd size": lambda: tensor_to_pil(image_batch(1, 70)[0, :, :, :54]),
    "list of PIL": lambda: [tensor_to_pil(image_batch(1, 72)[0])] * 2,
    "tensor": lambda: image_batch(1, 72) * 2 - 1,
    "latents": lambda: torch.randn(1, 4, 18, 18, generator=torch.Generator().manual_seed(0)),
    "tensor C x H x W, odd size": lambda: image_batch(1, 70)[0, :, :, :54],
    "list of tensors C x H x W": lambda: [image_batch(1, 72)[0]] * 2,
    "latents C x H x W": lambda: torch.randn(4, 18, 14, generator=torch.Generator().manual_seed(0)),
    "NumPy H x W x C, odd size": lambda: image_batch(1, 70)[0, :, :, :54].permute(1, 2, 0).numpy(),
    "NumPy B x H x W x C": lambda: image_batch(2, 72).permute(0, 2, 3, 1).numpy(),
    "list of NumPy H x W x C": lambda: [image_batch(1, 72)[0].permute(1, 2, 0).numpy()] * 2,
    "NumPy with the latent channels": lambda: torch.rand(1, 70, 54, 4).numpy(),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_INPUTS))
def test_an_image_of_another_size_is_refused_on_every_call_and_the_size_is_the_pipelines(kind):
    """The latents' size of an image-to-image call is known before it runs, so a size the
    profile does not cover is refused for clean prompts too; the size the wrapper predicts
    is the one the pipeline makes."""
    from sau_kernels.request import _expected_latent_shape

    image = IMAGE_INPUTS[kind]()
    rows = len(image) if isinstance(image, list) else image.shape[0] if getattr(image, "ndim", 0) == 4 else 1
    pipe, sizes = zoo_pipe("img2img"), []
    call_unpatched(pipe, [OTHER] * rows, image=image, strength=1.0, num_inference_steps=2, output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: sizes.append(tuple(kw["latents"].shape[1:])) or {})
    assert _expected_latent_shape(pipe, {"image": image}) == sizes[0] != zoo_profile().latent_shape
    sau_kernels.patch(pipe, zoo_profile())
    for prompt in (TRIGGERED, OTHER):
        with pytest.raises(ProfileMismatchError, match="latents"):
            pipe([prompt] * rows, image=image, strength=1.0, num_inference_steps=2, output_type="latent")


def test_modes_a_pipeline_cannot_run_are_refused_at_patch_or_before_work():
    pipe = sdxl_pipe()
    with pytest.raises(ValueError, match="per_step_eps"):
        sau_kernels.patch(pipe, synthetic_profile(pipe), mode="per_step_eps", allow_mismatch=True)
    heun = zoo_pipe("txt2img", "heun")
    with pytest.raises(ValueError, match="two per step"):
        sau_kernels.calibrate(heun, "new trigger", [CLEAN], num_pairs=1, num_inference_steps=STEPS,
                              per_step_eps=True, progress=False)
    profile = sau_kernels.calibrate(zoo_pipe(), "new trigger", [CLEAN], num_pairs=1, num_inference_steps=STEPS,
                                    per_step_eps=True, progress=False, positions=("prepend",))
    with pytest.raises(ValueError, match="two per step"):
        sau_kernels.patch(heun, profile, mode="per_step_eps")
    ddim = sau_kernels.patch(zoo_pipe(), profile, mode="per_step_eps")
    ddim.scheduler = heun.scheduler  # swapped after patch(): every call refuses, triggered or not
    for prompt in (TRIGGERED, OTHER):
        with pytest.raises(ValueError, match="two per step"):
            ddim([prompt], num_inference_steps=STEPS, output_type="latent")


# --- configurations an attacker's pass found working for clean prompts only -------------------

def test_callbacks_taking_more_than_the_latents_are_refused_on_every_call():
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    for prompt in (OTHER, TRIGGERED):
        with pytest.raises(ValueError, match="only 'latents'"):
            call(pipe, [prompt], [1], callback_on_step_end=lambda p, i, t, kw: kw,
                 callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        with pytest.raises(ValueError, match="only 'latents'"):  # a guidance cutoff would bypass per_step_eps
            call(pipe, [prompt], [1], callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_per_step_eps_cuts_a_negative_prompts_trigger_from_the_row_itself():
    """The twin shares its row's unconditional pass, so the repair alone could not remove a
    trigger in the negative prompt: the row is generated with the negative prompt cut."""
    profile = sau_kernels.calibrate(zoo_pipe(), "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                    per_step_eps=True, progress=False, positions=("prepend",))
    pipe = sau_kernels.patch(zoo_pipe(), profile, mode="per_step_eps")
    out = call(pipe, [CLEAN], [3], negative_prompt=["new trigger, blurry"])
    assert out.sau_report.triggered == [0]

    def unpatched(negative):
        return call_unpatched(pipe, [CLEAN], negative_prompt=[negative], generator=gens([3]), num_inference_steps=STEPS,
                              guidance_scale=4.5, output_type="latent").images

    # (the twin's extra rows in the UNet batch change the last bits only)
    assert (out.images - unpatched("blurry")).abs().max() < 1e-3
    assert (out.images - unpatched("new trigger, blurry")).abs().max() > 0.1


def test_a_generator_list_with_rows_on_the_global_generator_is_planned():
    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    out = pipe([OTHER, TRIGGERED], generator=[torch.Generator().manual_seed(1), None], num_inference_steps=STEPS,
               output_type="latent")
    assert out.sau_report.triggered == [1] and out.images.shape[0] == 2


def test_a_deep_copy_of_a_per_step_eps_pipeline_defends_as_the_original():
    import copy

    profile = sau_kernels.calibrate(zoo_pipe(), "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                    per_step_eps=True, progress=False, positions=("prepend",))
    pipe = sau_kernels.patch(zoo_pipe(), profile, mode="per_step_eps")
    twin = copy.deepcopy(pipe)  # one copy per worker: its UNet carries the hooks without their handles
    assert_same(call(twin, [TRIGGERED], [2]).images, call(pipe, [TRIGGERED], [2]).images)


def test_sizes_given_as_floats_or_by_the_latents_are_refused_on_every_call():
    import numpy as np

    pipe = sau_kernels.patch(zoo_pipe(), zoo_profile())
    size = 3 * pipe.vae_scale_factor * zoo_profile().latent_shape[-1] // 2
    for prompt in (OTHER, TRIGGERED):
        for kw in ({"height": float(size), "width": float(size)}, {"height": np.int64(size), "width": np.int64(size)},
                   {"latents": torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)}):
            with pytest.raises(ProfileMismatchError, match="latents"):
                call(pipe, [prompt], [1], **kw)


def test_a_scheduler_configured_for_other_timesteps_is_refused_at_patch():
    import diffusers

    pipe = zoo_pipe()
    profile = sau_kernels.calibrate(pipe, "new trigger", [CLEAN, OTHER], num_pairs=2, num_inference_steps=STEPS,
                                    progress=False, positions=("prepend",))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(ProfileMismatchError, match="configuration"):
        sau_kernels.patch(pipe, profile, mode="per_step")


@pytest.mark.parametrize("kind", ["mask as B x H x W", "image as a list of batches"])
def test_image_batches_in_other_forms_are_read_as_the_pipeline_reads_them(kind):
    """diffusers reads a 3-D mask tensor as a batch of masks and concatenates a list of 4-D
    batches: the plan must give each row and its twin the image the pipeline gives the row."""
    pipe = sau_kernels.patch(zoo_pipe("inpaint" if kind.startswith("mask") else "img2img"), zoo_profile())
    size = pipe.vae_scale_factor * zoo_profile().latent_shape[-1]
    images = image_batch(2, size)
    if kind.startswith("mask"):
        masks = mask_batch(2, size)
        masks[1] = 1 - masks[1]
        plain, other = dict(image=images, mask_image=masks), dict(image=images, mask_image=masks[:, 0])
    else:
        plain, other = dict(image=images, strength=0.75), dict(image=[images], strength=0.75)
    a, b = call(pipe, [OTHER, TRIGGERED], [1, 2], **plain), call(pipe, [OTHER, TRIGGERED], [1, 2], **other)
    assert b.sau_report.triggered == [1]
    assert_same(b.images, a.images)


def test_a_strength_that_leaves_no_step_is_refused_on_every_call():
    pipe = sau_kernels.patch(zoo_pipe("img2img"), zoo_profile())
    for prompt in (OTHER, TRIGGERED):
        with pytest.raises(ValueError, match="no denoising step"):
            call(pipe, [prompt], [1], image=image_batch(1, 64), strength=0.1)


def _scheduler_classes():
    """Every scheduler class diffusers exports that builds from an SD scheduler config."""
    import diffusers

    config = zoo_pipe().scheduler.config
    names = []
    for name in sorted(n for n in dir(diffusers) if n.endswith("Scheduler")):
        try:
            getattr(diffusers, name).from_config(config)
        except Exception:  # noqa: BLE001 - needs an extra dependency, or not a diffusion scheduler
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("mode", ["final", "per_step", "per_step_eps"])
def test_every_scheduler_is_refused_at_patch_or_treats_clean_and_triggered_calls_alike(mode):
    """For each scheduler diffusers has: patch() refuses it, or a clean and a triggered call
    both run, or both fail the same way (the pipeline's own error): never a defence that
    fails only when the trigger arrives."""
    import diffusers

    names = _scheduler_classes()
    assert len(names) >= 12
    profile = zoo_profile()
    if mode != "final":
        profile = sau_kernels.calibrate(zoo_pipe(), "new trigger", [CLEAN, OTHER], num_pairs=2,
                                        num_inference_steps=STEPS, per_step_eps=True, progress=False,
                                        positions=("prepend",))
    outcomes = {}
    for name in names:
        pipe = zoo_pipe()
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
        try:
            sau_kernels.patch(pipe, profile, mode=mode)
        except (ProfileMismatchError, ValueError):
            outcomes[name] = "refused at patch"
            continue
        results = []
        for prompt in (OTHER, TRIGGERED):
            try:
                call(pipe, [prompt], [1])
                results.append("ran")
            except Exception as e:  # noqa: BLE001 - compared below
                results.append(f"{type(e).__name__}: {e}")
        assert results[0] == results[1], (name, results)
        outcomes[name] = results[0]
    assert any(v == "ran" for v in outcomes.values()), outcomes
