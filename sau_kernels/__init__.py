"""sau_kernels: Spatial Attention Unlearning for diffusers Stable Diffusion pipelines.

Public API (see README.md): the fused repair op and its helpers, trigger profiles and
calibration, and patching a pipeline.
"""

__version__ = "0.1.0"

from .ops import available_backends, repair, secondary_map
from .profile import ProfileMismatchError, TriggerProfile
from .calibrate import calibrate
from .pipeline import SAUConfig, SAUReport, SuspectOutputError, patch, patched, unpatch

__all__ = [
    "available_backends", "repair", "secondary_map",
    "TriggerProfile", "ProfileMismatchError", "calibrate",
    "patch", "unpatch", "patched", "SAUConfig", "SAUReport", "SuspectOutputError",
    "__version__",
]
