"""torch.ops.sau bindings, fake kernels, argument checks and the one place a backend is chosen.

One operator, sau::repair / sau::repair_out (its schema is in csrc/sau_repair_cpu.cpp), with
one implementation per dispatch key at a time:

  backend    implementation                                          dispatch key
  cpp        the C++ kernel (csrc/sau_repair_cpu.cpp)                 CPU
  cuda       the CUDA kernel (csrc/sau_repair_cuda.cu), when built    CUDA
  triton     the Triton kernel (sau_kernels/triton_repair.py)         CUDA; CPU with TRITON_INTERPRET=1
  reference  sau_kernels.reference (eager PyTorch), outside the operator, any device

So torch.compile, opcheck and CUDA graphs see one operator whichever backend runs. Triton
and the CUDA kernel share the CUDA key: `backend=` names the implementation a call needs,
and when that is not the one registered, `_use` registers it (torch.library) in place of the
other. A process normally keeps one; switching is a registration, cheap but not free (see
benchmarks/bench_overhead.py), and must not race with calls on other threads.

Nothing here imports triton or touches CUDA until a call or `available_backends` needs it.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from . import reference

BACKENDS = ("reference", "cpp", "triton", "cuda")
BLENDS = ("convex", "paper")
SIMILARITIES = ("latent", "difference")
MAX_KSIZE = 31  # SAU_MAX_KSIZE in csrc/sau_repair.h
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.sau.repair / repair_out)

    _C_ERROR = None
except ImportError as e:  # not built: only "reference" remains (the schema lives in _C)
    _C_ERROR = e
_HAS_CUDA_KERNEL = _C_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "sau::repair", "CUDA"
)


# ---------------------------------------------------------------------------
# Triton, imported on first use
# ---------------------------------------------------------------------------

_triton_module = None
_TRITON_ERROR: Exception | None = None


def _triton_interpret() -> bool:
    # Triton decides at kernel definition whether to interpret; the kernel is defined when
    # sau_kernels.triton_repair is first imported, so the flag counts until then.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton():
    """sau_kernels.triton_repair, imported now; None (and _TRITON_ERROR) if triton fails to import."""
    global _triton_module, _TRITON_ERROR
    if _triton_module is None and _TRITON_ERROR is None:
        try:
            from . import triton_repair

            _triton_module = triton_repair
        except Exception as e:  # triton missing or broken: "triton" is unavailable, and says why
            _TRITON_ERROR = e
    return _triton_module


def _triton_repair(*args):
    return _triton().repair(*args)


def _triton_repair_out(*args, out, coverage=None):
    _triton().repair_out(*args, out=out, coverage=coverage)


# ---------------------------------------------------------------------------
# Which implementation each dispatch key holds, and switching it
# ---------------------------------------------------------------------------

def _constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (about a second,
    and it imports triton) with the package: the same marker, set directly. Dynamo then calls
    `fn` while tracing and uses its value. tests/test_repair.py compiles through both uses."""
    fn._dynamo_marked_constant = True
    return fn


_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# The C++ implementation of each key, where there is one; the other is Triton.
_NATIVE = {"cpu": "cpp", "cuda": "cuda" if _HAS_CUDA_KERNEL else None}
_ACTIVE = dict(_NATIVE)  # what each key runs now
_TRITON_LIBS: dict[str, torch.library.Library] = {}  # the Triton registration per key, while active
_SWITCH_LOCK = threading.Lock()


def _register_triton(kind: str) -> None:
    lib = torch.library.Library("sau", "IMPL")
    with warnings.catch_warnings():  # the dispatcher warns when a kernel shadows the C++ one
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib.impl("repair", _triton_repair, _KEYS[kind])
        lib.impl("repair_out", _triton_repair_out, _KEYS[kind])
    _TRITON_LIBS[kind] = lib


# Without the C++ CUDA kernel, Triton is the CUDA implementation from the start (registering
# it imports nothing: the kernel imports triton on its first call).
if _C_ERROR is None and not _HAS_CUDA_KERNEL:
    _register_triton("cuda")
    _ACTIVE["cuda"] = "triton"


@_constant_result
def _use(kind: str, name: str) -> bool:
    """Make `name` ("cpp", "cuda" or "triton") the implementation of the `kind` dispatch key.

    Under torch.compile this runs once, while tracing: the graph then calls the operator,
    which runs what the key holds when the graph runs."""
    with _SWITCH_LOCK:
        if _ACTIVE.get(kind) == name:
            return True
        if name == "triton":
            _register_triton(kind)
        else:  # back to the C++ kernel: drop the registration that shadows it
            _TRITON_LIBS.pop(kind)._destroy()
        _ACTIVE[kind] = name
    return True


