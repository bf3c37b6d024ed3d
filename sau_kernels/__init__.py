"""sau_kernels: Spatial Attention Unlearning for diffusers Stable Diffusion pipelines.

Public API (see README.md): the fused repair op and its helpers, trigger profiles and
calibration, and patching a pipeline.

Importing the package registers the operator (torch.ops.sau.repair) and nothing more:
triton is imported, and CUDA initialised, only when a backend needs them, and the
profile, calibration and pipeline modules load on first use of one of their names.
"""

__version__ = "0.1.0"

from .ops import available_backends, repair, secondary_map

# name -> the submodule that defines it, imported on first access (PEP 562).
_LAZY = {
    "TriggerProfile": "profile", "ProfileMismatchError": "profile",
    "calibrate": "calibrate",
    "SAUConfig": "pipeline", "SAUReport": "pipeline", "SuspectOutputError": "pipeline",
    "patch": "pipeline", "patched": "pipeline", "unpatch": "pipeline",
}

__all__ = [
    "available_backends", "repair", "secondary_map",
    "TriggerProfile", "ProfileMismatchError", "calibrate",
    "patch", "unpatch", "patched", "SAUConfig", "SAUReport", "SuspectOutputError",
    "__version__",
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
