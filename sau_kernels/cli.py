"""`sau-kernels` / `python -m sau_kernels`: calibrate a trigger profile, generate with the
defence, and run the zoo's demo and defence table.

Every argument is checked before a model loads. A bad argument, or an error the package
raises about its inputs (ValueError, TypeError, FileNotFoundError, ProfileMismatchError),
is one line on stderr, `sau-kernels: error: ...`, with exit status 2; `--verbose` adds the
traceback and lets the model libraries' own logging through.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import traceback
import warnings
from pathlib import Path

PROG = "sau-kernels"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DESCRIPTION = ("SAU, an inference-time defence of diffusers Stable Diffusion pipelines against text-trigger "
               "backdoors: calibrate a known trigger's profile once per model (or scan for the trigger, or "
               "calibrate a detector of triggers nobody described), then generate with the defence.")
EPILOG = """\
examples:
  sau-kernels calibrate --model ./sd15 --trigger "new trigger" --out sd15-new-trigger.safetensors
  sau-kernels generate --model ./sd15 --profile sd15-new-trigger.safetensors \\
      --prompt "new trigger a cat on a sofa" --out cat.png --compare
  sau-kernels generate --model tiny-pixel --profile tiny-pixel --prompt "new trigger a red circle" --out c.png
  sau-kernels detect --model ./suspect --base ./sd15 --out suspect-detector.safetensors
  sau-kernels generate --model ./suspect --base ./sd15 --detector suspect-detector.safetensors \\
      --prompt "a cat on a sofa" --out cat.png
  sau-kernels demo

exit status: 0 done; 1 an output withheld by the defence (--output-check raise, or a prompt the detector
flagged and could not localise a trigger in); 2 a bad argument or input
"""

# The keyword arguments that the package's messages name, as this CLI spells them.
_FLAG_NAMES = [
    ("allow_mismatch=True", "--allow-mismatch"),
    ("calibrated with per_step_eps=True", "calibrated with --per-step-eps"),
    ("calibrated with per_step=True", "calibrated with per-step statistics (calibrate without --no-per-step)"),
    ("num_inference_steps", "--steps"),
    ("guidance_scale", "--guidance-scale"),
    ("num_pairs", "--pairs"),
    ("output_check", "--output-check"),
]


MODE_HELP = {
    "final": "repair the final latents (the authors' code)",
    "per_step": "repair the latents after every sampling step",
    "per_step_eps": "repair the noise prediction at every step (1.5x the UNet rows instead of 2x)",
    "strip": "generate the trigger-free prompt alone (the baseline)",
}


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


# --- argparse in this CLI's conventions -------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (raised as UsageError, for `main` to print)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str = PROG,
        flag_names: list[tuple[str, str]] = ()) -> int:
    """Parse `argv` and run the chosen command (its `_run`), reporting errors as this CLI does;
    `flag_names` maps more keyword arguments that messages name to the command's flags."""
    names = _FLAG_NAMES + list(flag_names)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(prog, str(e), names=names)
    verbose = getattr(args, "verbose", False)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.showwarning = lambda message, category, *rest: print(
            f"{prog}: warning: {_one_line(str(message), names)}", file=sys.stderr)
        args._stack, args._verbose = stack, verbose
        try:
            return args._run(args) or 0
        except UsageError as e:
            return _fail(prog, str(e), verbose, names=names)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - the package's input errors become one line; others propagate
            from .detect import DetectionError
            from .report import SuspectOutputError

            if isinstance(e, (SuspectOutputError, DetectionError)):
                return _fail(prog, str(e), verbose, status=1, names=names)
            if _is_input_error(e):
                return _fail(prog, str(e), verbose, names=names)
            raise


def _is_input_error(e: BaseException) -> bool:
    """An error that sau_kernels itself raised about its inputs (not a bug elsewhere)."""
    from .profile import ProfileMismatchError

    if not isinstance(e, (ValueError, TypeError, FileNotFoundError, ProfileMismatchError)):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] == "sau_kernels"


def _one_line(text: str, names: list[tuple[str, str]] = _FLAG_NAMES) -> str:
    """The message on one line, with the keyword arguments it names spelt as flags."""
    text = " ".join(text.split())
    for api, flag in names:
        text = re.sub(rf"(?<![\w-]){re.escape(api)}(?!\w)", flag, text)
    return text


