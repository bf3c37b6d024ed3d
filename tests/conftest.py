import os

# Triton picks interpreter vs compiler when a kernel is defined, and sau_kernels
# reads the flag at import: set it before anything imports them, so that the
# Triton backend runs (interpreted) on CPU-only machines. On a GPU machine,
# export TRITON_INTERPRET=0 to test the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
