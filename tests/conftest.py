import os

import pytest

# Triton picks interpreter vs compiler when a kernel is defined, and sau_kernels
# reads the flag at import: set it before anything imports them, so that the
# Triton backend runs (interpreted) on CPU-only machines. On a GPU machine,
# export TRITON_INTERPRET=0 to test the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def base():
    """The zoo's public base model (tiny-clean), loaded once per test module."""
    from sau_kernels.zoo import load_pipeline

    return load_pipeline("tiny-clean")


@pytest.fixture(scope="module")
def pixel():
    """The zoo's pixel backdoor (tiny-pixel), fine-tuned from `base`, loaded once per test module."""
    from sau_kernels.zoo import load_pipeline

    return load_pipeline("tiny-pixel")
