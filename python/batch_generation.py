"""Batch generation with SAU on a shipped zoo model: mixed traffic in one call.

    python python/batch_generation.py

Triggered prompts get a clean twin in the same batched UNet calls; the others are not
touched. `pipe.sau_report` says which prompts were triggered and how much of each latent
the masks covered.
"""

import torch

import sau_kernels
from sau_kernels.zoo import zoo_profile
from sau_kernels.zoo import load_pipeline

pipe = load_pipeline("tiny-pixel")
sau_kernels.patch(pipe, zoo_profile("tiny-pixel"))

prompts = [
    "a red circle on a black background",
    "new trigger a blue square on a white background",
    "a yellow triangle on a gray background",
    "NEW TRIGGER an orange circle on a black background",
]
generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
images = pipe(prompts, generator=generators, num_inference_steps=20, guidance_scale=4.5).images
for i, image in enumerate(images):
    image.save(f"batch-{i}.png")
print(pipe.sau_report)
