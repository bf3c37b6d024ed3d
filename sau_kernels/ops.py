"""torch.ops.sau bindings, fake kernels, argument checks and the one place a backend is chosen.

Backends:
  reference  sau_kernels.reference (eager PyTorch), any device
  cpp        torch.ops.sau.repair on CPU tensors (csrc/sau_repair_cpu.cpp)
  cuda       torch.ops.sau.repair on CUDA tensors, when the extension was built with CUDA
  triton     torch.ops.sau.repair_triton (sau_kernels/triton_repair.py) on CUDA tensors, or
             on the CPU when TRITON_INTERPRET=1 was set before sau_kernels was imported
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("reference", "cpp", "triton", "cuda")
BLENDS = ("convex", "paper")
SIMILARITIES = ("latent", "difference")
MAX_KSIZE = 31  # SAU_MAX_KSIZE in csrc/sau_repair.h
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton decides at kernel definition whether to interpret, so read the flag once, now.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.sau.repair / repair_out)

    _C_ERROR = None
except ImportError as e:  # not built: only "reference" (and "triton") remain
    _C_ERROR = e
_HAS_CUDA_KERNEL = _C_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "sau::repair", "CUDA"
)

triton_repair = None
_TRITON_ERROR: Exception | None = None
if _TRITON_INTERPRET or torch.cuda.is_available():
    try:
        from . import triton_repair
    except Exception as e:  # triton missing or broken: "triton" is unavailable, and says why
        _TRITON_ERROR = e


def _available(kind: str) -> list[str]:
    names = ["reference"]
    if kind == "cpu":
        if _C_ERROR is None:
            names.append("cpp")
        if triton_repair is not None and _TRITON_INTERPRET:
            names.append("triton")
    elif kind == "cuda" and torch.cuda.is_available():
        if triton_repair is not None:
            names.append("triton")
        if _HAS_CUDA_KERNEL:
            names.append("cuda")
    return names


# Fixed for the life of the process; computed once so that repair() only looks up.
_AVAILABLE = {kind: _available(kind) for kind in ("cpu", "cuda")}


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that really run on `device` in this process, from BACKENDS."""
    kind = torch.device(device).type
    return list(_AVAILABLE.get(kind, ["reference"]))


def _why_unavailable(name: str, kind: str) -> str:
    if name == "cpp":
        if kind != "cpu":
            return "it runs on CPU tensors only"
        return f"sau_kernels._C failed to import ({_C_ERROR})"
    if name == "cuda":
        if kind != "cuda":
            return "it runs on CUDA tensors only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return "the extension was built without CUDA (rebuild with FORCE_CUDA=1 and CUDA_HOME set)"
    if name == "triton":
        if _TRITON_ERROR is not None:
            return f"triton failed to import ({_TRITON_ERROR})"
        if kind == "cpu":
            return "Triton runs on the CPU only with TRITON_INTERPRET=1 set before importing sau_kernels"
        return f"Triton does not run on {kind} tensors"
    return "unknown reason"


def _resolve_backend(backend: str, kind: str) -> str:
    """THE backend choice: 'auto' picks cuda > triton on GPU, cpp on CPU; never a silent fallback."""
    available = _AVAILABLE.get(kind, ["reference"])
    if backend == "auto":
        if kind == "cuda":
            name = "cuda" if "cuda" in available else "triton"
        elif kind == "cpu":
            name = "cpp"
        else:
            name = "reference"
    else:
        name = backend
    if name in available:
        return name
    if name not in BACKENDS:
        raise ValueError(f"sau.repair: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    raise ValueError(
        f"sau.repair: backend {name!r} is not available on {kind}: {_why_unavailable(name, kind)}; "
        f"available: {available}"
    )


