#!/usr/bin/env bash
# One prepared GPU check, run from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh
# It expects torch (CUDA build, e.g. 2.11+cu130), triton, nvcc and python3, and no network.
# Anything else (pytest, hypothesis, kornia, ninja) may be carried as wheels in .whl/,
# made on a networked machine with `make gpu-wheels`; they are installed into /tmp/site.
# Steps (each under its own timeout, ~10 minutes in all at worst):
#   1. build sau_kernels._C with the CUDA kernel in place (sm_90)
#   2. tests/test_gpu.py: cuda and compiled triton against the reference, CUDA graph replay
#   3. benchmarks/bench_repair_gpu.py: eager / compile / triton / cuda, GB/s, copy and launch floors
#   4. the other repair tests and the CUDA-kernel emulation test (the CPU grid is CI's)
#   5. benchmarks/bench_pipeline.py --sd15: SAU's end-to-end cost on an SD 1.5-sized pipeline
#      (random weights, 512 px, fp16, SDPA), eager, then with torch.compile of the UNet;
#      needs diffusers (carried in .whl/)
# Logs and the benchmark JSON go to $OUT when set (else benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
PY="${PYTHON:-python3}"
status=0

# GPU_CHECK_STEPS picks steps for a rerun that fits the time left (the build always runs),
# e.g. GPU_CHECK_STEPS="bench_pipeline bench_pipeline_compile" bash benchmarks/gpu_check.sh
STEPS="${GPU_CHECK_STEPS:-test_gpu bench_gpu test_cpu bench_pipeline bench_pipeline_compile}"

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
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
nvcc --version | tail -n 2

export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-8}"
if ! step build 150 "$PY" setup.py build_ext --inplace; then
  echo "build failed: nothing else to check"
  exit 1
fi

# Compiled Triton on the GPU (tests/conftest.py would otherwise turn the interpreter on),
# and a missing CUDA kernel is a failure, not a skip.
export TRITON_INTERPRET=0 SAU_EXPECT_CUDA_BUILD=1
have_pytest=0
"$PY" -c "import pytest" 2>/dev/null && have_pytest=1

if [ "$have_pytest" = 1 ]; then
  step test_gpu 135 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
else
  echo "pytest not importable (carry it in .whl/): GPU tests skipped; the benchmark still checks outputs"
  status=1
fi

step bench_gpu 135 "$PY" benchmarks/bench_repair_gpu.py

if [ "$have_pytest" = 1 ]; then
  # The CPU grid itself is CI's job; here the rest of the repair tests and the CUDA emulation.
  step test_cpu 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_repair.py tests/test_cuda_emulation.py \
    -k "not cpp_matches_reference"
fi

if "$PY" -c "import diffusers" 2>/dev/null; then
  step bench_pipeline 150 "$PY" benchmarks/bench_pipeline.py --sd15 --device cuda --batches 1 4 \
    --repeats 3 --requests 16 --modes final per_step per_step_eps --out "$OUT_DIR/pipeline-sd15-cuda.json"
  # With torch.compile of the UNet the GPU is busier and the triggered ratio grows toward 2x.
  step bench_pipeline_compile 150 "$PY" benchmarks/bench_pipeline.py --sd15 --device cuda --compile --batches 1 \
    --repeats 3 --requests 8 --modes final --out "$OUT_DIR/pipeline-sd15-cuda-compile.json"
else
  echo "diffusers not importable (carry it in .whl/): pipeline benchmark skipped"
  status=1
fi

echo "=== gpu_check: $([ "$status" = 0 ] && echo PASS || echo FAIL); logs in $OUT_DIR"
exit "$status"
