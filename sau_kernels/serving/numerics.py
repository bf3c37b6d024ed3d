"""Batch-invariant CPU numerics: an image depends on its request, not on its batch.

A server batches requests, so one request's image is computed alongside whatever else
arrived with it. With PyTorch's default CPU kernels a row's result depends, in its last
bits, on the batch it ran in (measured on torch 2.13, MKL 2024.2, oneDNN 3.12):

- MKL's sgemm takes another code path for matrices of 5 rows or fewer;
- a 1x1 convolution runs on oneDNN from 16 images up, on the native kernel below that,
  when torch uses one thread; a 3x3 convolution of one small image, always native;
- a lone image's tensors after the VAE's attention block have an ambiguous memory
  format (channels-last strides with a size-1 batch), and the next group norm and
  convolution pick another kernel for them than for the same image inside a batch.

`batch_invariant(pipe)` removes each of these: MKL in its strict reproducible mode
(`MKL_CBWR=AUTO,STRICT`, read when MKL starts, so it must be in the process environment
before torch runs its first matrix product: `BATCH_INVARIANT_ENV`), at least two torch
threads (oneDNN for every 1x1 convolution), the VAE decode on the native kernels with
contiguous attention outputs. Measured on the zoo's tiny-pixel (2 threads, 16 images in
one call): about 10% slower than the default kernels, and every image bit-identical
whatever its batch (1 to 16 images, tests/test_serving_batching.py). Nothing of this
applies on CUDA, whose kernels make no such promise either.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BATCH_INVARIANT_ENV = {"MKL_CBWR": "AUTO,STRICT"}

__all__ = ["BATCH_INVARIANT_ENV", "batch_invariant", "is_batch_invariant"]


def _env_ready() -> bool:
    return all(os.environ.get(k) == v for k, v in BATCH_INVARIANT_ENV.items())


def is_batch_invariant(pipe) -> bool:
    return getattr(pipe.vae, "_sau_batch_invariant", False)


def batch_invariant(pipe, *, threads: int = 2):
    """Make `pipe`'s CPU generation independent of the batch an image is in; returns
    `pipe`. Sets torch's thread count for the process (at least 2). Raises if the process
    was started without `BATCH_INVARIANT_ENV`, since MKL reads it only at start."""
    if pipe.device.type != "cpu":
        raise ValueError(f"batch_invariant() is for CPU pipelines; this one is on {pipe.device}")
    if not _env_ready():
        want = " ".join(f"{k}={v}" for k, v in BATCH_INVARIANT_ENV.items())
        raise RuntimeError(f"batch-invariant numerics need {want} in the environment before the process starts "
                           "(MKL reads it once); start the process with it, or pass batch_invariant=False")
    if threads < 2:
        raise ValueError("batch_invariant() needs at least 2 torch threads: with one, torch runs 1x1 convolutions "
                         "on another kernel below 16 images than from 16 up")
    torch.set_num_threads(threads)
    vae = pipe.vae
    if is_batch_invariant(pipe):
        return pipe
    from diffusers.models.attention_processor import Attention

    for module in vae.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(_contiguous_output)
    decode = vae.decode

    @functools.wraps(decode)
    def native_decode(*args, **kwargs):
        with _native_convolutions():
            return decode(*args, **kwargs)

    vae.decode = native_decode
    vae._sau_batch_invariant = True
    return pipe


@contextlib.contextmanager
def _native_convolutions():
    """oneDNN and NNPACK off for the block (torch.backends.mkldnn.flags would also reset
    the TF32 settings, with a warning)."""
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn


def _contiguous_output(module, args, output):
    if isinstance(output, torch.Tensor) and output.dim() == 4:
        return output.contiguous()
    return None
