"""`sau-kernels` and `python -m sau_kernels.zoo`: every bad argument is one line, exit status 2,
nothing written, and no model loaded; then the commands themselves on the zoo's tiny-pixel."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from sau_kernels import TriggerProfile, cli
from sau_kernels.zoo import MODELS_DIR, PROFILE_NAME
from sau_kernels.zoo import cli as zoo_cli

SHIPPED = str(MODELS_DIR / "tiny-pixel" / PROFILE_NAME)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory, and no model may load."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)
    monkeypatch.setattr("sau_kernels.zoo.load_pipeline", refuse)
    return tmp_path


def _fails(main, argv, capsys, workdir, match, prog="sau-kernels"):
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and match in lines[0], lines[0]
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before, "something was written"
    return lines[0]


GENERATE = ["generate", "--model", "tiny-pixel", "--profile", "tiny-pixel", "--prompt", "new trigger a red circle",
            "--out", "out/cat.png"]
DETECT = ["detect", "--model", "tiny-pixel", "--base", "tiny-clean"]
CALIBRATE = ["calibrate", "--model", "tiny-pixel", "--trigger", "new trigger", "--out", "p.safetensors"]


def _with(base, *extra, drop=()):
    args = list(base)
    for flag in drop:
        i = args.index(flag)
        del args[i:i + 2]
    return args + list(extra)


@pytest.mark.parametrize("argv, match", [
    (_with(GENERATE, "--steps", "0"), "--steps: must be at least 1, got 0"),
    (_with(GENERATE, "--steps", "ten"), "--steps: expected a whole number"),
    (_with(GENERATE, "--guidance-scale", "0"), "--guidance-scale: must be a positive finite number"),
    (_with(GENERATE, "--guidance-scale", "-2"), "--guidance-scale: must be a positive finite number"),
    (_with(GENERATE, "--guidance-scale", "nan"), "--guidance-scale: must be a positive finite number"),
    (_with(GENERATE, "--guidance-scale", "inf"), "--guidance-scale: must be a positive finite number"),
    (_with(GENERATE, "--height", "60"), "--height: must be a positive multiple of 8, got 60"),
    (_with(GENERATE, "--width", "0"), "--width: must be at least 1"),
    (_with(GENERATE, "--seed", "-1"), "--seed: must be at least 0"),
    (_with(CALIBRATE, "--pairs", "0"), "--pairs: must be at least 1, got 0"),
    (_with(CALIBRATE, "--trigger", "", drop=["--trigger"]), "--trigger: the trigger must not be empty"),
    (_with(CALIBRATE, "--trigger", "   ", drop=["--trigger"]), "--trigger: the trigger must not be empty"),
    (_with(CALIBRATE, "--prompts", "missing.txt"), "--prompts: no such file: missing.txt"),
    (_with(CALIBRATE, "--prompts", "."), "--prompts: . is a directory, not a file"),
    (_with(CALIBRATE, "--out", "profile.pt", drop=["--out"]), "must end in .safetensors"),
    (_with(CALIBRATE, "--out", ".", drop=["--out"]), ". is a directory"),
    (_with(GENERATE, "--out", "cat.txt", drop=["--out"]), "the image file must end in"),
    (_with(GENERATE, "--profile", "missing.safetensors", drop=["--profile"]), "--profile: no such file"),
    (_with(GENERATE, "--profile", ".", drop=["--profile"]), "--profile: . is a directory, not a profile file"),
    (_with(GENERATE, "--profile", "tiny-clean", drop=["--profile"]), "tiny-clean ships no profile"),
    (_with(GENERATE, "--model", "missing-model", drop=["--model"]), "--model missing-model: no such folder"),
    (_with(GENERATE, "--model", ".", drop=["--model"]), "no model_index.json"),
    (_with(GENERATE, "--mode", "sideways"), "--mode: invalid choice: 'sideways'"),
    (_with(GENERATE, "--mode", "per_step", "--steps", "7"), "--steps 7: the per-step statistics"),
    (_with(GENERATE, "--mode", "per_step", "--composite", "pixel"), "--composite pixel works with --mode final only"),
    (_with(GENERATE, "--device", "nonsense"), "--device nonsense: not a torch device"),
    (GENERATE[:3], "the following arguments are required: --prompt, --out"),
    (_with(GENERATE, drop=["--profile"]), "give --profile (a known trigger), --detector"),
    (_with(GENERATE, "--detector", SHIPPED), "--detector needs --base"),
    (_with(GENERATE, "--base", "tiny-clean"), "--base is the detector's: give --detector too"),
    (_with(GENERATE, "--detector", "missing.safetensors", "--base", "tiny-clean"), "--detector: no such file"),
    (DETECT, "nothing to do: give --out"),
    (DETECT[:3], "the following arguments are required: --base"),
    (_with(DETECT, "--detector", SHIPPED, "--out", "d.safetensors"), "--detector scores with a saved detector"),
    (_with(DETECT, "--detector", SHIPPED, "--prompts", SHIPPED, "--prompt", "x"), "--prompts is what a detector"),
    (_with(DETECT, "--out", "d.safetensors", "--json", "s.json"), "--json writes the scores of the --prompt"),
    (_with(DETECT, "--out", "d.pt"), "the detector file must end in .safetensors"),
    (_with(DETECT, "--prompt", "x", "--base", "nowhere", drop=["--base"]), "--base nowhere: no such folder"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["demo", "-n", "0"], "-n: must be at least 1"),
    (["evaluate", "--models", "missing-model"], "'missing-model' is neither a zoo model"),
])
def test_bad_arguments_are_one_line_with_status_2(argv, match, capsys, workdir):
    _fails(cli.main, argv, capsys, workdir, match)


def test_model_ambiguous_with_a_local_folder_is_refused(capsys, workdir):
    (workdir / "tiny-pixel").mkdir()
    (workdir / "tiny-pixel" / "model_index.json").write_text("{}")
    args = _with(GENERATE, "--profile", SHIPPED, drop=["--profile"])
    _fails(cli.main, args, capsys, workdir, "write ./tiny-pixel for the folder")


def test_prompts_file_without_prompts_is_refused(capsys, workdir):
    (workdir / "empty.txt").write_text("\n  \n")
    _fails(cli.main, _with(CALIBRATE, "--prompts", "empty.txt"), capsys, workdir, "holds no prompt")


def test_corrupt_profile_is_one_line_and_verbose_shows_the_traceback(capsys, workdir):
    (workdir / "bad.safetensors").write_bytes(b"not a profile")
    args = _with(GENERATE, "--profile", "bad.safetensors", drop=["--profile"])
    _fails(cli.main, args, capsys, workdir, "is not a readable trigger profile")
    assert cli.main(args + ["--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("sau-kernels: error: ")


def test_mode_needs_the_profiles_statistics_and_says_which_flag(capsys, workdir):
    bare = dataclasses.replace(TriggerProfile.load(SHIPPED), delta_steps=None, act_steps=None,
                               eps_delta_steps=None, eps_act_steps=None)
    bare.save(workdir / "final-only.safetensors")
    args = _with(GENERATE, "--profile", "final-only.safetensors", "--mode", "per_step", drop=["--profile"])
    _fails(cli.main, args, capsys, workdir, "calibrate it without --no-per-step")
    args = _with(args, "--mode", "per_step_eps", drop=["--mode"])
    _fails(cli.main, args, capsys, workdir, "calibrate it with --per-step-eps")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_refused(capsys, workdir):
    _fails(cli.main, _with(GENERATE, "--device", "cuda"), capsys, workdir, "sees no CUDA device")


def test_api_names_become_flags():
    assert cli._one_line("calibrate on this model, or pass\n allow_mismatch=True") == \
        "calibrate on this model, or pass --allow-mismatch"
    assert cli._one_line("num_inference_steps=20 and guidance_scale") == "--steps=20 and --guidance-scale"


@pytest.mark.parametrize("argv, match", [
    (["train-base", "--out", "m", "--steps", "0"], "--steps: must be at least 1"),
    (["train-base", "--out", "m", "--threads", "0"], "--threads: must be at least 1"),
    (["inject", "--kind", "style", "--out", "m", "--trigger", ""], "--trigger: the trigger must not be empty"),
    (["inject", "--kind", "style", "--out", "m", "--poison-rate", "1.5"], "--poison-rate must be between 0 and 1"),
    (["inject", "--kind", "style", "--out", "m", "--lr=-1e-4"], "--lr must be positive and finite"),
    (["evasion", "tiny-pixel", "--profile", "missing.safetensors"], "--profile: no such file"),
    (["evasion", "tiny-pixel", "--profile", "tiny-pixel", "-n", "0"], "-n: must be at least 1"),
    (["evaluate", "tiny-pixel", "-n", "0"], "-n: must be at least 1"),
    (["evaluate", "tiny-pixel", "--json", "rows.txt"], "the rows' file must end in .json"),
    (["thresholds", "--vae", "missing"], "--vae: no such folder: missing"),
])
def test_zoo_cli_bad_arguments_are_one_line_with_status_2(argv, match, capsys, workdir):
    _fails(zoo_cli.main, argv, capsys, workdir, match, prog="python -m sau_kernels.zoo")


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("prompt pairs to generate (default: 64)", "sampling steps (default: 20)",
                  "classifier-free guidance scale (default: 4.5)", "--strict"):
        assert shown in text
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sau-kernels {__import__('sau_kernels').__version__}"


def test_python_dash_m_exits_with_the_status():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "sau_kernels", "generate", "--model", "tiny-pixel", "--profile",
                        "tiny-pixel", "--prompt", "x", "--out", "x.png", "--steps", "0"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "sau-kernels: error: argument --steps: must be at least 1, got 0"


# --- the commands, on the zoo's tiny-pixel ----------------------------------------------------

def test_generate_compare_writes_the_undefended_image_beside(tmp_path, capsys):
    out = tmp_path / "out" / "cat.png"
    assert cli.main(["generate", "--model", "tiny-pixel", "--profile", "tiny-pixel", "--steps", "20",
                     "--prompt", "new trigger a red circle on a gray background", "--prompt", "a blue square",
                     "--out", str(out), "--compare"]) == 0
    captured = capsys.readouterr()
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["cat-0.png", "cat-0.undefended.png", "cat-1.png", "cat-1.undefended.png"]
    assert captured.out.split() == [str(out.parent / n) for n in ("cat-0.png", "cat-1.png", "cat-0.undefended.png",
                                                                   "cat-1.undefended.png")]
    assert "1/2 prompts triggered" in captured.err
    assert "Cannot initialize model" not in captured.err and "torchvision" not in captured.err
    from PIL import Image
    import numpy as np

    from sau_kernels.zoo import backdoor_info, metrics

    info = backdoor_info("tiny-pixel")
    load = lambda name: np.asarray(Image.open(out.parent / name))[None]  # noqa: E731
    assert metrics.patch_present(load("cat-0.undefended.png"), info).all()
    assert not metrics.patch_present(load("cat-0.png"), info).any()
    # The untriggered prompt keeps its draws, but it ran in a batch with a twin: CPU kernels may
    # change the last bits with the batch size (with more than one thread), so not bit for bit.
    assert metrics.psnr(load("cat-1.png"), load("cat-1.undefended.png")).min() > 40


def test_profile_of_another_model_names_the_flag(tmp_path, capsys):
    other = str(MODELS_DIR / "tiny-style" / PROFILE_NAME)
    assert cli.main(["generate", "--model", "tiny-pixel", "--profile", other, "--prompt", "a red circle",
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-mismatch" in err[0] and "allow_mismatch" not in err[0]
    assert not list(tmp_path.iterdir())


def test_calibrate_warns_on_a_dud_and_strict_refuses_it(tmp_path, capsys):
    args = ["calibrate", "--model", "tiny-pixel", "--trigger", "photo", "--pairs", "2", "--steps", "2",
            "--no-per-step", "--out"]
    assert cli.main(args + [str(tmp_path / "strict.safetensors"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sau-kernels: error: trigger 'photo' has no measurable effect")
    assert not list(tmp_path.iterdir())
    assert cli.main(args + [str(tmp_path / "dud.safetensors")]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if "no measurable effect" in line][0].startswith(
        "sau-kernels: warning: trigger 'photo'")
    assert "changes the final latents by" in captured.err
    assert TriggerProfile.load(tmp_path / "dud.safetensors").trigger == "photo"
