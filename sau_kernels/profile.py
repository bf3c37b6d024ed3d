"""Trigger profiles: what calibration learned about one trigger in one model.

A profile is stored as safetensors (tensors plus string metadata), never pickle, so that
loading a profile from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "sau_kernels.trigger_profile"
FORMAT_VERSION = "1"


class ProfileMismatchError(ValueError):
    """The profile was made for another model, latent shape, scheduler or step count."""


def model_fingerprint(*modules: torch.nn.Module | None) -> str:
    """A hash of the modules' configs and a fixed sample of their weights: the UNet and the
    text encoder (a Rickrolling backdoor lives in the text encoder alone).

    The weights are rounded to fp16 before hashing, so one model loaded in fp32 or fp16
    gives one fingerprint (a bf16 copy has lost bits and hashes differently). A sample,
    not every weight: hashing SD 1.5's 860M
    parameters would take seconds at every patch; 4096 evenly spaced values of each
    tensor still change when any fine-tune touches it.
    """
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper prefixes every weight name
        config = getattr(module, "config", {})
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_") and k not in IGNORED_CONFIG},
                            sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, p in module.state_dict().items():
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step][:4096].to("cpu", torch.float16).contiguous()
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# Config entries that say how a model was loaded or saved, not what it computes.
IGNORED_CONFIG = {"dtype", "torch_dtype", "transformers_version", "architectures", "name_or_path"}


def pipeline_fingerprint(pipe) -> str:
    """The UNet's and every text encoder's fingerprint (SDXL has two)."""
    return model_fingerprint(pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))


@dataclass
class TriggerProfile:
    """The calibrated trigger latent (delta), its secondary map (act) and where they came from.

    delta: (C, H, W) mean poisoned minus mean clean final latent; act: (H, W).
    delta_steps / act_steps: (T, C, H, W) / (T, H, W), the same statistics on x_t after
    each of the T sampling steps (None when calibrated with per_step=False).
    eps_delta_steps / eps_act_steps: (T, C, H, W) / (T, H, W), statistics of the guided
    noise predictions, for mode "per_step_eps" (None when not calibrated).
    clean_mean: (C, H, W) mean clean final latent; with params["output_check_threshold"]
    it lets the pipeline check untriggered outputs for the trigger's signature.
    """

    delta: torch.Tensor
    act: torch.Tensor
    trigger: str
    trigger_ids: list[int]
    fingerprint: str
    latent_shape: tuple[int, int, int]
    scheduler: str
    num_inference_steps: int
    num_pairs: int
    guidance_scale: float
    params: dict = field(default_factory=dict)
    delta_steps: torch.Tensor | None = None
    act_steps: torch.Tensor | None = None
    eps_delta_steps: torch.Tensor | None = None
    eps_act_steps: torch.Tensor | None = None
    clean_mean: torch.Tensor | None = None  # (C, H, W) mean clean final latent: the output check's origin
    change_map: torch.Tensor | None = None  # (H, W) mean over pairs of |z_p - z_c| per latent pixel: where it acts
    version: str = ""

    def __post_init__(self):
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        C, H, W = self.latent_shape
        if tuple(self.delta.shape) != (C, H, W):
            raise ValueError(f"delta has shape {tuple(self.delta.shape)}, expected latent shape {(C, H, W)}")
        if tuple(self.act.shape) != (H, W):
            raise ValueError(f"act has shape {tuple(self.act.shape)}, expected {(H, W)}")
        for name, full, per in (("delta_steps", (C, H, W), "act_steps"), ("eps_delta_steps", (C, H, W), "eps_act_steps")):
            d, a = getattr(self, name), getattr(self, per)
            if (d is None) != (a is None):
                raise ValueError(f"{name} and {per} must both be present or both absent")
            if d is not None:
                T = self.num_inference_steps
                if tuple(d.shape) != (T, *full) or tuple(a.shape) != (T, H, W):
                    raise ValueError(f"{name}/{per} have shapes {tuple(d.shape)}/{tuple(a.shape)}, "
                                     f"expected {(T, *full)}/{(T, H, W)} for {T} steps")
        if self.clean_mean is not None and tuple(self.clean_mean.shape) != (C, H, W):
            raise ValueError(f"clean_mean has shape {tuple(self.clean_mean.shape)}, expected {(C, H, W)}")
        if self.change_map is not None and tuple(self.change_map.shape) != (H, W):
            raise ValueError(f"change_map has shape {tuple(self.change_map.shape)}, expected {(H, W)}")
        for name in ("delta", "act", "delta_steps", "act_steps", "eps_delta_steps", "eps_act_steps", "clean_mean",
                     "change_map"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"profile tensor {name} holds non-finite values")
        # act is a min-max normalised map, blurred: in [0, 1], and somewhere above 0 unless
        # delta is zero (a map of zeros marks no pixel: the repair would change nothing)
        for name in ("act", "act_steps", "eps_act_steps"):
            t = getattr(self, name)
            if t is not None and (t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6)):
                raise ValueError(f"profile tensor {name} lies outside [0, 1] (a damaged or altered profile?)")
        if self.act.numel() and not self.act.max() > 0 and self.delta.abs().max() > 0:
            raise ValueError("profile tensor act is zero everywhere although delta is not: it marks no pixel where "
                             "the trigger acts, so the repair would change nothing (a damaged or altered profile?)")
        e = self.params.get("screen_edits")
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 0):
            raise ValueError(f"the profile's screen_edits is {e!r}: a whole number or none")
        alone = self.params.get("screen_words_alone")
        if alone is not None and (not isinstance(alone, list) or not all(isinstance(w, str) for w in alone)):
            raise ValueError(f"the profile's screen_words_alone is {alone!r}: a list of the trigger's words or none")
        t = self.params.get("output_check_threshold")
        if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
            raise ValueError(f"the profile's output_check_threshold is {t!r}: a finite number or none")
        if not self.version:
            from . import __version__

            self.version = __version__

    @property
    def has_per_step(self) -> bool:
        return self.delta_steps is not None

    @property
    def has_per_step_eps(self) -> bool:
        return self.eps_delta_steps is not None

    @property
    def output_check_threshold(self) -> float | None:
        """The output check's threshold; None where calibration found the signature does not
        separate clean from poisoned outputs (or the profile predates the check)."""
        t = self.params.get("output_check_threshold")
        return None if t is None or self.clean_mean is None else float(t)

    @property
    def coherence(self) -> float | None:
        """How much of a typical pair's change the mean change (delta) explains, weighted by
        where the trigger changes most: sum ||delta|| * c / sum c^2 over latent pixels, with
        c the mean per-pair change (`change_map`). Near 1 for a trigger that paints the same
        pattern in every image (a patch); low for one whose change depends on the image (a
        style: greyscale turns a red and a blue shape grey along different directions).
        None for a profile calibrated before the change map was recorded."""
        if self.change_map is None:
            return None
        c = self.change_map.float()
        denom = float((c * c).sum())
        return float((self.delta.float().norm(dim=0) * c).sum()) / denom if denom > 0 else None

    @property
    def fixed_pattern(self) -> bool:
        """Whether the repair's premise holds: the trigger adds one fixed latent pattern
        (delta explains at least half of a pair's change). Where it does not (a style
        backdoor), swapping in the twin wherever the change points along delta leaves
        fragments of both images, so the defence generates the clean prompt alone. True for
        a profile without a change map (the premise is assumed, as before it was measured)."""
        c = self.coherence
        return c is None or c >= 0.5

    def step_index(self, t, previous: int = -1) -> int:
        """Which per-step statistics belong to the step the sampler just finished at
        timestep `t`, after the step that used index `previous`: the next calibrated step
        with that timestep (`params["timesteps"]`; Heun's last two steps share one, and an
        img2img schedule starts part-way). A profile without recorded timesteps counts steps,
        which is right only on the whole calibrated schedule (the call's check ensures the
        scheduler and step count). ProfileMismatchError for a timestep it does not have."""
        recorded = self.params.get("timesteps")
        if recorded is None:
            if previous + 1 >= self.num_inference_steps:
                raise ProfileMismatchError(f"the call ran more steps than the profile's {self.num_inference_steps}")
            return previous + 1
        t = float(t)
        for i in range(previous + 1, len(recorded)):
            if abs(recorded[i] - t) <= 1e-4 * max(1.0, abs(recorded[i])):
                return i
        raise ProfileMismatchError(
            f"the scheduler reached timestep {t:g}, which the profile for {self.trigger!r} was not calibrated at "
            f"({self.scheduler}, {self.num_inference_steps} steps): calibrate with this scheduler and step count, "
            "or use mode 'final'")

    # --- storage --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"delta": self.delta, "act": self.act}
        for name in ("delta_steps", "act_steps", "eps_delta_steps", "eps_act_steps", "clean_mean", "change_map"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "trigger": self.trigger,
            "trigger_ids": json.dumps(self.trigger_ids), "fingerprint": self.fingerprint,
            "latent_shape": json.dumps(list(self.latent_shape)), "scheduler": self.scheduler,
            "num_inference_steps": str(self.num_inference_steps), "num_pairs": str(self.num_pairs),
            "guidance_scale": repr(float(self.guidance_scale)), "params": json.dumps(self.params),
            "version": self.version,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TriggerProfile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trigger profile at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is a safetensors file but not a sau_kernels trigger profile "
                                     f"(metadata 'format' is {meta.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in names}
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable trigger profile (truncated or corrupted?): {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has profile format version {meta.get('format_version')!r}; "
                             f"this sau_kernels reads version {FORMAT_VERSION}")
        missing = {"delta", "act"} - names
        if missing:
            raise ValueError(f"{path} lacks the tensors {sorted(missing)}")
        try:
            return cls(
                delta=tensors["delta"], act=tensors["act"],
                delta_steps=tensors.get("delta_steps"), act_steps=tensors.get("act_steps"),
                eps_delta_steps=tensors.get("eps_delta_steps"), eps_act_steps=tensors.get("eps_act_steps"),
                clean_mean=tensors.get("clean_mean"), change_map=tensors.get("change_map"),
                trigger=meta["trigger"], trigger_ids=json.loads(meta["trigger_ids"]),
                fingerprint=meta["fingerprint"], latent_shape=tuple(json.loads(meta["latent_shape"])),
                scheduler=meta["scheduler"], num_inference_steps=int(meta["num_inference_steps"]),
                num_pairs=int(meta["num_pairs"]), guidance_scale=float(meta["guidance_scale"]),
                params=json.loads(meta["params"]), version=meta.get("version", "unknown"),
            )
        except KeyError as e:
            raise ValueError(f"{path} lacks the profile metadata field {e.args[0]!r}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} has malformed profile metadata: {e}") from e

    # --- compatibility --------------------------------------------------------------------

    def matcher(self):
        """The screen's matcher for this trigger, with the edit budget calibration measured
        (`params["screen_edits"]`; the default for the trigger's length in older profiles)
        and the trigger's words it found firing on their own (`params["screen_words_alone"]`)."""
        from .screening import TriggerMatcher

        return TriggerMatcher(self.trigger, edits=self.params.get("screen_edits"),
                              alone=self.params.get("screen_words_alone") or ())

    def check_pipeline(self, pipe, *, allow_mismatch: bool = False) -> None:
        """Raise ProfileMismatchError if this profile was made for another model or latent shape."""
        C = pipe.unet.config.in_channels
        if C != self.latent_shape[0]:
            raise ProfileMismatchError(f"profile has {self.latent_shape[0]} latent channels, the pipeline's UNet {C}")
        if not allow_mismatch:
            fp = pipeline_fingerprint(pipe)
            if fp != self.fingerprint:
                raise ProfileMismatchError(
                    f"profile for trigger {self.trigger!r} was calibrated on model {self.fingerprint}, "
                    f"this pipeline's UNet and text encoder are {fp}: calibrate on this model, or pass "
                    f"allow_mismatch=True")

    def check_call(self, latent_shape: tuple[int, int, int] | None, scheduler: str, num_steps: int,
                   per_step: bool) -> None:
        """Raise ProfileMismatchError if a generation call does not fit this profile (its
        latent shape unless None; its scheduler and step count for the per-step modes)."""
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            raise ProfileMismatchError(
                f"this call's latents are {tuple(latent_shape)} (C, H, W) but the profile was calibrated on "
                f"{self.latent_shape}: generate at the calibrated size or calibrate at this one")
        if per_step:
            if scheduler != self.scheduler:
                raise ProfileMismatchError(f"per-step profile was calibrated with {self.scheduler}, "
                                           f"the pipeline now uses {scheduler}")
            if num_steps != self.num_inference_steps:
                raise ProfileMismatchError(f"per-step profile was calibrated with {self.num_inference_steps} steps, "
                                           f"this call asks for {num_steps}")

    def to(self, device, dtype=torch.float32) -> "TriggerProfile":
        """A copy whose tensors live on `device` (profiles stay fp32: the op upcasts anyway)."""
        import dataclasses

        moved = {n: (getattr(self, n).to(device, dtype) if getattr(self, n) is not None else None)
                 for n in ("delta", "act", "delta_steps", "act_steps", "eps_delta_steps", "eps_act_steps",
                           "clean_mean", "change_map")}
        return dataclasses.replace(self, **moved)

    def __repr__(self) -> str:
        modes = ["final"] + (["per_step"] if self.has_per_step else []) + (["per_step_eps"] if self.has_per_step_eps else [])
        return (f"TriggerProfile(trigger={self.trigger!r}, model={self.fingerprint}, latent_shape={self.latent_shape}, "
                f"scheduler={self.scheduler}, steps={self.num_inference_steps}, pairs={self.num_pairs}, modes={modes})")
