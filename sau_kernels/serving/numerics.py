"""Batch-invariant CPU numerics: an image depends on its request, not on its batch.

A server batches requests, so one request's image is computed alongside whatever else
arrived with it. With PyTorch's default CPU kernels a row's result depends, in its last
bits, on the batch it ran in (measured on torch 2.13, MKL 2024.2, oneDNN 3.12):

- MKL's sgemm takes another code path for matrices of 5 rows or fewer, and even in its
  strict reproducible mode for 3 rows or fewer: a lone image's timestep embedding (two
  rows under classifier-free guidance) comes out a last bit off the same embedding in a
  batch, and the whole denoising loop with it;
- torch runs a 1x1 convolution on oneDNN from 16 images up (or with several threads) and
  on its native kernel below, and a 3x3 convolution of one small image always natively;
- a lone image's tensors after the VAE's attention block have an ambiguous memory
  format (channels-last strides with a size-1 batch), and the next group norm and
  convolution pick another kernel for them than for the same image inside a batch.

`batch_invariant(pipe)` removes each of these: MKL in its strict reproducible mode
(`MKL_CBWR=AUTO,STRICT`, read when MKL starts, so it must be in the process environment
before torch runs its first matrix product: `BATCH_INVARIANT_ENV`), every linear layer
on at least `MIN_GEMM_ROWS` rows (zero rows added, then dropped), every 1x1 convolution
on torch's native kernel (one image at a time, whatever the batch), the VAE decode on
the native kernels with contiguous attention outputs. 3x3 convolutions of the UNet stay
on oneDNN, which gives each image the same result in any batch of two rows or more: the
UNet always sees two rows per image under classifier-free guidance. (Without guidance,
guidance_scale <= 1, a lone single-image call would be the exception.)

Measured on the zoo's tiny-pixel (one thread, 16 images in one call): about 12% slower
than the default kernels at 16 images, the same at one, and every image's latents
bit-identical whatever its batch, with one or two threads (tests/test_serving_batching.py).
Eager mode only (the switches are process-wide flags, around each call); nothing of this
applies on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BATCH_INVARIANT_ENV = {"MKL_CBWR": "AUTO,STRICT"}
# sgemm in strict mode gives every row the result it has in any larger matrix from 4 rows
# up, and another below (measured for 1-5000 rows, K 32-768, N 3-1280, 1 and 2 threads)
MIN_GEMM_ROWS = 4

__all__ = ["BATCH_INVARIANT_ENV", "MIN_GEMM_ROWS", "batch_invariant", "is_batch_invariant"]


def _env_ready() -> bool:
    return all(os.environ.get(k) == v for k, v in BATCH_INVARIANT_ENV.items())


def is_batch_invariant(pipe) -> bool:
    return getattr(pipe, "_sau_batch_invariant", False)


def batch_invariant(pipe, *, threads: int | None = None):
    """Make `pipe`'s CPU generation independent of the batch an image is in; returns
    `pipe` (its modules changed in place; patching it with the defence is unaffected).
    `threads` sets torch's thread count for the process. Raises if the process was
    started without `BATCH_INVARIANT_ENV`, since MKL reads it only at start."""
    if pipe.device.type != "cpu":
        raise ValueError(f"batch_invariant() is for CPU pipelines; this one is on {pipe.device}")
    if not _env_ready():
        want = " ".join(f"{k}={v}" for k, v in BATCH_INVARIANT_ENV.items())
        raise RuntimeError(f"batch-invariant numerics need {want} in the environment before the process starts "
                           "(MKL reads it once); start the process with it, or pass batch_invariant=False")
    if threads is not None:
        torch.set_num_threads(threads)
    if is_batch_invariant(pipe):
        return pipe
    from diffusers.models.attention_processor import Attention

    for model in _models(pipe):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = _with_min_rows(module.forward)
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
                module.forward = _natively(module.forward)
    for module in pipe.vae.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(_contiguous_output)
    pipe.vae.decode = _natively(pipe.vae.decode)
    pipe._sau_batch_invariant = True
    return pipe


def _models(pipe):
    names = ("text_encoder", "text_encoder_2", "unet", "vae")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def _with_min_rows(forward):
    """A linear layer's forward on at least MIN_GEMM_ROWS rows: fewer get zero rows below,
    dropped from the result (each row's result does not depend on the others)."""
    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if x.device.type != "cpu" or rows == 0 or rows >= MIN_GEMM_ROWS:
            return forward(x, *args, **kwargs)
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(MIN_GEMM_ROWS - rows, flat.shape[-1])])
        out = forward(padded, *args, **kwargs)[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


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


def _natively(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _native_convolutions():
            return fn(*args, **kwargs)

    return run


def _contiguous_output(module, args, output):
    if isinstance(output, torch.Tensor) and output.dim() == 4:
        return output.contiguous()
    return None
