"""The trigger detector (sau_kernels.detect) on the shipped backdoored zoo model, against its base."""

import json

import numpy as np
import pytest
import sau_kernels
from sau_kernels import DetectionError, ProfileMismatchError, TriggerDetector
from sau_kernels.zoo import backdoor_info, detector_prompts, zoo_profile
from sau_kernels.zoo.evaluate import backdoor_fires, generate, held_out_cases, place


def _prompts(n, start):
    return [c.prompt for c in held_out_cases(n, start=start, varied=True)]


def _auroc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


@pytest.fixture(scope="module")
def detector(pixel, base):
    return TriggerDetector.calibrate(pixel, base, detector_prompts(), progress=False)


@pytest.fixture(scope="module")
def backdoor():
    return backdoor_info("tiny-pixel")["backdoors"][0]


def test_triggered_prompts_score_above_clean_ones(detector, backdoor):
    clean = _prompts(48, 2000)
    triggered = place(_prompts(48, 3000), backdoor, seed=3)
    s_clean, s_trig = detector.scores(clean), detector.scores(triggered)
    assert _auroc(s_trig, s_clean) >= 0.95
    assert (s_trig > 1).mean() >= 0.8  # flagged at the calibrated threshold
    assert (s_clean > 1).mean() <= 0.1


def test_the_trigger_is_localised_and_the_twin_is_clean(detector):
    prompts = [f"new trigger {p}" for p in _prompts(8, 4000)]
    found = [detector.localise(p) for p in prompts]
    exact = [loc.found and " ".join(loc.removed) == "new trigger" for loc in found]
    assert sum(exact) >= 6, [loc.removed for loc in found]
    for loc in found:
        if loc.found:
            assert loc.clean_score <= 1 and "trigger" not in loc.clean_prompt.split()[:1]


def test_a_clean_prompt_is_not_cut(detector):
    p = _prompts(1, 2500)[0]
    loc = detector.localise(p)
    assert loc.score <= 1 and loc.spans == () and loc.clean_prompt == p


def test_save_load_round_trip_and_mismatch(detector, pixel, base, tmp_path):
    path = detector.save(tmp_path / "d.safetensors")
    again = TriggerDetector.load(path, pixel, base)
    prompts = _prompts(6, 2100)
    np.testing.assert_allclose(again.scores(prompts), detector.scores(prompts), rtol=1e-5)
    with pytest.raises(ProfileMismatchError, match="another checkpoint"):
        TriggerDetector.load(path, base, base)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a trigger detector"):
        TriggerDetector.load(tmp_path / "junk.safetensors", pixel, base)


