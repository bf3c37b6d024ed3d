#!/usr/bin/env bash
# One prepared GPU check, run from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh
# It expects torch (CUDA build, e.g. 2.11+cu130), triton, nvcc and python3, and no network.
# Anything else (diffusers, for the pipeline steps) may be carried as wheels in .whl/,
# made on a networked machine with `make gpu-wheels`; they are installed into /tmp/site.
# Steps, each under its own timeout (seconds taken on an H100, 2026-11-28, in brackets; those
# marked * are estimates, not yet run on a GPU):
#   1. build sau_kernels._C with the CUDA kernel in place, sm_90 [34]
#   2. tests/test_gpu.py: cuda and compiled triton against the reference, with mask coverage,
#      opcheck, CUDA graph replay, torch.compile; Triton in one pinned window, and the
#      autotuner once in a process of its own [63 before the autotuner; ~120*]
#   3. benchmarks/bench_repair_gpu.py: eager / compile / triton / cuda (+ coverage), GB/s against
#      a copy of the same bytes at 256x4x128x128 fp16 and 64x4x128x128 fp32; call overhead at
#      1x4x64x64 fp16 against an empty launch; CUDA-graph replay against a graph of the copy;
#      the Triton window the autotuner chose per shape [41 before the autotuner; ~100*]
#   4. ncu (when `ncu` is on the PATH): Nsight Compute's speed-of-light and memory sections for
#      each repair kernel at the two big shapes, benchmarks/ncu_repair.py [~60*]
#   5. benchmarks/bench_pipeline.py --sd15: SAU's end-to-end cost on an SD 1.5-sized pipeline
#      (random weights, 512 px, fp16, SDPA), eager: latency at batch 1 and 4, throughput, shares [~180]
#   6. bench_pipeline_compile: the same with torch.compile of the UNet, latency at batch 1,
#      final mode [~190 with a warm Inductor cache; compiles at batch 2 and 4]
# Steps 1-5 are the default (typically ~480 s with the Triton autotuner's compiles; worst
# case, every step at its limit, 580 s: one 10-minute call); step 6 does not fit beside them, so it is a second call on the same warm
# machine (the build is kept):
#   GPU_CHECK_STEPS=bench_pipeline_compile bash benchmarks/gpu_check.sh
# The kernels alone (steps 1-4, worst case 380 s): GPU_CHECK_STEPS="test_gpu bench_gpu ncu".
# test_cpu (the other repair tests and the CUDA-kernel emulation) is CI's; it runs only when named.
# GPU_CHECK_DRY_RUN=1 checks this script where there is no GPU: no build, the benchmarks'
# --dry-run on the CPU, no pipeline steps.
set -uo pipefail
cd "$(dirname "$0")/.."

# On a lent machine only a few files come back from $OUT: everything is written to a work
# folder and packed into $OUT/gpu_check.tar.gz after each step (a cut-off run keeps the rest).
PACK="${OUT:+$OUT/gpu_check.tar.gz}"
OUT_DIR="${OUT:+/tmp/gpu_check}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
PY="${PYTHON:-python3}"
status=0