# ---------------------------------------------------------------------------
# Which backends run where, and THE backend choice
# ---------------------------------------------------------------------------


def _is_available(name: str, kind: str) -> bool:
    """Whether backend `name` runs on `kind` tensors; only a question about triton imports it."""
    if name == "reference":
        return True
    if _C_ERROR is not None:
        return False
    if name == "cpp":
        return kind == "cpu"
    if name == "cuda":
        return kind == "cuda" and _HAS_CUDA_KERNEL and torch.cuda.is_available()
    if name == "triton":
        runs_here = _triton_interpret() if kind == "cpu" else kind == "cuda" and torch.cuda.is_available()
        return runs_here and _triton() is not None
    return False


_AVAILABLE: dict[str, list[str]] = {}  # per device type, computed on first use


def _available_on(kind: str) -> list[str]:
    if kind not in _AVAILABLE:
        _AVAILABLE[kind] = [name for name in BACKENDS if _is_available(name, kind)]
    return _AVAILABLE[kind]


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that really run on `device` in this process, from BACKENDS.

    Asking about "cuda" initialises CUDA, and about a device Triton may run on imports triton."""
    return list(_available_on(torch.device(device).type))


def _why_unavailable(name: str, kind: str) -> str:
    if _C_ERROR is not None and name != "reference":
        return f"sau_kernels._C, which holds the operator, failed to import ({_C_ERROR})"
    if name == "cpp":
        return "it runs on CPU tensors only"
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
            return "Triton runs on the CPU only with TRITON_INTERPRET=1 set before its first use"
        if kind == "cuda":
            return "CUDA is not available"
        return f"Triton does not run on {kind} tensors"
    return "unknown reason"


def _resolve_backend(backend: str, kind: str) -> str:
    """THE backend choice: 'auto' picks cuda > triton on GPU, cpp on CPU; never a silent fallback."""
    if backend == "auto":
        if kind == "cuda":
            name = "cuda" if _HAS_CUDA_KERNEL else "triton"
        elif kind == "cpu":
            name = "cpp"
        else:
            name = "reference"
    else:
        name = backend
    if name not in BACKENDS:
        raise ValueError(f"sau.repair: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if _is_available(name, kind):
        return name
    raise ValueError(
        f"sau.repair: backend {name!r} is not available on {kind}: {_why_unavailable(name, kind)}; "
        f"available: {_available_on(kind)}"
    )


_RESOLVED: dict[tuple[str, str], str] = {}  # (backend, device type) -> backend: resolved once


@_constant_result  # traced as its value: no import or CUDA query in a graph
def _backend_for(backend: str, kind: str) -> str:
    name = _RESOLVED.get((backend, kind))
    if name is None:
        name = _RESOLVED[(backend, kind)] = _resolve_backend(backend, kind)
    return name


# ---------------------------------------------------------------------------
# Argument checks (Python): for the reference and Triton implementations and the fakes.
# The C++ kernels check the same in C++ (csrc/sau_repair_cpu.cpp), with the same messages.
# ---------------------------------------------------------------------------


def check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out=None,
                 coverage=None):
    """Raise TypeError/ValueError naming the problem. Python checks only (no tensor ops)."""
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
    B, C, H, W = z_p.shape
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
    inputs = (("z_p", z_p), ("z_c", z_c), ("delta", delta), ("act", act))
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"sau.repair: out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != z_p.shape:
            raise ValueError(f"sau.repair: out shape {tuple(out.shape)} differs from z_p shape {tuple(z_p.shape)}")
        if out.dtype != z_p.dtype:
            raise TypeError(f"sau.repair: out dtype {out.dtype} differs from z_p dtype {z_p.dtype}")
        if out.device != z_p.device:
            raise ValueError(f"sau.repair: out device {out.device} differs from z_p device {z_p.device}")
        _check_written("out", out, inputs)
    if coverage is not None:
        if not isinstance(coverage, torch.Tensor):
            raise TypeError(f"sau.repair: coverage must be a torch.Tensor, got {type(coverage).__name__}")
        if coverage.shape != (B, 2):
            raise ValueError(f"sau.repair: coverage shape {tuple(coverage.shape)} must be (B, 2) = {(B, 2)}")
        if coverage.dtype != torch.float32:
            raise TypeError(f"sau.repair: coverage must be float32, got {coverage.dtype}")
        if coverage.device != z_p.device:
            raise ValueError(f"sau.repair: coverage device {coverage.device} differs from z_p device {z_p.device}")
        _check_written("coverage", coverage, inputs)
        if out is not None and _may_overlap(coverage, out):
            raise ValueError("sau.repair: coverage must not alias out")


def _byte_range(t):
    lo = t.data_ptr()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def _has_memory(t) -> bool:
    """False for tensors without real memory (meta, fake and functional tensors while tracing)."""
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor) and \
        not torch._is_functional_tensor(t)


def _may_overlap(a, b) -> bool:
    """Whether two tensors' memory may overlap (their byte ranges intersect), as the C++ check."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or not (_has_memory(a) and _has_memory(b)):
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_written(name, t, inputs):
    if _has_memory(t) and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"sau.repair: {name} has elements that share memory (an expanded view?)")
    for input_name, x in inputs:
        if _may_overlap(t, x):
            raise ValueError(f"sau.repair: {name} must not alias an input, but it shares memory with {input_name}")


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
                         blur_ksize=5, blend="convex", similarity="latent", gate=None, *, out, coverage=None):
        check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out, coverage)

    _OP = torch.ops.sau.repair.default
    _OP_OUT = torch.ops.sau.repair_out.default


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