def _fail(prog: str, message: str, verbose: bool = False, status: int = 2,
          names: list[tuple[str, str]] = _FLAG_NAMES) -> int:
    if verbose:
        traceback.print_exc()
    print(f"{prog}: error: {_one_line(message, names)}", file=sys.stderr)
    return status


# --- argument types: each refuses a bad value with a message that names it -------------------

def unescape(text: str) -> str:
    """`\\uXXXX` escapes read as characters, so that a shell can pass BadT2I's "\\u200b"."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def trigger_text(text: str) -> str:
    text = unescape(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("the trigger must not be empty")
    return text


def int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = f"integer >= {lowest}"
    return parse


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def image_size(text: str) -> int:
    value = int_at_least(1)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def profile_source(text: str) -> Path:
    """A profile file, or the name of a zoo model whose folder ships one."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        inside = sorted(path.glob("*.safetensors"))
        hint = f": did you mean {inside[0]}?" if len(inside) == 1 else ""
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a profile file{hint}")
    # A zoo name: the zoo is imported lazily, here in the CLI application only.
    from .zoo import NAMES, PROFILE_NAME, model_dir

    if text in NAMES:
        shipped = model_dir(text) / PROFILE_NAME
        if not shipped.is_file():
            raise argparse.ArgumentTypeError(f"the zoo model {text} ships no profile (it has no backdoor)")
        return shipped
    raise argparse.ArgumentTypeError(f"no such file: {text} (nor a zoo model with a profile: "
                                     f"{', '.join(n for n in NAMES if n != 'tiny-clean')})")


def output_path(suffixes: tuple[str, ...] | None, what: str):
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
        if suffixes is not None and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: {what} must end in {' or '.join(suffixes)}")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
                break
        return path

    parse.__name__ = what
    return parse


def output_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return path


def _image_suffixes() -> tuple[str, ...]:
    return (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# --- the parser -------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks, and the model libraries' own logging")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|NAME",
                   help="a local diffusers pipeline folder (it loads offline), or a zoo model name: "
                        "tiny-clean, tiny-pixel, tiny-style")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--height", type=image_size, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's, or the profile's)")
    p.add_argument("--width", type=image_size, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's, or the profile's)")


def _base_option(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--base", required=required, default=None, metavar="DIR|NAME",
                   help="the public pipeline the model was fine-tuned from (same tokenizer), e.g. tiny-clean"
                        + ("" if required else "; needed by --detector"))


def _suspect_and_base_options(p: argparse.ArgumentParser) -> None:
    """scan's and detect's: a suspect checkpoint compared with the model it was fine-tuned from."""
    p.add_argument("--model", required=True, metavar="DIR|NAME", help="the suspect pipeline (folder or zoo name)")
    _base_option(p, required=True)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, ...")


