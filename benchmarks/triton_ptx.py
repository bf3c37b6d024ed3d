"""Compile the Triton repair kernel for a GPU without one: every window the autotuner times.

    python benchmarks/triton_ptx.py                 # sm_90 (H100), fp16, radius 2, every mode on
    python benchmarks/triton_ptx.py --arch 80 --dtype fp32

Triton lowers the kernel to PTX and assembles it to a cubin (its wheel ships the
assembler), so a kernel that does not compile for the GPU fails here, on any machine. Per
window and warp count it prints the registers and local memory (spills) cuobjdump reads in
the cubin, the shared memory, and how the global loads came out (a vector load moves 8 or
16 bytes per lane, a scalar one 2 or 4).
Exit status 1 if any window fails to compile. The interpreter flag must be off: the
script sets TRITON_INTERPRET=0 before triton is imported.
"""

from __future__ import annotations

import argparse
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

CONSTEXPR = ("HAS_GATE", "DIFFERENCE", "RADIUS", "HAS_COV", "C_BLOCK", "BLOCK_H", "BLOCK_W")
SCALARS = ("tau1", "tau2", "gate", "sigma", "cp0", "cp1", "cp2", "cp3", "cc0", "cc1", "cc2", "cc3")


def signature(dtype: str) -> dict[str, str]:
    sig = {}
    for name in triton_repair._repair_window.arg_names:
        if name in CONSTEXPR:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in ("zp_ptr", "zc_ptr", "out_ptr") else "*fp32"
        elif name in SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


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
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, radius {args.radius}, "
          "gate, difference, coverage")
    failed = 0
    for bh, bw in triton_repair.GPU_WINDOWS:
        for warps in args.warps:
            const = dict(HAS_GATE=True, DIFFERENCE=True, RADIUS=args.radius, HAS_COV=True, C_BLOCK=4,
                         BLOCK_H=bh, BLOCK_W=bw)
            label = f"{bh:>3}x{bw:<4} {warps} warps"
            try:
                kernel = triton.compile(ASTSource(triton_repair._repair_window, signature(args.dtype), const),
                                        target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=warps))
            except Exception as e:  # a window that does not compile is what this script is for
                failed += 1
                print(f"{label}: FAILED to compile: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
                continue
            ptx = kernel.asm["ptx"]
            vector = len(re.findall(r"ld\.global[.\w]*\.v\d", ptx))
            scalar = len(re.findall(r"ld\.global[.\w]*\.b(?:16|32) ", ptx))
            print(f"{label}: {resource_usage(kernel.asm['cubin'])}, {kernel.metadata.shared} bytes shared, "
                  f"global loads in the PTX: {vector} vector, {scalar} scalar")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