def _run_reference(args, out, return_coverage):
    z_p, z_c, delta, act, tau1, tau2, k, alpha, sigma, ksize, blend, similarity, gate = args
    params = dict(tau1=tau1, tau2=tau2, k=k, alpha=alpha, blur_sigma=sigma, blur_ksize=ksize, blend=blend,
                  similarity=similarity, gate=gate)
    y = reference.repair(z_p, z_c, delta, act, **params)
    y = y if out is None else out.copy_(y)
    if not return_coverage:
        return y
    return y, reference.repair_coverage(z_p, z_c, delta, act, **params)


def _run_op(args, out, return_coverage):
    """The operator, whose registered implementation (cpp, cuda or triton) checks its arguments."""
    if not return_coverage:
        if out is None:
            return _OP(*args)
        _OP_OUT(*args, out=out)
        return out
    z_p = args[0]
    coverage = torch.empty((z_p.shape[0], 2), dtype=torch.float32, device=z_p.device)
    if out is None:
        out = torch.empty(z_p.shape, dtype=z_p.dtype, device=z_p.device)
    _OP_OUT(*args, out=out, coverage=coverage)
    return out, coverage


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
):
    """Repair poisoned latents z_p with clean latents z_c where the trigger acts (docs/method.md, section 3).

    z_p, z_c: (B, C, H, W) fp16/bf16/fp32 of one dtype; delta: (C, H, W); act: (H, W) (any float
    dtype, any strides). Returns a tensor of z_p's shape and dtype, or writes into `out` (which
    must not alias the inputs) and returns it. backend: "auto", or one of available_backends().

    return_coverage=True returns `(out, coverage)` instead: coverage is a (B, 2) float32 tensor
    on z_p's device, per image the mean over H x W of the primary mask M1 (column 0) and of the
    secondary mask M2 (column 1), counted inside the fused kernel (no host sync). It is the only
    allocation besides the output (none besides coverage with `out=`).
    """
    args = (z_p, z_c, delta, act, tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate)
    # The hot path checks nothing in Python but two scalar types the schema would coerce: the
    # operator's implementation checks the rest (in C++ for cpp and cuda, here for triton).
    if isinstance(z_p, torch.Tensor) and type(blur_ksize) is int and (gate is None or type(gate) in (float, int)):
        kind = "cuda" if z_p.is_cuda else z_p.device.type
        name = _backend_for(backend, kind)
        if name == "reference":
            check_inputs(z_p, z_c, delta, act, blur_sigma, blur_ksize, blend, similarity, gate, out)
            return _run_reference(args, out, return_coverage)
        if _ACTIVE[kind] != name:
            _use(kind, name)
        try:
            return _run_op(args, out, return_coverage)
        except (RuntimeError, IndexError) as e:  # the dispatcher rejects an argument's type, or worse
            return _slow_path(args, backend, out, return_coverage, e)
    return _slow_path(args, backend, out, return_coverage, None)


def _slow_path(args, backend, out, return_coverage, error):
    """Arguments the hot path did not take: precise TypeError/ValueError for bad ones, else the
    call with the scalars as the schema wants them (numpy floats, 0-d tensors)."""
    check_inputs(*args[:4], *args[8:13], out)
    scalars = tuple(float(a) for a in args[4:9]) + (args[9], args[10], args[11],
                                                    None if args[12] is None else float(args[12]))
    converted = args[:4] + scalars
    if error is not None and all(type(a) is type(b) for a, b in zip(converted, args)):
        raise error  # nothing to convert: a genuine failure of the kernel
    z_p = args[0]
    kind = "cuda" if z_p.is_cuda else z_p.device.type
    name = _backend_for(backend, kind)
    if name == "reference":
        return _run_reference(converted, out, return_coverage)
    if _ACTIVE[kind] != name:
        _use(kind, name)
    return _run_op(converted, out, return_coverage)


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