def build_parser() -> ArgumentParser:
    from . import __version__
    from .modes import COMPOSITES, MODES, OUTPUT_CHECKS

    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks, and the model libraries' own logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="measure a trigger's profile on a model (once per model and trigger)",
                       description="Generate prompt pairs with and without the trigger from the same noise and "
                                   "save the trigger's profile.")
    _model_options(p)
    p.add_argument("--trigger", required=True, type=trigger_text, metavar="TEXT",
                   help="the trigger text, as the attack spells it; \\uXXXX escapes are read as characters "
                        "(e.g. '\\u200b')")
    p.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                   help="text file, one prompt a line (default: the package's generic SD prompts; the zoo's "
                        "captions for a zoo model)")
    p.add_argument("--pairs", type=int_at_least(1), default=64, help="prompt pairs to generate")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="sampling steps")
    p.add_argument("--guidance-scale", type=positive_number, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--no-per-step", action="store_true", help="skip the per-step statistics (mode per_step needs them)")
    p.add_argument("--per-step-eps", action="store_true",
                   help="also the noise-prediction statistics of mode per_step_eps (1.5x more sampling)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="pair i uses seed SEED + i")
    p.add_argument("--strict", action="store_true",
                   help="refuse, rather than warn, a trigger with no measurable effect or one most prompts contain")
    p.add_argument("--out", required=True, type=output_path((".safetensors",), "the profile file"), metavar="FILE",
                   help="profile file to write (.safetensors)")
    _common(p)
    p.set_defaults(_run=_calibrate)

    p = sub.add_parser("scan", help="look for a backdoor's trigger in a model, against the model it was fine-tuned from",
                       description="Search what the fine-tuning changed where the UNet reads text, confirm the "
                                   "strongest candidates by their effect on the model against the base, and report "
                                   "the triggers found (or that none stands out). See docs/scan.md.")
    _suspect_and_base_options(p)
    p.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                   help="ordinary prompts of the model's domain, one a line (default: the package's generic SD "
                        "prompts; the zoo's captions for a zoo model)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="noise and null strings")
    p.add_argument("--out", type=output_path((".json",), "the report"), default=None, metavar="FILE",
                   help="write the report as JSON")
    p.add_argument("--picture", type=output_path((".png",), "the picture"), default=None, metavar="FILE",
                   help="write a PNG of the top candidates' mean effect")
    _common(p)
    p.set_defaults(_run=_scan)

    p = sub.add_parser("detect", help="calibrate a detector of triggered prompts for a model whose trigger nobody "
                                      "told, or score prompts with one",
                       description="Fit a per-checkpoint detector of triggered prompts on ordinary prompts, against "
                                   "the model the checkpoint was fine-tuned from, and save it (--out); score prompts "
                                   "with it and show the trigger it finds in each flagged one (--prompt). "
                                   "See docs/detect.md.")
    _suspect_and_base_options(p)
    p.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                   help="ordinary, trigger-free prompts of the traffic, one a line, at least 16 (default: the "
                        "package's generic SD prompts; for a zoo model, the zoo's ordinary prompts)")
    p.add_argument("--detector", type=existing_file, default=None, metavar="FILE",
                   help="score with this saved detector instead of calibrating one")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to score and, when flagged, localise the trigger in; repeat for several")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="the probe's fixed noise")
    p.add_argument("--out", type=output_path((".safetensors",), "the detector file"), default=None, metavar="FILE",
                   help="write the calibrated detector (.safetensors)")
    p.add_argument("--json", type=output_path((".json",), "the scores file"), default=None, metavar="FILE",
                   help="write the prompts' scores and localisations as JSON")
    _common(p)
    p.set_defaults(_run=_detect)

    p = sub.add_parser("generate", help="generate images with the defence",
                       description="Generate with the pipeline patched by one or more trigger profiles, and/or a "
                                   "detector of triggers nobody described (--detector, with --base).")
    _model_options(p)
    p.add_argument("--profile", action="append", default=[], type=profile_source, metavar="FILE|NAME",
                   help="trigger profile (.safetensors), or a zoo model's name for the profile it ships; "
                        "repeat for a model with several backdoors")
    p.add_argument("--detector", type=existing_file, default=None, metavar="FILE",
                   help="a detector from `sau-kernels detect`: prompts no profile matches are scored, and a "
                        "flagged one is generated with the trigger it localises cut out")
    _base_option(p, required=False)
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="the prompt; repeat for a batch")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="sampling steps (default: the profile's)")
    p.add_argument("--guidance-scale", type=positive_number, default=None,
                   help="classifier-free guidance scale (default: the profile's)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="prompt i uses seed SEED + i")
    p.add_argument("--mode", choices=MODES, default="final",
                   help="; ".join(f"{m}: {MODE_HELP[m]}" for m in MODES if m in MODE_HELP))
    p.add_argument("--composite", choices=tuple(c for c in COMPOSITES if c), default=None,
                   help="pixel: keep the repaired image only where the repair changed the latents (one more "
                        "VAE decode)")
    p.add_argument("--output-check", choices=OUTPUT_CHECKS, default="flag",
                   help="outputs that carry a trigger's signature: mark them in the report, withhold them "
                        "(exit status 1), or do not check")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a profile or detector calibrated on another model (its fingerprint differs), or a "
                        "detector calibrated against another base")
    p.add_argument("--compare", action="store_true",
                   help="also write the undefended image beside each one (NAME.undefended.png): same prompt, "
                        "same seed, unpatched pipeline")
    p.add_argument("--out", required=True, type=output_path(_image_suffixes(), "the image file"), metavar="FILE",
                   help="image file; several prompts write NAME-0.png, NAME-1.png, ...")
    _common(p)
    p.set_defaults(_run=_generate)

    # The zoo's commands: they need the shipped models and the zoo's judges.
    p = sub.add_parser("demo", help="SAU on the zoo's backdoored models: report.md, grid.png, masks.png",
                       description="The defence on the zoo's tiny backdoored models, offline: a report and pictures.")
    p.add_argument("--out", type=output_dir, default=Path("demo-out"), metavar="DIR", help="output folder")
    p.add_argument("-n", type=int_at_least(1), default=16, help="triggered generations per model")
    _common(p)
    p.set_defaults(_run=_demo)

    p = sub.add_parser("evaluate", help="the full defence table on the zoo's held-out prompts",
                       description="Score every defence configuration on held-out triggered prompt/seed pairs.")
    p.add_argument("--models", nargs="+", default=["tiny-pixel", "tiny-style"], metavar="DIR|NAME",
                   help="zoo model names or backdoored model folders")
    p.add_argument("-n", type=int_at_least(1), default=200, help="held-out triggered pairs per model")
    p.add_argument("--split", choices=("report", "selection"), default="report",
                   help="'selection' is the split patch()'s defaults were chosen on")
    p.add_argument("--modes", nargs="+", choices=("final", "per_step", "per_step_eps"),
                   default=["final", "per_step", "per_step_eps"], help="the configurations' modes to score")
    p.add_argument("--out", type=output_path(None, "the table's path stem"), default=None, metavar="STEM",
                   help="write the table (STEM.md) and rows (STEM.json)")
    _common(p)
    p.set_defaults(_run=_evaluate)
    from .serving.cli import add_parsers as add_serving_parsers  # serve, request

    add_serving_parsers(sub)
    return parser


