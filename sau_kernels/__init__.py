"""sau_kernels: Spatial Attention Unlearning for diffusers Stable Diffusion pipelines.

Public API (see README.md): the fused repair op and its helpers, trigger profiles and
calibration, patching a pipeline, and the trigger detector.

Importing the package imports nothing heavy, as `import diffusers` does: each name below
loads its module, and torch, when first used, so that `sau-kernels --help`, a bad argument
or the serving client answers without paying torch's import. The operator
(`torch.ops.sau.repair`) is registered with the first use of `repair` (or of anything that
repairs), or by `import sau_kernels.ops`; triton is imported, and CUDA initialised, only when
a backend needs them; diffusers loads with the first pipeline patched or calibrated.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "available_backends": "ops", "repair": "ops", "secondary_map": "ops",
    "TriggerProfile": "profile", "ProfileMismatchError": "profile",
    "calibrate": "calibrate",
    "patch": "pipeline", "unpatch": "pipeline", "patched": "pipeline", "SAUConfig": "pipeline",
    "SAUReport": "pipeline", "SuspectOutputError": "pipeline",
    "TriggerDetector": "detect", "DetectionError": "detect",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sau_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`sau_kernels.calibrate` is the function, although a module of that name exists: the
    import system sets a submodule on its package when it first loads it (whoever imports
    it, whenever), and this keeps the function in place. Anything else set there (a test's
    mock) is kept until deleted."""

    @property
    def calibrate(self):
        if "_calibrate_set" in self.__dict__:
            return self.__dict__["_calibrate_set"]
        return importlib.import_module(".calibrate", __name__).calibrate

    @calibrate.setter
    def calibrate(self, value):
        if not isinstance(value, types.ModuleType):  # the submodule being bound on first import
            self.__dict__["_calibrate_set"] = value

    @calibrate.deleter
    def calibrate(self):
        self.__dict__.pop("_calibrate_set", None)


sys.modules[__name__].__class__ = _Package
