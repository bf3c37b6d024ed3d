"""Compile the Triton repair kernel for a GPU without one: every window the autotuner times.

    python benchmarks/triton_ptx.py                 # sm_90 (H100), fp16, radius 2, every mode on
    python benchmarks/triton_ptx.py --arch 80 --dtype fp32

Triton lowers the kernel to PTX and assembles it to a cubin (its wheel ships the
assembler), so a kernel that does not compile for the GPU fails here, on any machine. Per
window, halo and warp count it prints the registers and local memory (spills) cuobjdump
reads in the cubin, the shared memory, and how wide the global loads and stores came out
(bytes per lane: 16 is a 128-bit access).
Exit status 1 if any window fails to compile. The interpreter flag must be off: the
script sets TRITON_INTERPRET=0 before triton is imported.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sau_kernels import triton_repair  # noqa: E402

CONSTEXPR = {p.name for p in triton_repair._repair_window.params if p.is_constexpr}
SCALARS = ("tau1", "tau2", "gate", "sigma", "cp0", "cp1", "cp2", "cp3", "cc0", "cc1", "cc2", "cc3")


def specialisation(dtype: str, shape: tuple[int, int, int, int]) -> tuple[dict, dict, dict]:
    """The signature, constants and attributes triton's launcher would give the kernel for
    contiguous (B, C, H, W) inputs: pointers 16-byte aligned, integers equal to 1 made
    constants, integers divisible by 16 marked so (what lets it prove 128-bit accesses)."""
    B, C, H, W = shape
    strides = (C * H * W, H * W, W, 1)
    ints = dict(C=C, H=H, W=W, cov_sb=2, cov_sc=1)
    for name in ("zp", "zc", "out"):
        ints.update(zip((f"{name}_sb", f"{name}_sc", f"{name}_sh", f"{name}_sw"), strides))
    sig, consts, attrs = {}, {}, {}
    for k, name in enumerate(triton_repair._repair_window.arg_names):
        if name in CONSTEXPR:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in ("zp_ptr", "zc_ptr", "out_ptr") else "*fp32"
            attrs[(k,)] = [["tt.divisibility", 16]]
        elif name in SCALARS:
            sig[name] = "fp32"
        elif ints[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(k,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def access_widths(ptx: str, op: str) -> str:
    """Global loads or stores in the PTX by bytes per lane, e.g. '9 x 16 B'."""
    counts: dict[int, int] = {}
    for vec, bits in re.findall(rf"{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        size = int(vec or 1) * int(bits) // 8
        counts[size] = counts.get(size, 0) + 1
    return ", ".join(f"{n} x {size} B" for size, n in sorted(counts.items(), reverse=True)) or "none"


def resource_usage(cubin: bytes) -> str:
    """Registers and local memory (spills) per thread, from cuobjdump on the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return f"{regs.group(1) if regs else '?'} registers, {local.group(1) if local else '?'} bytes local (spills)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--radius", type=int, default=2)
    ap.add_argument("--warps", type=int, nargs="+", default=None,
                    help="compile every window with these warp counts (default: the autotuner's own)")
    ap.add_argument("--width", type=int, default=64, help="H = W of the contiguous latents it specialises for")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, radius {args.radius}, gate, difference, "
          f"coverage, contiguous 2x4x{args.width}x{args.width}")
    failed = 0
    sig, consts, attrs = specialisation(args.dtype, (2, 4, args.width, args.width))
    windows = [(h, w, warps) for h, w, _ in triton_repair.GPU_WINDOWS for warps in args.warps] if args.warps \
        else triton_repair.GPU_WINDOWS
    for (bh, bw, warps), align in itertools.product(dict.fromkeys(windows), (False, True)):
        const = dict(consts, HAS_GATE=True, DIFFERENCE=True, RADIUS=args.radius, HAS_COV=True, C_BLOCK=4,
                     BLOCK_H=bh, BLOCK_W=bw, ALIGN_HALO=align)
        label = f"{bh:>3}x{bw:<4} halo {triton_repair.halo_columns(args.radius, align):>2}, {warps} warps"
        try:
            kernel = triton.compile(ASTSource(triton_repair._repair_window, sig, const, attrs),
                                    target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=warps))
        except Exception as e:  # a window that does not compile is what this script is for
            failed += 1
            print(f"{label}: FAILED to compile: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
            continue
        print(f"{label}: {resource_usage(kernel.asm['cubin'])}, {kernel.metadata.shared} bytes shared; "
              f"loads {access_widths(kernel.asm['ptx'], 'ld')}; stores {access_widths(kernel.asm['ptx'], 'st')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