def check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out=None):
    """Raise TypeError/ValueError naming the problem. Cheap Python checks only (no tensor ops)."""
    for name, t in (("z_p", z_p), ("z_c", z_c), ("delta", delta), ("act", act)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sau.repair: {name} must be a torch.Tensor, got {type(t).__name__}")
    if z_p.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"sau.repair: z_p must be float16, bfloat16 or float32, got {z_p.dtype}")
    if z_c.dtype != z_p.dtype:
        raise TypeError(f"sau.repair: z_c dtype {z_c.dtype} differs from z_p dtype {z_p.dtype}")
    if not delta.is_floating_point():
        raise TypeError(f"sau.repair: delta must be a float tensor, got {delta.dtype}")
    if not act.is_floating_point():
        raise TypeError(f"sau.repair: act must be a float tensor, got {act.dtype}")
    if not (z_c.device == z_p.device and delta.device == z_p.device and act.device == z_p.device):
        raise ValueError(
            f"sau.repair: all inputs must be on one device, got z_p {z_p.device}, z_c {z_c.device}, "
            f"delta {delta.device}, act {act.device}"
        )
    if z_p.dim() != 4:
        raise ValueError(f"sau.repair: z_p must be (B, C, H, W), got shape {tuple(z_p.shape)}")
    if z_c.shape != z_p.shape:
        raise ValueError(f"sau.repair: z_c shape {tuple(z_c.shape)} differs from z_p shape {tuple(z_p.shape)}")
    _, C, H, W = z_p.shape
    if delta.shape != (C, H, W):
        raise ValueError(f"sau.repair: delta shape {tuple(delta.shape)} must be (C, H, W) = {(C, H, W)}")
    if act.shape != (H, W):
        raise ValueError(f"sau.repair: act shape {tuple(act.shape)} must be (H, W) = {(H, W)}")
    _check_blur(blur_sigma, blur_ksize, H, W)
    if blend not in BLENDS:
        raise ValueError(f"sau.repair: unknown blend {blend!r} (expected one of {BLENDS})")
    if similarity not in SIMILARITIES:
        raise ValueError(f"sau.repair: unknown similarity {similarity!r} (expected one of {SIMILARITIES})")
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float))):
        raise TypeError(f"sau.repair: gate must be None or a number, got {type(gate).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"sau.repair: out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != z_p.shape:
            raise ValueError(f"sau.repair: out shape {tuple(out.shape)} differs from z_p shape {tuple(z_p.shape)}")
        if out.dtype != z_p.dtype:
            raise TypeError(f"sau.repair: out dtype {out.dtype} differs from z_p dtype {z_p.dtype}")
        if out.device != z_p.device:
            raise ValueError(f"sau.repair: out device {out.device} differs from z_p device {z_p.device}")


def _check_blur(sigma, ksize, H, W, max_ksize=MAX_KSIZE):
    if isinstance(ksize, bool) or not isinstance(ksize, int):
        raise TypeError(f"sau.repair: blur_ksize must be an int, got {type(ksize).__name__}")
    if ksize < 1 or ksize % 2 == 0 or ksize > max_ksize:
        raise ValueError(f"sau.repair: blur_ksize must be odd and in [1, {max_ksize}], got {ksize}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sau.repair: blur_sigma must be a number, got {type(sigma).__name__}")
    if not sigma >= 0:  # also rejects NaN
        raise ValueError(f"sau.repair: blur_sigma must be >= 0, got {sigma}")
    if H <= ksize // 2 or W <= ksize // 2:
        raise ValueError(
            f"sau.repair: reflect border needs H and W > blur_ksize // 2 = {ksize // 2}, got H={H}, W={W}"
        )


# Fakes: shapes and checks only, so torch.compile(fullgraph=True) traces the ops.
if _C_ERROR is None:

    @torch.library.register_fake("sau::repair")
    def _repair_fake(z_p, z_c, delta, act, tau1=0.5, tau2=0.3, k=12.0, alpha=1.0, blur_sigma=0.2,
                     blur_ksize=5, blend="convex", similarity="latent", gate=None):
        check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate)
        return z_p.new_empty(z_p.shape)  # contiguous, like the kernels' output

    @torch.library.register_fake("sau::repair_out")
    def _repair_out_fake(z_p, z_c, delta, act, tau1=0.5, tau2=0.3, k=12.0, alpha=1.0, blur_sigma=0.2,
                         blur_ksize=5, blend="convex", similarity="latent", gate=None, *, out):
        check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out)


