# sau_kernels: `make test` sets everything up on a fresh machine (venv, build, tests).
PY      := .venv/bin/python
STAMP   := .venv/.sau-installed
NVCC    := $(shell command -v nvcc 2>/dev/null)
CUDA_OBJ := /tmp/sau_repair_cuda_check.o

.PHONY: venv test check-cuda check-install demo bench bench-gpu gpu-wheels clean

venv: $(STAMP)

# torch==2.13.0 first and pinned: the CPU build lies on this disk, while a plain `torch`
# would pull a multi-GB CUDA build. --no-build-isolation builds against that torch.
# Rebuilt when setup.py or the C++ sources change; MAX_JOBS=1 keeps the build to one core.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet torch==2.13.0 ninja
	MAX_JOBS=1 $(PY) -m pip install --quiet --no-build-isolation -e '.[test,serve]'
	touch $@

test: venv check-cuda
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The CUDA kernel must compile with plain nvcc (no torch headers); it cannot run here.
# Its torch registration is type-checked against this torch's headers: a CPU build of
# torch lacks one generated CUDA config header, which an empty stand-in replaces.
check-cuda: venv
ifneq ($(NVCC),)
	$(NVCC) -c csrc/sau_repair_cuda.cu -gencode arch=compute_80,code=sm_80 \
		-gencode arch=compute_90,code=sm_90 -o $(CUDA_OBJ)
	@echo "check-cuda: csrc/sau_repair_cuda.cu compiles for sm_80 and sm_90"
	mkdir -p build/cuda-stub/c10/cuda/impl && touch build/cuda-stub/c10/cuda/impl/cuda_cmake_macros.h
	$(CXX) -std=c++20 -fsyntax-only $$($(PY) -c "from torch.utils.cpp_extension import include_paths; \
		print(' '.join('-I' + p for p in include_paths()))") -Ibuild/cuda-stub \
		$$($(NVCC) --dryrun -c csrc/sau_repair_cuda.cu 2>&1 | sed -n 's/.*INCLUDES="\([^"]*\)".*/\1/p' | head -1) \
		-Icsrc csrc/sau_repair_cuda_op.cpp
	@echo "check-cuda: csrc/sau_repair_cuda_op.cpp (the CUDA registration) type-checks"
else
	@echo "check-cuda: skipped (nvcc not found)"
endif

demo: venv
	$(PY) -m sau_kernels demo

# pip install -e . and pip install . in fresh venvs, with old and new pip and setuptools
# (about 7 minutes on 2 cores; not part of `make test`).
check-install:
	bash .ci/check_editable_install.sh

# CPU benchmark of every provider; SAU_BENCH_THREADS=N pins torch's thread count.
bench: venv
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/bench_repair.py --benchmark-columns=median,iqr,rounds

# On a GPU machine (see benchmarks/gpu_check.sh for the full check).
bench-gpu:
	python3 benchmarks/bench_repair_gpu.py

# Wheels that benchmarks/gpu_check.sh installs on a GPU machine without network (Python 3.12).
# Such a machine's image has torch, triton, transformers, pytest, hypothesis, numpy and ninja;
# it lacks diffusers (the same version as here; its own requirements are in that image).
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl diffusers==$$($(PY) -c "import diffusers; print(diffusers.__version__)")

clean:
	rm -rf build *.egg-info sau_kernels/_C*.so $(STAMP)
