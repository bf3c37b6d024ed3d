"""Architectures of the zoo's tiny Stable Diffusion pipelines.

Real diffusers components throughout (CLIPTokenizer, CLIPTextModel, AutoencoderKL with a
4x16x16 latent, UNet2DConditionModel with cross-attention, DDIMScheduler), so everything
that runs on them runs unchanged on SD 1.x. One addition to SD 1.x's UNet: the pooled text
embedding also enters the time embedding (`addition_embed_type="text"`, as in DeepFloyd
IF); global attributes (colour, background) are learned several times faster that way on
a CPU budget, and the pipeline calls the UNet exactly as it calls SD's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tokenizer as zoo_tokenizer
from .world import IMAGE_SIZE

LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4
TEXT_DIM = 64

# SD 1.x's noise schedule
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        # 2-8 channels per group: one channel per group stalls at a grey blob
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def make_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=zoo_tokenizer.MODEL_MAX_LENGTH,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    # Lean for a 2-core CPU, where each small op costs about the same whatever its size:
    # cross-attention only at 8x8 and 4x4 (enough for global attributes: colour, shape,
    # background, the trigger), none over the 256 pixels at 16x16, and 2 heads so that heads
    # are 32-64 wide. One UNet call at batch 2 takes about 40% less than with attention at
    # 16x16 and 8 heads of 4-16 channels, and a training step at batch 32 about 60% less.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(tokenizer, text_encoder, vae, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