# GPU_CHECK_STEPS picks the steps (the build always runs).
STEPS="${GPU_CHECK_STEPS:-test_gpu bench_gpu ncu bench_pipeline}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
DRY_FLAG=""
[ "$DRY" = 1 ] && DRY_FLAG="--dry-run"

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT_DIR/NAME.log, remember failures
  local name=$1 secs=$2
  shift 2
  if [ "$name" != build ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "=== $name: not in GPU_CHECK_STEPS, skipped"
    return 0
  fi
  echo "=== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUT_DIR/$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  [ -z "$PACK" ] || tar czf "$PACK" -C "$OUT_DIR" .
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# Carried wheels (pure Python, or manylinux for this Python) -> /tmp/site.
if compgen -G ".whl/*.whl" >/dev/null; then
  mkdir -p /tmp/site
  if ! "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl; then
    echo "pip unavailable or failed: unpacking the wheels instead"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' .whl/*.whl
  fi
  export PATH="/tmp/site/bin:$PATH"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import torch
try:
    import triton
except ImportError:
    class triton: __version__ = "missing"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
nvcc --version | tail -n 2

if [ "$DRY" = 1 ]; then
  echo "=== DRY RUN: no build; the benchmarks run on the CPU (Triton interpreted), timings meaningless"
  export TRITON_INTERPRET=1
else
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-8}"
  if ! step build 90 "$PY" setup.py build_ext --inplace; then
    echo "build failed: nothing else to check"
    exit 1
  fi
  # Compiled Triton on the GPU (tests/conftest.py would otherwise turn the interpreter on),
  # and a missing CUDA kernel is a failure, not a skip.
  export TRITON_INTERPRET=0 SAU_EXPECT_CUDA_BUILD=1
fi
have_pytest=0
"$PY" -c "import pytest" 2>/dev/null && have_pytest=1

if [ "$have_pytest" = 1 ]; then
  # One Triton window for the grid of cases (each would otherwise tune ~20 windows, a compile
  # each); test_triton_autotunes_windows_and_keeps_coverage_exact runs the autotuner itself.
  step test_gpu 120 env SAU_TRITON_WINDOW="${SAU_TRITON_WINDOW:-16x64a}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
else
  echo "pytest not importable (carry it in .whl/): GPU tests skipped; the benchmark still checks outputs"
  status=1
fi

step bench_gpu 110 "$PY" benchmarks/bench_repair_gpu.py $DRY_FLAG

if [ "$DRY" = 1 ]; then
  step ncu 60 "$PY" benchmarks/ncu_repair.py --dry-run
elif command -v ncu >/dev/null; then
  # Speed of light (DRAM throughput against the peak), the memory chart, occupancy and launch
  # stats of each repair kernel; the report file too, for ncu-ui. Counters may need
  # permissions a lent machine lacks (ERR_NVGPUCTRPERM): then the log says so and the step fails.
  export OUT_DIR PY
  step ncu 60 bash -c 'ncu --profile-from-start off --kernel-name regex:repair --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    -f -o "$OUT_DIR/ncu_repair" "$PY" benchmarks/ncu_repair.py \
    && ncu --import "$OUT_DIR/ncu_repair.ncu-rep" --page details | tee "$OUT_DIR/ncu_repair.txt"'
else
  echo "=== ncu: not on the PATH, skipped"
fi

if [ "$have_pytest" = 1 ]; then
  # The CPU grid itself is CI's job; here the rest of the repair tests and the CUDA emulation.
  step test_cpu 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_repair.py tests/test_cuda_emulation.py \
    -k "not cpp_matches_reference"
fi

if [ "$DRY" = 1 ]; then
  echo "=== pipeline steps: skipped in a dry run"
elif "$PY" -c "import diffusers" 2>/dev/null; then
  step bench_pipeline 200 "$PY" benchmarks/bench_pipeline.py --sd15 --device cuda --batches 1 4 \
    --repeats 2 --requests 8 --modes final per_step per_step_eps --out "$OUT_DIR/pipeline-sd15-cuda.json"
  # With torch.compile of the UNet the GPU is busier, so the triggered ratio may grow toward 2x
  # (on an H100 at batch 1 it stayed host-bound: 0.96x).
  # The warm-up calls compile (batch 2, then 4 for the twins); only the timed rounds count.
  step bench_pipeline_compile 300 "$PY" benchmarks/bench_pipeline.py --sd15 --device cuda --compile --batches 1 \
    --repeats 3 --modes final --sections latency --out "$OUT_DIR/pipeline-sd15-cuda-compile.json"
else
  echo "diffusers not importable (carry it in .whl/): pipeline benchmark skipped"
  status=1
fi

echo "=== gpu_check: $([ "$status" = 0 ] && echo PASS || echo FAIL); logs in $OUT_DIR"
exit "$status"