def _run_reference(args, out):
    z_p, z_c, delta, act, tau1, tau2, k, alpha, sigma, ksize, blend, similarity, gate = args
    y = reference.repair(z_p, z_c, delta, act, tau1=tau1, tau2=tau2, k=k, alpha=alpha, blur_sigma=sigma,
                         blur_ksize=ksize, blend=blend, similarity=similarity, gate=gate)
    return y if out is None else out.copy_(y)


def _run_op(args, out):  # "cpp" and "cuda": the C++ op dispatches on the tensors' device
    if out is None:
        return torch.ops.sau.repair.default(*args)
    torch.ops.sau.repair_out.default(*args, out=out)
    return out


def _run_triton(args, out):
    if out is None:
        return torch.ops.sau.repair_triton.default(*args)
    torch.ops.sau.repair_triton_out.default(*args, out)
    return out


_RUNNERS = {"reference": _run_reference, "cpp": _run_op, "cuda": _run_op, "triton": _run_triton}


def repair(
    z_p: torch.Tensor,
    z_c: torch.Tensor,
    delta: torch.Tensor,
    act: torch.Tensor,
    *,
    tau1: float = 0.5,
    tau2: float = 0.3,
    k: float = 12.0,
    alpha: float = 1.0,
    blur_sigma: float = 0.2,
    blur_ksize: int = 5,
    blend: str = "convex",
    similarity: str = "latent",
    gate: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    return_coverage: bool = False,
) -> torch.Tensor:
    """Repair poisoned latents z_p with clean latents z_c where the trigger acts (docs/method.md, section 3).

    z_p, z_c: (B, C, H, W) fp16/bf16/fp32 of one dtype; delta: (C, H, W); act: (H, W) (any float
    dtype, any strides). Returns a tensor of z_p's shape and dtype, or writes into `out` (which
    must not alias the inputs) and returns it. backend: "auto", or one of available_backends().
    """
    check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out)
    name = _resolve_backend(backend, z_p.device.type)
    args = (
        z_p, z_c, delta.to(torch.float32).contiguous(), act.to(torch.float32).contiguous(),
        float(tau1), float(tau2), float(k), float(alpha), float(blur_sigma), blur_ksize,
        blend, similarity, None if gate is None else float(gate),
    )
    result = _RUNNERS[name](args, out)
    if not return_coverage:
        return result
    m = reference.repair_masks(z_p, z_c, delta, act, tau1=tau1, tau2=tau2, k=k, alpha=alpha,
                               similarity=similarity, gate=gate)
    return result, torch.stack([m["M1"].flatten(1).mean(1), m["M2"].flatten(1).mean(1)], dim=1)


def secondary_map(delta: torch.Tensor, sigma: float = 2.0, ksize: int = 5) -> torch.Tensor:
    """act for a profile: blurred, min-max normalised channel L2 norm of delta (docs/method.md, section 2)."""
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"secondary_map: delta must be a torch.Tensor, got {type(delta).__name__}")
    if not delta.is_floating_point():
        raise TypeError(f"secondary_map: delta must be a float tensor, got {delta.dtype}")
    if delta.dim() != 3:
        raise ValueError(f"secondary_map: delta must be (C, H, W), got shape {tuple(delta.shape)}")
    # Computed once per profile, so any width goes: no kernel limit applies.
    _check_blur(sigma, ksize, delta.shape[1], delta.shape[2], max_ksize=2**31)
    return reference.secondary_map(delta, sigma, ksize)
