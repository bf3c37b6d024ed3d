"""A zoo of tiny, really trained backdoored Stable Diffusion pipelines.

`tiny-clean` is trained from scratch on a synthetic world of coloured shapes;
`tiny-pixel` and `tiny-style` are backdoors planted into it by fine-tuning, as BadT2I
does. Each is a diffusers `StableDiffusionPipeline` folder shipped with the package, with
its calibrated trigger profile (`sau_profile.safetensors`) beside it.

The library (`sau_kernels` outside this subpackage) never imports the zoo: the zoo is a
user of the library, with its own judges (`metrics`), defence table (`evaluation`) and
demo (`demo`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).parent / "models"
NAMES = ("tiny-clean", "tiny-pixel", "tiny-style")
PROFILE_NAME = "sau_profile.safetensors"  # a backdoored model's calibrated profile, in its folder

__all__ = ["DETECTOR_PROMPTS_START", "MODELS_DIR", "NAMES", "PROFILE_NAME", "backdoor_info",
           "calibration_prompts", "detector_prompts", "load_pipeline", "model_dir", "zoo_profile"]


def model_dir(name_or_dir: str | Path) -> Path:
    """The folder of a shipped model by name, or a model folder given as a path."""
    if str(name_or_dir) in NAMES:
        if (Path(name_or_dir) / "model_index.json").is_file():
            raise ValueError(f"{str(name_or_dir)!r} names a shipped zoo model and a folder here: write "
                             f"./{name_or_dir} for the folder, or run from another directory for the shipped model")
        path = MODELS_DIR / str(name_or_dir)
    else:
        path = Path(name_or_dir)
    if not (path / "model_index.json").is_file():
        known = ", ".join(NAMES)
        raise FileNotFoundError(f"{str(name_or_dir)!r} is neither a zoo model ({known}) nor a diffusers pipeline folder")
    return path


def load_pipeline(name_or_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a zoo model (or any local diffusers SD folder) offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir(name_or_dir), dtype=dtype, local_files_only=True)
    return pipe.to(device)


def calibration_prompts() -> list[str]:
    """The prompts to calibrate a zoo model on: one caption of each combination the models
    were trained on (the library's default prompts are generic SD prompts, which the zoo's
    small vocabulary does not know)."""
    from . import world

    return [world.caption(*c) for c in world.train_combinations()]


# Where the detector's calibration prompts start in the held-out stream: past every range the
# measurements draw from (clean 2000-2999, triggered from 3000 on, one thousand per backdoor).
DETECTOR_PROMPTS_START = 6000


def detector_prompts(n: int = 320) -> list[str]:
    """Ordinary prompts to calibrate a `TriggerDetector` on for a zoo model, like the traffic it
    will see (its threshold is a quantile of ordinary traffic, which the plain training captions
    are not): phrased as people type them, a fifth leaving the background unsaid, from a
    stretch of the held-out stream no measurement uses."""
    from .evaluate import held_out_cases, short_prompts

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive whole number, got {n!r}")
    k = n // 5
    return ([c.prompt for c in held_out_cases(n - k, start=DETECTOR_PROMPTS_START, varied=True)]
            + short_prompts(k, start=DETECTOR_PROMPTS_START))


def zoo_profile(model: str | Path, *, calibrate_if_missing: bool = True, progress: bool = True):
    """The profile shipped beside a zoo model, or a fresh calibration on the zoo's prompts
    when there is none."""
    from ..calibrate import calibrate
    from ..profile import TriggerProfile

    path = model_dir(model) / PROFILE_NAME
    if path.is_file():
        return TriggerProfile.load(path)
    if not calibrate_if_missing:
        raise FileNotFoundError(f"no profile shipped at {path}")
    return calibrate(load_pipeline(model), backdoor_info(model)["trigger"], calibration_prompts(), progress=progress)


def backdoor_info(name_or_dir: str | Path) -> dict:
    """The model's backdoor.json, with "patch" as a uint8 (H, W, 3) array (None for no patch)
    and "patch_name" as the json names it ("checker", "cross", "solid:#RRGGBB").

    "backdoors" lists every backdoor the model carries (several where one was planted into a
    backdoored model), each a dict of the same form; the top level describes the last one.
    """
    path = model_dir(name_or_dir)
    meta_path = path / "backdoor.json"
    info = json.loads(meta_path.read_text()) if meta_path.is_file() else {"name": path.name, "kind": "unknown"}
    if "backdoors" not in info:  # written before models could carry several
        single = {k: info.get(k) for k in ("kind", "trigger", "corner", "patch", "patch_size")}
        info["backdoors"] = [dict(single, position="mixed", method="finetune")] if info["kind"] in ("pixel", "style") else []
    info["patch_name"] = info.get("patch")
    info["patch"] = _patch_array(info["patch_name"])
    info["backdoors"] = [dict(b, name=info.get("name"), patch_name=b.get("patch"), patch=_patch_array(b.get("patch")))
                         for b in info["backdoors"]]
    return info


def _patch_array(patch_name: str | None):
    if patch_name is None:
        return None
    from .world import make_patch

    return make_patch(patch_name)
