"""Tiny diffusers pipelines for the engine's tests: the zoo's trained tiny-pixel and its
img2img and inpaint siblings (from_pipe), and a random-weight SDXL built from configs."""

from __future__ import annotations

import functools

import numpy as np
import torch

import sau_kernels

STEPS = 4
SCHEDULERS = {  # name -> (class name, config overrides)
    "ddim": ("DDIMScheduler", {}),
    "ddim-eta": ("DDIMScheduler", {}),  # called with eta=1
    "ddim-v": ("DDIMScheduler", {"prediction_type": "v_prediction"}),  # SD 2.x's parametrisation
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def zoo_pipe(kind: str = "txt2img", scheduler: str | None = None):
    """tiny-pixel as `kind` ("txt2img", "img2img", "inpaint"), a fresh object each time."""
    import diffusers

    from sau_kernels.zoo import load_pipeline

    pipe = load_pipeline("tiny-pixel")
    pipe.set_progress_bar_config(disable=True)
    if kind != "txt2img":
        cls = {"img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
        pipe = cls.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        name, extra = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    return pipe


@functools.lru_cache(maxsize=None)
def zoo_profile():
    from sau_kernels.zoo import zoo_profile as load

    return load("tiny-pixel", calibrate_if_missing=False)


def sdxl_pipe(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline with both text encoders, 16x16 latents."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sau_kernels.zoo import tokenizer as zoo_tokenizer

    torch.manual_seed(seed)
    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    zoo_tokenizer.save_tokenizer_files(tok_dir)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    V = len(tok)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=tok.model_max_length, projection_dim=32, bos_token_id=V - 2,
               eos_token_id=V - 1, pad_token_id=V - 1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synthetic_profile(pipe, trigger: str = "new trigger", steps: int = STEPS, seed: int = 0):
    """A profile of the pipeline's shapes with random statistics (the engine's tests check
    where and how the repair runs, not how well)."""
    from sau_kernels.profile import pipeline_fingerprint
    from sau_kernels.screening import trigger_token_ids

    vsf = pipe.vae_scale_factor
    S = (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size)
    C = pipe.vae.config.latent_channels
    assert S * vsf > 0
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(C, S, S, generator=g)
    return sau_kernels.TriggerProfile(
        delta=delta, act=sau_kernels.secondary_map(delta), trigger=trigger,
        trigger_ids=trigger_token_ids(pipe.tokenizer, trigger), fingerprint=pipeline_fingerprint(pipe),
        latent_shape=(C, S, S), scheduler=type(pipe.scheduler).__name__, num_inference_steps=steps, num_pairs=0,
        guidance_scale=4.5, params={"synthetic": True})


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def image_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n images in [0, 1], (n, 3, size, size)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def mask_batch(n: int, size: int) -> torch.Tensor:
    m = torch.zeros(n, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return m


def assert_same(a, b):
    a = a.images if hasattr(a, "images") else a
    b = b.images if hasattr(b, "images") else b
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs()
    assert torch.equal(a, b), f"{int((diff > 0).sum())} of {diff.numel()} elements differ, max {float(diff.max()):.3g}"
