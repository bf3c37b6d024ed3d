"""sau_kernels: Spatial Attention Unlearning for diffusers Stable Diffusion pipelines.

Public API (see README.md): the fused repair op and its helpers, trigger profiles and
calibration, and patching a pipeline.

Importing the package registers the operator (torch.ops.sau.repair) and nothing more:
triton is imported, and CUDA initialised, only when a backend needs them; diffusers loads
with the first pipeline patched or calibrated.
"""

__version__ = "0.1.0"

from .ops import available_backends, repair, secondary_map

from .profile import ProfileMismatchError, TriggerProfile
from .calibrate import calibrate  # the function shadows its module's name, as it always has
from .pipeline import SAUConfig, SAUReport, SuspectOutputError, patch, patched, unpatch

__all__ = [
    "available_backends", "repair", "secondary_map",
    "TriggerProfile", "ProfileMismatchError", "calibrate",
    "patch", "unpatch", "patched", "SAUConfig", "SAUReport", "SuspectOutputError",
    "TriggerDetector", "DetectionError",
    "__version__",
]


def __getattr__(name):
    # the detector (and its tqdm and screening imports) loads when first named
    if name in ("TriggerDetector", "DetectionError"):
        from . import detect

        return getattr(detect, name)
    raise AttributeError(f"module 'sau_kernels' has no attribute {name!r}")
