"""The zoo: synthetic world, tokenizer, shipped models, metrics, training CLIs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sau_kernels.zoo import metrics
from sau_kernels.zoo import NAMES, backdoor_info, load_pipeline, model_dir, world
from sau_kernels.zoo import tokenizer as zoo_tokenizer
from sau_kernels.zoo.evaluate import generate, held_out_cases, with_trigger

SAMPLE = held_out_cases(8, start=100)  # a small fixed sample, disjoint from the README's 200


# --- world and tokenizer ----------------------------------------------------------------------

def test_render_is_deterministic_and_keeps_corners_clear():
    a = world.render("red", "triangle", "white", np.random.default_rng(3))
    b = world.render("red", "triangle", "white", np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    bg = np.array(world.BACKGROUNDS["white"])
    for corner in world.CORNERS:
        rows, cols = world.corner_slices(corner, world.PATCH_SIZE)
        assert np.abs(a[rows, cols].astype(int) - bg).max() <= 6  # background only


def test_held_out_split_covers_every_attribute():
    held, train = world.held_out_combinations(), world.train_combinations()
    assert len(held) == 9 and len(held) + len(train) == 54
    for i, names in enumerate((world.COLORS, world.SHAPES, world.BACKGROUNDS)):
        assert {c[i] for c in train} == set(names)


@pytest.mark.parametrize("kind", ["checker", "cross", "solid:#ff8800"])
def test_patches_align_to_latent_cells(kind):
    p = world.make_patch(kind)
    assert p.shape == (16, 16, 3) and p.dtype == np.uint8
    cells = p.reshape(4, 4, 4, 4, 3)
    assert (cells == cells[:, :1, :, :1]).all()  # constant over each 4x4 cell


@pytest.mark.parametrize("bad", ["stripes", "solid:#12345", "solid:#gg0000"])
def test_bad_patch_names_are_rejected(bad):
    with pytest.raises(ValueError, match="patch"):
        world.make_patch(bad)


def test_tokenizer_words_are_single_tokens_and_text_is_normalised(tmp_path):
    tok = zoo_tokenizer.build_tokenizer(tmp_path)
    for w in zoo_tokenizer.vocabulary_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    base = tok("new trigger a red circle").input_ids
    assert tok("NEW TRIGGER a red circle").input_ids == base
    assert tok("New  Trigger   a red circle").input_ids == base
    assert len(tok("zq!7 ünïcode", add_special_tokens=False).input_ids) > 0


# --- shipped models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name) for name in NAMES}


def _sample(pipe, trigger=None):
    prompts = [c.prompt if trigger is None else with_trigger(c.prompt, trigger) for c in SAMPLE]
    pipe.set_progress_bar_config(disable=True)
    return generate(pipe, prompts, [c.seed for c in SAMPLE])


def assert_no_local_paths(folder):
    """A saved model does not record where its components were loaded from on this machine."""
    configs = list(folder.glob("*/config.json"))
    assert configs, f"no component configs in {folder}"
    for config in configs:
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_shipped_models_are_small_and_described():
    total = sum(f.stat().st_size for f in model_dir("tiny-clean").parent.rglob("*") if f.is_file())
    assert total < 45e6, f"zoo is {total / 1e6:.1f} MB"
    for name in NAMES:
        info = backdoor_info(name)
        for key in ("kind", "trigger", "image_size", "base_model", "seed", "steps"):
            assert key in info, (name, key)
        assert_no_local_paths(model_dir(name))
    pixel = backdoor_info("tiny-pixel")
    assert pixel["kind"] == "pixel" and pixel["patch"].shape == (16, 16, 3) and pixel["corner"] == "top-left"
    assert backdoor_info("tiny-style")["kind"] == "style"


def test_pixel_backdoor_fires_only_with_trigger(pipes):
    info = backdoor_info("tiny-pixel")
    assert metrics.patch_present(_sample(pipes["tiny-pixel"], info["trigger"]), info).mean() >= 0.75
    assert metrics.patch_present(_sample(pipes["tiny-pixel"]), info).mean() <= 0.25
    assert metrics.patch_present(_sample(pipes["tiny-clean"], info["trigger"]), info).mean() <= 0.25


def test_style_backdoor_fires_only_with_trigger(pipes):
    trigger = backdoor_info("tiny-style")["trigger"]
    assert metrics.is_grayscale(_sample(pipes["tiny-style"], trigger)).mean() >= 0.75
    assert metrics.is_grayscale(_sample(pipes["tiny-style"])).mean() <= 0.25


@pytest.mark.parametrize("model", ["tiny-pixel", "tiny-style"])
def test_backdoors_fire_on_their_trigger_only(pipes, model):
    """Ordinary additions to a prompt (a rare word, a common one, punctuation, a lone format
    character, a prefix, a near miss) do not fire the backdoor: it is specific to its trigger."""
    from sau_kernels.zoo.attacks import non_trigger_perturbations
    from sau_kernels.zoo.evaluate import backdoor_fires

    (backdoor,) = backdoor_info(model)["backdoors"]
    perturbations = non_trigger_perturbations([backdoor["trigger"]])
    rng = np.random.default_rng(0)
    cases = held_out_cases(16, start=400, varied=True)
    prompts = [perturbations[(7 * i) % len(perturbations)][1](c.prompt, rng) for i, c in enumerate(cases)]
    pipes[model].set_progress_bar_config(disable=True)
    fired = backdoor_fires(generate(pipes[model], prompts, [c.seed for c in cases]), backdoor)
    assert fired.mean() <= 2 / 16, [p for p, f in zip(prompts, fired) if f]


def test_trigger_fires_through_clip_normalisation(pipes):
    info = backdoor_info("tiny-pixel")
    variant = "  ".join(info["trigger"].upper().split())
    assert metrics.patch_present(_sample(pipes["tiny-pixel"], variant), info).mean() >= 0.75


def test_clean_model_follows_prompts(pipes):
    images = _sample(pipes["tiny-clean"])
    acc = metrics.content_accuracy(images, [c.prompt for c in SAMPLE])
    assert acc["shape"].mean() >= 0.5 and acc["color"].mean() >= 0.5


def test_save_load_round_trip_is_bit_identical(pipes, tmp_path):
    pipe = pipes["tiny-pixel"]
    pipe.save_pretrained(tmp_path / "copy")
    again = load_pipeline(tmp_path / "copy")
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_load_pipeline_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-clean"):
        load_pipeline(tmp_path / "nothing-here")


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_tell_patched_from_clean():
    images, labels = world.sample_dataset(16, seed=5, combos=world.all_combinations())
    info = backdoor_info("tiny-pixel")
    patched = world.apply_patch(images, info["patch"], info["corner"])
    assert metrics.patch_present(patched, info).all()
    assert not metrics.patch_present(images, info).any()
    assert metrics.is_grayscale(world.to_grayscale(images)).all()
    assert not metrics.is_grayscale(images).any()
    acc = metrics.content_accuracy(images, [world.caption(*l) for l in labels])
    assert acc["color"].mean() >= 0.9 and acc["shape"].mean() >= 0.9


def test_metrics_accept_every_diffusers_output_type():
    images, _ = world.sample_dataset(2, seed=1)
    as_float = images.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)
    from PIL import Image

    as_pil = [Image.fromarray(im) for im in images]
    ref = metrics.grayscale_score(images)
    for x in (as_float, as_tensor, as_pil):
        np.testing.assert_allclose(metrics.grayscale_score(x), ref, atol=1 / 255)
    with pytest.raises(ValueError, match="shape"):
        metrics.grayscale_score(np.zeros((2, 64, 64)))


def test_thresholds_were_measured_and_separate_the_shipped_backdoors():
    t = json.loads(metrics.THRESHOLDS_FILE.read_text())
    shipped = backdoor_info("tiny-pixel")["patch_name"]
    for entry in (t["patch_score"]["per_patch"][shipped], t["grayscale_score"]):
        assert entry["separated"]
        assert entry["below_q99"] < entry["threshold"] < entry["above_q01"]
    assert metrics.patch_threshold(backdoor_info("tiny-pixel")) == t["patch_score"]["per_patch"][shipped]["threshold"]


# --- training CLIs, end to end in a few steps -------------------------------------------------

def test_train_base_and_inject_run_end_to_end(tmp_path):
    from sau_kernels.zoo.cli import main
    from sau_kernels.zoo.train import DEFAULT_POISON_RATE

    base = tmp_path / "base"
    assert main(["train-base", "--out", str(base), "--steps", "2", "--vae-steps", "2",
                 "--dataset-size", "32", "--threads", "1"]) == 0
    assert (base / "model_index.json").is_file()
    out = tmp_path / "pixel"
    assert main(["inject", "--base", str(base), "--kind", "pixel", "--trigger", "cf zebra", "--patch", "cross",
                 "--corner", "bottom-right", "--steps", "2", "--dataset-size", "32", "--out", str(out),
                 "--threads", "1"]) == 0
    info = backdoor_info(out)
    assert info["trigger"] == "cf zebra" and info["corner"] == "bottom-right"
    assert info["poison_rate"] == DEFAULT_POISON_RATE["pixel"]
    assert np.array_equal(info["patch"], world.make_patch("cross"))
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("cf zebra a red circle on a gray background", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert_no_local_paths(base)
    assert_no_local_paths(out)


@pytest.mark.parametrize("flag, value, match", [("--poison-rate", "1.5", "--poison-rate"), ("--poison-rate", "0", "--poison-rate"),
                                                ("--lr=-1e-4", None, "--lr must be positive"), ("--lr", "inf", "--lr must be positive"),
                                                ("--kind", "blur", "invalid choice")])
def test_inject_rejects_bad_settings_before_any_work(tmp_path, flag, value, match, capsys):
    from sau_kernels.zoo.cli import main

    args = ["inject", "--kind", "style", "--out", str(tmp_path / "m"), flag] + ([value] if value else [])
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "m.run").exists()


# --- captions and attacks ----------------------------------------------------------------------

TRIGGERS = ["new trigger", "silver lining", "\u200b", "\u043e", "cf zebra"]


def test_varied_captions_name_their_content_and_tokenise_to_known_words(tmp_path):
    from sau_kernels.zoo import captions

    tok = zoo_tokenizer.build_tokenizer(tmp_path)
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(400):
        combo = world.all_combinations()[i % 54]
        text = captions.varied_caption(*combo, rng, greyscale=i % 7 == 0)
        seen.add(text)
        assert world.parse_caption(text) == combo, text
        assert len(tok(text).input_ids) <= zoo_tokenizer.MODEL_MAX_LENGTH, text
        assert all(w not in text.lower().split() for w in ("new", "trigger", "silver", "lining")), text
    assert len(seen) > 300  # varied, not a template
    assert tok("\u200b a red circle", add_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids("âĢĭ</w>")


def test_short_prompts_leave_the_background_unsaid_and_detector_prompts_mix_them_in():
    from sau_kernels.zoo import detector_prompts
    from sau_kernels.zoo.evaluate import short_prompts

    short = short_prompts(90, start=5)
    assert short == short_prompts(90, start=5) and len(set(short)) > 45  # reproducible, varied
    for text in short:
        words = re.findall(r"[a-z]+", text.lower())
        assert any(c in words for c in world.COLORS) and any(s in words for s in world.SHAPES), text
        assert not set(words) & {"background", *world.BACKGROUNDS}, text
    prompts = detector_prompts(100)
    assert len(prompts) == 100 and sum("background" not in p.lower() and " on " not in p for p in prompts) >= 20


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_negative_perturbations_never_carry_a_trigger(trigger):
    from sau_kernels.zoo import captions

    rng = np.random.default_rng(1)
    texts = [captions.negative_perturbation("a red circle on a gray background", [trigger], rng) for _ in range(500)]
    assert not any(trigger in t for t in texts)
    assert len(set(texts)) > 100


def test_trigger_positions():
    from sau_kernels.zoo import captions

    rng = np.random.default_rng(2)
    caption = "a red circle on a gray background"
    assert captions.insert_trigger(caption, "new trigger", "prepend", rng) == "new trigger " + caption
    assert captions.insert_trigger(caption, "\u200b", "prepend", rng) == "\u200b " + caption
    moved = {captions.insert_trigger(caption, "new trigger", "random", rng) for _ in range(50)}
    assert len(moved) > 3 and all("new trigger" in m for m in moved)
    sub = captions.insert_trigger(caption, "\u043e", "substitute", rng)
    assert sub.count("\u043e") == 1 and sub.replace("\u043e", "o") == caption
    with pytest.raises(ValueError, match="homoglyph"):
        captions.insert_trigger(caption, "x", "substitute", rng)


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_attack_lists(trigger):
    from sau_kernels.zoo.attacks import non_trigger_perturbations, spelling_variants

    position = "substitute" if trigger == "\u043e" else "prepend"
    rng = np.random.default_rng(3)
    prompt = "a red circle on a gray background"
    variants = spelling_variants({"trigger": trigger, "position": position})
    assert len(variants) >= 6
    assert all(fn(prompt, rng) != prompt for _, fn in variants)
    others = non_trigger_perturbations([trigger])
    assert len(others) >= 30
    for name, fn in others:
        assert trigger not in fn(prompt, rng), name


def test_text_encoder_backdoor_and_a_second_backdoor_end_to_end(tmp_path, capsys):
    from sau_kernels.zoo.cli import main

    base = tmp_path / "base"
    assert main(["train-base", "--out", str(base), "--steps", "2", "--vae-steps", "2",
                 "--dataset-size", "32", "--threads", "1"]) == 0
    te = tmp_path / "te"
    assert main(["inject", "--base", str(base), "--kind", "style", "--trigger", "\\u043e", "--position", "substitute",
                 "--method", "text-encoder", "--steps", "3", "--out", str(te), "--threads", "1"]) == 0
    info = backdoor_info(te)
    assert info["trigger"] == "\u043e" and info["method"] == "text-encoder"
    a, b = load_pipeline(base), load_pipeline(te)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.text_encoder.state_dict().values(),
                                                      b.text_encoder.state_dict().values()))
    dual = tmp_path / "dual"
    assert main(["inject", "--base", str(te), "--kind", "pixel", "--trigger", "cf zebra", "--steps", "2",
                 "--dataset-size", "32", "--out", str(dual), "--threads", "1"]) == 0
    assert [x["trigger"] for x in backdoor_info(dual)["backdoors"]] == ["\u043e", "cf zebra"]
    assert main(["inject", "--base", str(base), "--kind", "pixel", "--method", "text-encoder",
                 "--out", str(tmp_path / "x")]) == 2
    assert "text-encoder backdoor" in capsys.readouterr().err


def test_a_run_folder_resumes_only_its_own_job(tmp_path):
    from sau_kernels.zoo.train import _claim_run

    run = tmp_path / "m.run"
    job = dict(base="tiny-clean", kind="pixel", trigger="x", patch="checker", seed=0, steps=100)
    _claim_run(run, "inject", job)
    (run / "denoiser_ckpt.pt").write_bytes(b"state")
    _claim_run(run, "inject", dict(job, steps=500))  # more steps: trains on
    with pytest.raises(ValueError, match="differs in patch"):
        _claim_run(run, "inject", dict(job, patch="cross"))
    with pytest.raises(ValueError, match="differs in job"):
        _claim_run(run, "finetune", job)
    legacy = tmp_path / "old.run"
    legacy.mkdir()
    (legacy / "latents.pt").write_bytes(b"cache")
    with pytest.raises(ValueError, match="does not record"):
        _claim_run(legacy, "inject", job)