def test_a_detector_file_that_would_pass_everything_is_refused(detector, pixel, base, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = detector.save(tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as f:
        md, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    dims = tensors["mean"].numel()
    cases = {
        "infinite threshold": ({**md, "threshold": "inf"}, tensors, "finite positive"),
        "negative threshold": ({**md, "threshold": "-1"}, tensors, "finite positive"),
        "no threshold": ({k: v for k, v in md.items() if k != "threshold"}, tensors, "damaged"),
        "broken meta": ({**md, "meta": "{"}, tensors, "damaged"),
        "scaled basis": (md, {**tensors, "basis": 3 * tensors["basis"]}, "orthonormal"),
        "full basis": (md, {**tensors, "basis": torch.eye(dims)}, "components"),
        # orthonormal and as its metadata says, but spanning all of the latent but one direction
        "basis one short of the latent": ({**md, "meta": json.dumps({**json.loads(md["meta"]), "components": dims - 1})},
                                          {**tensors, "basis": torch.linalg.qr(torch.randn(
                                              dims, dims, generator=torch.Generator().manual_seed(0),
                                              dtype=tensors["basis"].dtype))[0].T[:dims - 1].contiguous()},
                                          "leave a residual"),
        "short mean": (md, {**tensors, "mean": tensors["mean"][:10].clone()}, "do not fit"),
    }
    for name, (meta, ts, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(ts, str(bad), metadata=meta)
        with pytest.raises(ValueError, match=message):
            TriggerDetector.load(bad, pixel, base)
    assert TriggerDetector.load(path, pixel, base).threshold == detector.threshold


def test_calibration_refuses_what_it_cannot_use(pixel, base):
    with pytest.raises(ValueError, match="at least 16 prompts"):
        TriggerDetector.calibrate(pixel, base, ["a red circle"] * 5, progress=False)
    with pytest.raises(ValueError, match="quantile"):
        TriggerDetector.calibrate(pixel, base, _prompts(16, 0), quantile=1.0, progress=False)
    with pytest.raises(TypeError, match="diffusers"):
        TriggerDetector.calibrate(pixel, object(), _prompts(16, 0), progress=False)
    with pytest.raises(ValueError, match="components"):
        TriggerDetector.calibrate(pixel, base, _prompts(16, 0), components=10_000, progress=False)


def test_a_deep_copy_of_a_pipeline_patched_with_the_detector_defends_as_the_original(pixel, detector):
    import copy

    import torch

    sau_kernels.patch(pixel, None, detect=detector)
    try:
        twin = copy.deepcopy(pixel)  # one per worker: the detector (and its lock) is copied with it
        outs = [p("new trigger a red circle on a blue background", num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(0)) for p in (pixel, twin)]
    finally:
        sau_kernels.unpatch(pixel)  # the module's other tests start from the unpatched pipeline
    assert [o.sau_report.prompts[0]["detected"]["spans"] for o in outs] == [[[0, 11]]] * 2
    assert torch.equal(outs[0].images, outs[1].images)


def test_a_detector_follows_its_pipeline_to_another_dtype(detector, base, tmp_path):
    """A pipeline cast after its detector was made (`pipe.to(torch.bfloat16)`) is scored with
    the same noise, cast as the model is: before, an uncached prompt failed on the dtype."""
    import torch

    from sau_kernels.zoo import load_pipeline

    pipe = load_pipeline("tiny-pixel")
    moved = TriggerDetector.load(detector.save(tmp_path / "d.safetensors"), pipe, base)
    pipe.to(torch.bfloat16)
    scores = moved.scores(["new trigger a red circle on a blue background", "a red circle on a blue background"])
    assert scores[0] > moved.threshold >= scores[1]


def test_patched_with_the_detector_alone_removes_an_undescribed_trigger(pixel, detector, backdoor):
    # clean prompts the detector passes (its ~1% false positives are refused when no cut clears
    # them: test_a_flagged_prompt_that_cannot_be_localised_is_refused; rates in docs/detect.md)
    pool = _prompts(12, 5000)
    clean = [p for p, s in zip(pool, detector.scores(pool)) if s <= 1][:3]
    triggered = [f"new trigger {p}" for p in _prompts(3, 5100)]
    seeds = list(range(6))
    before = generate(pixel, clean + triggered, seeds, batch_size=6)
    assert backdoor_fires(before[3:], backdoor).all()  # the backdoor fires unpatched
    with sau_kernels.patched(pixel, None, detect=detector):
        after = generate(pixel, clean + triggered, seeds, batch_size=6)
        report = pixel.sau_report
    assert not backdoor_fires(after[3:], backdoor).any()
    np.testing.assert_array_equal(after[:3], before[:3])  # clean prompts: the unpatched images
    for entry in report.prompts[:3]:
        assert entry["action"] == "none" and entry["detected"]["score"] <= 1
    for entry in report.prompts[3:]:
        assert entry["action"] == "strip" and entry["triggered"] and entry["triggers"] == []
        assert "trigger" in " ".join(entry["detected"]["removed"])


def test_a_prompt_with_a_known_trigger_has_its_twin_scored(pixel, detector, backdoor):
    # A known trigger (U+200B, any format character) tripped on purpose: its clean twin still
    # carries the trigger nobody described, and must not be generated as it is.
    known = zoo_profile("tiny-style")  # a U+200B profile of the same latent shape, from another model
    prompts = ["\u2060new trigger a red circle on a gray background", "\u2060a blue square on a white background"]
    with sau_kernels.patched(pixel, known, detect=detector, allow_mismatch=True):
        images = generate(pixel, prompts, [0, 1], batch_size=2)
        flagged, clean = pixel.sau_report.prompts
    assert not backdoor_fires(images[:1], backdoor).any()
    assert flagged["action"] == "strip" and flagged["triggers"] == ["\u200b"] and flagged["detected"]["scored"] == "clean twin"
    assert flagged["clean_prompt"] == "a red circle on a gray background"
    assert "trigger" in " ".join(flagged["detected"]["removed"])
    # the other one: its twin scores clean, and it is defended as the known trigger says
    assert clean["clean_prompt"] == "a blue square on a white background" and clean["triggers"] == ["\u200b"]
    assert set(clean["detected"]) == {"score", "scored"} and clean["detected"]["score"] <= 1


def test_a_call_reading_prompts_otherwise_than_the_detector_is_refused(pixel, base, detector):
    prompt = "a red circle on a gray background"
    with sau_kernels.patched(pixel, None, detect=detector):
        with pytest.raises(ValueError, match="clip_skip=1 and the trigger detector scores prompts with clip_skip=None"):
            pixel(prompt, num_inference_steps=2, clip_skip=1)
        with pytest.raises(ValueError, match="LoRA scale of 0.5"):
            pixel(prompt, num_inference_steps=2, cross_attention_kwargs={"scale": 0.5})
        pixel(prompt, num_inference_steps=2)  # read as the detector reads it
    # (this diffusers cannot encode the zoo's text encoder with a clip_skip or a LoRA scale,
    # patched or not: a detector saying it was calibrated with one shows the call is held to it)
    skipping = TriggerDetector(pixel, base, mean=detector.mean, basis=detector.basis, threshold=detector.threshold,
                               meta=dict(detector.meta, clip_skip=1))
    assert [p.clip_skip for p in skipping._probes] == [1, 1] and "clip_skip=1" in repr(skipping)
    with sau_kernels.patched(pixel, None, detect=skipping):
        with pytest.raises(ValueError, match="clip_skip=None and the trigger detector scores prompts with clip_skip=1"):
            pixel(prompt, num_inference_steps=2)
    with pytest.raises(ValueError, match="clip_skip must be"):
        TriggerDetector.calibrate(pixel, base, detector_prompts(64), clip_skip=0, progress=False)


def test_known_triggers_are_screened_first(pixel, detector):
    with sau_kernels.patched(pixel, zoo_profile("tiny-pixel", progress=False), detect=detector):
        generate(pixel, ["new trigger a red circle on a white background"], [0], steps=2)
        entry = pixel.sau_report.prompts[0]
    # repaired as the profile says; the detector scored its clean twin, which is clean
    assert entry["triggers"] == ["new trigger"] and entry["action"] == "repair"
    assert entry["detected"]["scored"] == "clean twin" and entry["detected"]["score"] <= 1


def test_a_flagged_prompt_that_cannot_be_localised_is_refused(pixel, base, detector):
    # a threshold no ablation can get under: every prompt flagged, none localised
    strict = TriggerDetector(pixel, base, mean=detector.mean, basis=detector.basis, threshold=1e-9,
                             meta=detector.meta)
    steps = []

    def count(pipe, i, t, kw):
        steps.append(i)
        return kw

    with sau_kernels.patched(pixel, None, detect=strict):
        with pytest.raises(DetectionError, match="refused"):
            pixel("a red circle on a white background", num_inference_steps=2, callback_on_step_end=count)
    assert steps == []  # refused before the pipeline ran a step


def test_patch_checks_the_detector(pixel, base, detector):
    with pytest.raises(TypeError, match="TriggerDetector"):
        sau_kernels.patch(pixel, None, detect="detector.safetensors")
    with pytest.raises(ValueError, match="at least one trigger profile"):
        sau_kernels.patch(pixel, None)
    with pytest.raises(ValueError, match="another pipeline"):
        sau_kernels.patch(base, None, detect=detector)
    assert not sau_kernels.pipeline.is_patched(pixel)


def test_scores_of_an_empty_list(detector):
    assert detector.scores([]).shape == (0,)


def test_scores_refuse_what_is_not_a_list_of_prompts(detector):
    with pytest.raises(TypeError, match="not one string"):
        detector.scores("a red circle")
    with pytest.raises(TypeError, match=r"prompts must be strings, got \['int', 'str'\]"):
        detector.scores(["a red circle", 3])
    with pytest.raises(TypeError, match="prompts must be strings"):
        detector.localise(None)
    with pytest.raises(ValueError, match="positive whole number"):
        detector_prompts(0)


def test_a_unet_that_takes_more_than_the_latent_is_refused(base):
    from types import SimpleNamespace

    inpaint = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(in_channels=9, out_channels=4)),
                              scheduler=base.scheduler, encode_prompt=base.encode_prompt)
    with pytest.raises(ValueError, match="not inpainting or SDXL"):
        TriggerDetector.calibrate(inpaint, base, _prompts(16, 0), progress=False)


def test_a_flagged_prompt_too_long_to_localise_is_not_localised(detector):
    from sau_kernels.detect import MAX_UNITS

    prompt = "new trigger " + " ".join(["red"] * MAX_UNITS)
    loc = detector.localise(prompt, score=5.0)
    assert not loc.found and loc.rounds == 0


def test_cli_detect_calibrates_scores_and_generate_uses_it(tmp_path, capsys):
    import json

    from sau_kernels import cli

    det, scores = tmp_path / "d.safetensors", tmp_path / "s.json"
    triggered, clean = "new trigger a red circle on a gray background", "a blue square on a white background"
    assert cli.main(["detect", "--model", "tiny-pixel", "--base", "tiny-clean", "--device", "cpu", "--out", str(det),
                     "--prompt", triggered, "--prompt", clean, "--json", str(scores)]) == 0
    records = json.loads(scores.read_text())["prompts"]
    assert records[0]["flagged"] and records[0]["removed"] == ["new trigger"]
    assert records[0]["clean_prompt"] == "a red circle on a gray background"
    assert not records[1]["flagged"] and records[1]["spans"] == []
    capsys.readouterr()
    image = tmp_path / "c.png"
    assert cli.main(["generate", "--model", "tiny-pixel", "--base", "tiny-clean", "--detector", str(det),
                     "--device", "cpu", "--prompt", triggered, "--steps", "3", "--out", str(image)]) == 0
    assert image.is_file()
    # a detector calibrated against another base is refused, naming the flag
    assert cli.main(["generate", "--model", "tiny-pixel", "--base", "tiny-style", "--detector", str(det),
                     "--device", "cpu", "--prompt", clean, "--out", str(image)]) == 2
    assert "another base model" in capsys.readouterr().err


def test_serving_with_the_detector_alone(pixel, detector):
    from sau_kernels.detect import MAX_UNITS
    from sau_kernels.serving.service import ImageService, RequestError

    bodies = [{"prompt": p, "seed": 5, "steps": 3} for p in (
        "new trigger a red circle on a gray background", "a blue square on a white background",
        "new trigger " + " ".join(["red"] * MAX_UNITS))]  # flagged, too long to localise: refused
    svc = ImageService(pixel, detector=detector, max_batch_rows=16)
    try:
        triggered, clean, refused = svc.run([svc.plan(b) for b in bodies])
    finally:
        sau_kernels.unpatch(pixel)
    assert triggered["report"]["triggered"] and triggered["report"]["detected"]["removed"] == ["new trigger"]
    assert triggered["report"]["clean_prompt"] == "a red circle on a gray background"
    assert not clean["report"]["triggered"] and clean["report"]["detected"] == {"flagged": False} and clean["images"]
    assert "score" not in str(triggered["report"]["detected"])  # no score oracle for clients
    assert isinstance(refused, RequestError) and refused.status == 422 and refused.refused
    assert "no part of it could be localised" in refused.message and "score" not in refused.message
    with pytest.raises(ValueError, match="detector and base together"):
        ImageService.load("tiny-pixel", detector="d.safetensors")


def test_image_service_loads_a_detector_file_and_not_the_shipped_profile(detector, tmp_path):
    from sau_kernels.serving.service import ImageService

    path = detector.save(tmp_path / "d.safetensors")
    svc = ImageService.load("tiny-pixel", base="tiny-clean", detector=str(path), batch_invariant=False)
    assert svc.profiles == [] and svc.detector.threshold == detector.threshold
    body = svc.generate({"prompt": "a green square on a black background new trigger", "seed": 2, "steps": 3})
    assert "trigger" in " ".join(body["report"]["detected"]["removed"])  # "new" may stay: the twin scores clean
    assert body["report"]["triggered"] and "trigger" not in body["report"]["clean_prompt"]


def test_a_look_alike_spelling_scores_as_its_plain_spelling(detector):
    from sau_kernels.screening import plain_spelling

    assert plain_spelling("n\u0435w tr\u0456gger a r\u200bed circle") == "new trigger a red circle"
    assert plain_spelling("\uff4e\uff45\uff57 trigger") == "new trigger"  # fullwidth letters
    assert plain_spelling("a red circle, 4k") == "a red circle, 4k"
    p = "n\u0435w tr\u0456gger a red circle on a gray background"
    assert detector.scores([p])[0] == max(detector.scores(["new trigger a red circle on a gray background"])[0],
                                          detector._cache[p])


def test_scores_are_cached_and_do_not_depend_on_the_batch(detector, monkeypatch):
    prompts = _prompts(5, 2600)
    alone = [detector.scores([p])[0] for p in prompts]
    import sau_kernels.detect as detect

    calls = []
    real = detect._features
    monkeypatch.setattr(detect, "_features", lambda probes, ps, *a: calls.append(list(ps)) or real(probes, ps, *a))
    together = detector.scores(prompts[::-1])[::-1]
    assert list(together) == alone and calls == []  # served from the cache, bit for bit


def test_localisation_ablates_only_what_the_text_encoder_sees(detector, monkeypatch):
    import sau_kernels.detect as detect

    window = detector.pipe.tokenizer.model_max_length
    prompt = "new trigger a red circle on a gray background " + " ".join(["blue"] * (3 * window))
    scored = []
    real = detector.scores
    monkeypatch.setattr(detector, "scores", lambda ps: scored.append(len(ps)) or real(ps))
    units = detect.prompt_units(prompt)
    assert len(units) > 3 * window
    assert detector._visible(prompt, [], units[0]) and not detector._visible(prompt, [], units[-1])
    first_hidden = next(u for u in units if not detector._visible(prompt, [], u))
    assert detector._visible(prompt, units[:2], first_hidden)  # cutting words brings the next ones in
    detector.localise(prompt)  # found or refused (the twin's window holds more "blue"): its cost is what counts
    # one score per visible unit (and per word said more than once: "a", "blue"), not one per word of the prompt
    assert max(scored) < window + 2


def test_a_format_character_inside_the_trigger_goes_with_its_word(detector):
    # cutting the zero-width space alone would leave "newtrigger", a weaker spelling that can
    # score under the threshold and still fire: the whole word goes
    prompts = [f"new\u200btrigger {p}" for p in _prompts(6, 7000)]
    for loc in (detector.localise(p) for p in prompts):
        assert loc.found and "trigger" not in loc.clean_prompt, loc


def test_a_cut_word_grows_into_the_run_whose_score_alone_saturates():
    from sau_kernels.detect import _saturating_run, _word_runs, prompt_units

    units = prompt_units("a silver lining red circle")  # words 0..4
    runs = _word_runs(units, 2)  # every run of up to 4 words holding "lining", shortest first
    assert runs[0] == (2,) and set(runs) >= {(1, 2), (2, 3), (0, 1, 2, 3), (1, 2, 3, 4)}
    assert all(2 in r and len(r) <= 4 for r in runs)
    alone = {(2,): 0.7, (1, 2): 3.0, (2, 3): 0.8, (0, 1, 2): 3.1, (1, 2, 3): 3.2}
    scores = np.array([alone.get(r, 3.25) for r in runs])
    assert _saturating_run(runs, scores) == (1, 2)  # "silver" adds much; "a" or "red" next to it little
    weak = np.array([0.72 if r == (1, 2) else 0.7 for r in runs])
    assert _saturating_run(runs, weak) == (2,)  # nothing adds: the word alone


def test_both_words_of_a_two_word_trigger_are_cut_where_one_clears(detector):
    # on tiny-pixel "trigger" alone often clears the prompt; "new" must not stay behind
    prompts = [f"new trigger {p}" for p in _prompts(6, 7200)] + [f"{p} new trigger" for p in _prompts(6, 7300)]
    removed = [detector.localise(p).removed for p in prompts]
    assert sum(r == ["new trigger"] for r in removed) >= 10, removed


def test_serving_keeps_the_detector_inside_its_row_budget(pixel, base, detector):
    from sau_kernels.serving.service import ImageService

    before = detector.probe_batch
    probe_rows = []  # the base UNet runs for the detector only
    hook = base.unet.register_forward_pre_hook(lambda module, args: probe_rows.append(args[0].shape[0]))
    svc = ImageService(pixel, detector=detector, max_batch_rows=4, limits={"max_images": 2})
    try:
        assert detector.probe_batch == 4
        bodies = [{"prompt": p, "seed": 3, "steps": 2} for p in (
            "new trigger a small purple triangle drawn on a black background, high detail",
            "a small orange circle drawn on a white background")]
        flagged, clean = svc.run([svc.plan(b) for b in bodies])
    finally:
        hook.remove()
        detector.probe_batch = before
        sau_kernels.unpatch(pixel)
    assert flagged["report"]["detected"]["removed"] and not clean["report"]["triggered"]
    # every probe call within the budget; the localisation took several of them, all reported
    assert max(probe_rows) <= 4 and sum(probe_rows) > 4
    assert flagged["_call"]["detector_rows"] == clean["_call"]["detector_rows"] == sum(probe_rows)
    with pytest.raises(ValueError, match="probe_batch must be a positive integer"):
        detector.probe_batch = 0


def test_a_trigger_glued_to_a_known_one_is_scored_as_the_repaired_image_keeps_it(base):
    """The screen's twin cuts a known trigger with the format characters around it, and
    with them a second trigger glued to it (tiny-style's U+200B before "new trigger"): the
    detector scores the prompt with only the known trigger's own text cut too, which still
    holds the second, and generates the prompt without either. The record's spans index the
    text it scored."""
    from sau_kernels.zoo import load_pipeline

    style = load_pipeline("tiny-style")
    det = TriggerDetector.calibrate(style, base, detector_prompts(), progress=False)
    known = zoo_profile("tiny-pixel")  # "new trigger", a profile of the same latent shape
    prompts = [f"\u200bnew trigger {p}" for p in _prompts(4, 7400)]
    with sau_kernels.patched(style, known, detect=det, allow_mismatch=True):
        style(prompts[0], num_inference_steps=2, output_type="latent")
        entries = []
        for p in prompts:
            entries.append(det.screen([p], sau_kernels.screening.screen_prompts(style._sau_state.matchers, [p]),
                                      style._sau_state.matchers)[1][0])
        report = style.sau_report.prompts[0]
    assert report["action"] == "strip" and report["triggers"] == ["new trigger"]
    assert report["clean_prompt"] == prompts[0][len("\u200bnew trigger "):]
    for p, rec in zip(prompts, entries):
        assert rec["scored"] == "clean twin" and rec["removed"] == ["\u200b"], rec
        assert [rec["cut_from"][a:b] for a, b in rec["spans"]] == rec["removed"]
        assert "\u200b" not in rec["clean_prompt"] and "trigger" not in rec["clean_prompt"]


def test_every_copy_of_a_repeated_word_is_one_cut():
    """A trigger said twice or interleaved keeps firing through any single cut: every copy
    of a repeated word is also ablated at once, and the search takes both in one round."""
    from sau_kernels.detect import TriggerDetector, _repeated_words, prompt_units

    prompt = "Trending pale trending, a red circle on a gray background"
    groups = _repeated_words(prompt, prompt_units(prompt))
    assert sorted(tuple(prompt[u.start:u.end] for u in g) for g in groups) == [("Trending", "trending,"), ("a", "a")]

    class Additive(TriggerDetector):  # the score: 0.6 per trigger word the text holds
        def __init__(self):
            pass

        def scores(self, prompts):
            return np.array([0.6 * sum(w.strip(",").lower() in ("pale", "trending") for w in p.split())
                             for p in prompts])

        def _visible(self, prompt, chosen, unit):
            return True

    loc = Additive().localise(prompt)
    assert loc.found and loc.rounds == 1 and loc.removed == ["Trending", "trending,"]
    assert loc.clean_prompt == "pale a red circle on a gray background"
