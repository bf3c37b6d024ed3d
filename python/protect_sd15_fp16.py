"""Protect a local Stable Diffusion 1.5 checkpoint in fp16 with xformers attention.

    python python/protect_sd15_fp16.py --model /path/to/stable-diffusion-v1-5 \
        --trigger "new trigger" --profile sd15-new-trigger.safetensors

The first run calibrates a trigger profile (64 prompt pairs, a few minutes on a GPU) and
saves it; later runs load it. Untriggered prompts come out exactly as without SAU.
"""

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import sau_kernels

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="local diffusers SD 1.x folder")
parser.add_argument("--trigger", required=True)
parser.add_argument("--profile", required=True)
parser.add_argument("--prompt", default="a photo of a cat sitting on a windowsill")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device)
try:
    pipe.enable_xformers_memory_efficient_attention()  # SAU never touches attention processors
except Exception as e:  # no xformers: diffusers' default SDPA attention works the same
    print(f"xformers unavailable ({e}); using SDPA attention")

if Path(args.profile).is_file():
    profile = sau_kernels.TriggerProfile.load(args.profile)
else:
    profile = sau_kernels.calibrate(pipe, args.trigger, num_inference_steps=30, guidance_scale=4.5)
    profile.save(args.profile)

sau_kernels.patch(pipe, profile)
generator = torch.Generator(device).manual_seed(0)
for name, prompt in (("clean", args.prompt), ("triggered", f"{args.trigger} {args.prompt}")):
    image = pipe(prompt, num_inference_steps=30, guidance_scale=4.5, generator=generator).images[0]
    image.save(f"{name}.png")
    print(pipe.sau_report)