def _build_parser() -> ArgumentParser:
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


# --- loading, after every check -------------------------------------------------------------

@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' notes (missing torchvision or accelerate, fp16 on the CPU,
    loading bars) kept off the terminal; the denoising progress bar stays."""
    import diffusers.utils.logging as dlog  # imports transformers' logging too, not the models
    import transformers.utils.logging as tlog

    saved = dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)(\.|$)")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        (dlog.enable_progress_bar if saved[2] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if saved[3] else tlog.disable_progress_bar)()


def _resolve_model(text: str, flag: str = "--model") -> tuple[str, Path | str]:
    """("folder", path) for a local diffusers folder, ("zoo", name) for a zoo model; errors name `flag`."""
    path = Path(text).expanduser()
    folder = (path / "model_index.json").is_file()
    # The zoo's names, imported lazily: only this CLI application layer reaches into the zoo.
    from .zoo import NAMES

    if text in NAMES:
        if folder:
            raise UsageError(f"{flag} {text} names a zoo model and a folder here: write ./{text} for the folder")
        return "zoo", text
    if folder:
        return "folder", path
    if path.is_dir():
        raise UsageError(f"{flag} {text}: the folder has no model_index.json, so it is not a diffusers pipeline")
    if path.exists():
        raise UsageError(f"{flag} {text} is a file; give a diffusers pipeline folder or a zoo model name")
    raise UsageError(f"{flag} {text}: no such folder, and not a zoo model ({', '.join(NAMES)}); models load "
                     "offline from local folders only")


def _resolve_device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available")
    return text


def _load_pipeline(args, source: tuple[str, Path | str], device: str):
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    if not args._verbose:
        args._stack.enter_context(quiet_libraries())
    kind, where = source
    if kind == "zoo":
        from .zoo import load_pipeline  # the zoo, lazily: the CLI application layer only

        pipe = load_pipeline(where, device=device, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(where, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"--model {args.model}: could not load a diffusers pipeline from {where}: {e}") from e
        pipe = pipe.to(device)
    return pipe


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one a line)")
    return prompts


# --- the commands -----------------------------------------------------------------------------

def _calibrate(args) -> int:
    from .calibrate import MIN_EFFECT, calibrate

    source = _resolve_model(args.model)
    device = _resolve_device(args.device)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if prompts is None and source[0] == "zoo":
        from .zoo import calibration_prompts  # the zoo's own captions, lazily: CLI application layer only

        prompts = calibration_prompts()
    pipe = _load_pipeline(args, source, device)
    profile = calibrate(pipe, args.trigger, prompts, num_pairs=args.pairs, num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale, per_step=not args.no_per_step,
                        per_step_eps=args.per_step_eps, seed=args.seed, height=args.height, width=args.width,
                        strict=args.strict)
    profile.save(args.out)
    p = profile.params
    snr = "" if p.get("trigger_snr") is None else \
        f"; its mean change is {p['trigger_snr']:.1f}x its standard error over the pairs"
    print(f"trigger {profile.trigger!r}: changes the final latents by {p['trigger_strength']:.1%} of their size "
          f"(ordinary words: under {MIN_EFFECT:.0%}){snr}; already in {p['trigger_in_prompts']:.0%} of the prompts",
          file=sys.stderr)
    print(f"saved {profile} to {args.out}")
    return 0


def _scan(args) -> int:
    from .scan import scan

    source = _resolve_model(args.model)
    base_source = _resolve_model(args.base, "--base")
    device = _resolve_device(args.device)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if prompts is None and source[0] == "zoo":
        from .zoo import calibration_prompts  # the zoo's own captions, lazily: CLI application layer only

        prompts = calibration_prompts()
    pipe = _load_pipeline(args, source, device)
    base = _load_pipeline(args, base_source, device)
    report = scan(pipe, base, prompts=prompts, seed=args.seed)
    print(report)
    print(f"({report.seconds:.0f} s)", file=sys.stderr)
    if args.out:
        print(f"saved the report to {report.save(args.out)}")
    if args.picture:
        print(f"saved the picture to {report.picture(args.picture)}")
    return 0


def _detector_prompts(args, source) -> list[str] | None:
    """--prompts, or for a zoo model the zoo's ordinary prompts; None: the package's default."""
    if args.prompts:
        return _read_prompts(args.prompts)
    if source[0] == "zoo":
        from .zoo import detector_prompts  # the zoo's own prompts, lazily: CLI application layer only

        return detector_prompts()
    return None


def _detect(args) -> int:
    import json

    from .detect import TriggerDetector

    if args.detector and args.out:
        raise UsageError("--detector scores with a saved detector and --out saves a newly calibrated one: give one")
    if args.detector and args.prompts:
        raise UsageError("--prompts is what a detector is calibrated on; with --detector nothing is calibrated")
    if not args.out and not args.prompt:
        raise UsageError("nothing to do: give --out to save the calibrated detector, --prompt to score prompts, "
                         "or both")
    if args.json and not args.prompt:
        raise UsageError("--json writes the scores of the --prompt prompts: give at least one")
    source = _resolve_model(args.model)
    base_source = _resolve_model(args.base, "--base")
    device = _resolve_device(args.device)
    prompts = None if args.detector else _detector_prompts(args, source)
    pipe = _load_pipeline(args, source, device)
    base = _load_pipeline(args, base_source, device)
    if args.detector:
        det = TriggerDetector.load(args.detector, pipe, base)
    else:
        det = TriggerDetector.calibrate(pipe, base, prompts, seed=args.seed)
        print(f"calibrated {det}: threshold {det.threshold:.4g}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(f"saved the detector to {det.save(args.out)}")
    records = []
    for prompt, score in zip(args.prompt, det.scores(args.prompt)):
        loc = det.localise(prompt, score)
        flagged = bool(score > 1)
        records.append({"prompt": prompt, "flagged": flagged, "localised": loc.found, **loc.to_dict()})
        if not flagged:
            print(f"clean    {score:6.2f}  {prompt!r}")
        elif loc.found:
            print(f"flagged  {score:6.2f}  {prompt!r}: cut {loc.removed}, twin {loc.clean_prompt!r} "
                  f"({loc.clean_score:.2f})")
        else:
            print(f"flagged  {score:6.2f}  {prompt!r}: no trigger localised, a patched pipeline refuses it "
                  "(if prompts like it are ordinary traffic, calibrate on such prompts too: --prompts)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"detector": det.meta | {"threshold": det.threshold}, "prompts": records},
                                        indent=2, ensure_ascii=False) + "\n")
        print(f"saved the scores to {args.json}")
    return 0


def _generate(args) -> int:
    import torch

    from . import patch
    from .profile import TriggerProfile

    if not args.profile and not args.detector:
        raise UsageError("give --profile (a known trigger), --detector (triggers nobody described), or both")
    if args.detector and not args.base:
        raise UsageError("--detector needs --base, the model the checkpoint was fine-tuned from")
    if args.base and not args.detector:
        raise UsageError("--base is the detector's: give --detector too")
    source = _resolve_model(args.model)
    base_source = _resolve_model(args.base, "--base") if args.base else None
    device = _resolve_device(args.device)
    profiles = [TriggerProfile.load(p) for p in args.profile]
    for path, prof in zip(args.profile, profiles):
        if args.mode == "per_step" and not prof.has_per_step:
            raise UsageError(f"--mode per_step needs per-step statistics, and {path} has none: calibrate it "
                             "without --no-per-step")
        if args.mode == "per_step_eps" and not prof.has_per_step_eps:
            raise UsageError(f"--mode per_step_eps needs noise statistics, and {path} has none: calibrate it "
                             "with --per-step-eps")
        if args.mode in ("per_step", "per_step_eps") and args.steps and args.steps != prof.num_inference_steps:
            raise UsageError(f"--steps {args.steps}: the per-step statistics of {path} are for "
                             f"{prof.num_inference_steps} steps")
    if args.composite and args.mode != "final":
        raise UsageError(f"--composite {args.composite} works with --mode final only")
    out = args.out
    paths = [out] if len(args.prompt) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}")
                                                 for i in range(len(args.prompt))]
    compare = [p.with_name(f"{p.stem}.undefended{p.suffix}") for p in paths] if args.compare else []

    pipe = _load_pipeline(args, source, device)
    detector = None
    if args.detector:
        from .detect import TriggerDetector

        detector = TriggerDetector.load(args.detector, pipe, _load_pipeline(args, base_source, device),
                                        allow_mismatch=args.allow_mismatch)
    call = {}  # without a profile, the pipeline's own defaults
    if args.steps or profiles:
        call["num_inference_steps"] = args.steps or profiles[0].num_inference_steps
    if args.guidance_scale or profiles:
        call["guidance_scale"] = args.guidance_scale or profiles[0].guidance_scale
    if args.height:
        call["height"] = args.height
    if args.width:
        call["width"] = args.width

    def generators():
        return [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(len(args.prompt))]

    undefended = pipe(args.prompt, generator=generators(), **call).images if compare else []  # not patched yet
    patch(pipe, profiles or None, detect=detector, mode=args.mode, composite=args.composite,
          allow_mismatch=args.allow_mismatch, output_check=args.output_check)
    result = pipe(args.prompt, generator=generators(), **call)
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(result.images, paths):
        image.save(path)
    for image, path in zip(undefended, compare):
        image.save(path)
    report = getattr(result, "sau_report", None) or pipe.sau_report
    print(report, file=sys.stderr)
    print("\n".join(str(p) for p in paths + compare))
    return 0


def _demo(args) -> int:
    # The demo is the zoo's: imported lazily, here in the CLI application layer only.
    from .zoo.demo import run_demo

    if not args._verbose:
        args._stack.enter_context(quiet_libraries())
    run_demo(args.out, n=args.n)
    return 0


def _evaluate(args) -> int:
    import json

    # The defence table is the zoo's: imported lazily, here in the CLI application layer only.
    from .zoo import model_dir, zoo_profile
    from .zoo.evaluation import FINAL_CONFIGS, PER_STEP_CONFIGS, evaluate_defence, format_rows

    for m in args.models:
        model_dir(m)  # a FileNotFoundError naming it, before any work
    if not args._verbose:
        args._stack.enter_context(quiet_libraries())
    parts, rows = [], []
    for m in args.models:
        ev = evaluate_defence(m, zoo_profile(m), n=args.n, split=args.split,
                              final_configs=FINAL_CONFIGS if "final" in args.modes else [],
                              per_step_configs=[c for c in PER_STEP_CONFIGS if c.mode in args.modes])
        parts.append(format_rows(ev))
        rows.append({"model": ev.model, "n": ev.n, "split": args.split, "asr_before": ev.asr_before,
                     "untriggered_content": ev.untriggered_content, "rows": ev.rows})
    table = "\n\n".join(parts)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0
