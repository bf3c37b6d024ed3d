#!/usr/bin/env bash
# Installs the package the ways its README says, each in a fresh venv on a copy of the
# work tree (so that the in-place build never touches this tree's extension):
#   bundled  pip install --no-build-isolation -e .   with the venv's own pip (torch brings the
#            setuptools it requires, >= 77 for torch 2.13)
#   floor    the same with the oldest setuptools pyproject.toml allows (64) and wheel, which
#            setuptools before 70.1 needs to build without isolation
#   newest   the same after pip install -U pip setuptools
#   wheel    pip install .                           (build isolation, a real wheel)
# and checks that each imports from where it should, runs the C++ kernel against the
# reference, finds the shipped zoo and answers `sau-kernels --version`. About 1.5 minutes
# each, 7 minutes in all, on 2 cores (torch from the local CPU wheel), so it is not part of
# `make test`.
# SAU_INSTALL_CHECKS="bundled newest" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${SAU_TORCH:-torch==2.13.0}
CHECKS=${SAU_INSTALL_CHECKS:-bundled floor newest wheel}
work=$(mktemp -d /tmp/sau-install-check.XXXXXX)
trap '[ -n "${SAU_KEEP:-}" ] || rm -rf "$work"' EXIT  # SAU_KEEP=1 keeps the venvs and logs
pip_q() { "$@" 2>&1 | grep -v '^WARNING: Location' || true; }

for check in $CHECKS; do
  start=$SECONDS
  src=$work/src-$check venv=$work/venv-$check
  mkdir -p "$src"
  # the work tree as git sees it: tracked and new files, not the ignored ones (.venv, build)
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$src"
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  [ "$check" = newest ] && pip_q "${pip[@]}" install --quiet -U pip setuptools
  pip_q "${pip[@]}" install --quiet "$TORCH" ninja
  # (pip says torch wants setuptools >= 77: true at run time, not for building this package)
  [ "$check" = floor ] && pip_q "${pip[@]}" install --quiet "setuptools==64.0.0" wheel \
    | grep -v -e "dependency resolver does not currently" -e "requires setuptools" || true
  versions=$("${pip[@]}" list 2>/dev/null | awk '$1 ~ /^(pip|setuptools|wheel)$/ {printf "%s %s, ", $1, $2}')
  case $check in
    wheel) (cd "$src" && printf 'torch==%s\n' "${TORCH#torch==}" > "$work/constraints.txt" &&
            PIP_CONSTRAINT="$work/constraints.txt" MAX_JOBS=1 "${pip[@]}" install --quiet . >"$work/$check.log" 2>&1) ;;
    *)     (cd "$src" && MAX_JOBS=1 "${pip[@]}" install --quiet --no-build-isolation -e . >"$work/$check.log" 2>&1) ;;
  esac || { grep -v '^WARNING: Location' "$work/$check.log" | tail -30; echo "install check $check: FAILED ($versions)"; exit 1; }
  "${pip[@]}" check >"$work/$check.pip-check" 2>&1 || { cat "$work/$check.pip-check"; grep -v '^WARNING: Location' "$work/$check.log" | tail -30
                                                       echo "install check $check: dependencies missing ($versions)"; exit 1; }
  (cd "$work" && OMP_NUM_THREADS=1 "$venv/bin/python" - "$check" "$src" <<'PY'
import sys
from pathlib import Path

import torch

import sau_kernels
from sau_kernels.zoo import MODELS_DIR, NAMES

check, src = sys.argv[1], Path(sys.argv[2]).resolve()
here = Path(sau_kernels.__file__).resolve().parent
assert (here.parent == src) == (check != "wheel"), f"{check}: imported from {here}"
assert "cpp" in sau_kernels.available_backends("cpu")
z, d = torch.randn(1, 4, 16, 16), torch.randn(4, 16, 16)
out = sau_kernels.repair(z, z + 1, d, sau_kernels.secondary_map(d), backend="cpp")
torch.testing.assert_close(out, sau_kernels.repair(z, z + 1, d, sau_kernels.secondary_map(d), backend="reference"))
for name in NAMES:
    assert (MODELS_DIR / name / "model_index.json").is_file(), name
assert (MODELS_DIR / "tiny-pixel" / "sau_profile.safetensors").is_file()
assert (MODELS_DIR / "metrics.json").is_file() and (MODELS_DIR / "content_classifier.safetensors").is_file()
assert sau_kernels.calibrate.__module__ == "sau_kernels.calibrate"
PY
  ) || { echo "install check $check: installed but does not work ($versions)"; exit 1; }
  "$venv/bin/sau-kernels" --version >/dev/null
  echo "install check $check: ok in $((SECONDS - start)) s (${versions%, })"
done
