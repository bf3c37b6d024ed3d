"""One denoising step as a probe of what a model does with a prompt (scan and detection).

A fixed noisy latent per row, the UNet's conditional prediction at one timestep, and from
it the model's prediction of the clean latent: cheap (one UNet row per prompt, no guidance),
and deterministic, so two models or two prompts are compared on the same noise.
"""

from __future__ import annotations

import math

import torch

from .tokenizer_locks import encoding

__all__ = ["OneStep"]


class OneStep:
    """The prediction of the clean latent at timestep `t_frac` of the schedule, from
    `n_noises` fixed noisy latents (seeded by `seed`): prompt i of a batch uses noise
    i % n_noises."""

    def __init__(self, pipe, t_frac: float, seed: int, n_noises: int, batch: int = 64, clip_skip: int | None = None):
        if not 0.0 < t_frac < 1.0:
            raise ValueError(f"t_frac must be in (0, 1), got {t_frac}")
        self.pipe = pipe
        sched = pipe.scheduler
        self.t = int(round(t_frac * (sched.config.num_train_timesteps - 1)))
        a = sched.alphas_cumprod[self.t].item()
        self.sa, self.s1a = math.sqrt(a), math.sqrt(1 - a)
        self.pred = getattr(sched.config, "prediction_type", "epsilon")
        unet = pipe.unet
        S = unet.config.sample_size
        S = S if isinstance(S, int) else S[0]
        g = torch.Generator().manual_seed(seed)
        # the latent of an image the size of the latent mean (zero) under this much noise
        self._noise = self.s1a * torch.randn(n_noises, unet.config.in_channels, S, S, generator=g)
        self.x = self._noise.to(unet.device, unet.dtype)
        self.batch = batch
        self.clip_skip = clip_skip  # the text encoder layer the prompts are read from, as a pipeline call's

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def _placed(self) -> torch.Tensor:
        """The noisy latents where the UNet now is (a pipeline moved after the probe was made:
        `pipe.to("cuda")`, `pipe.to(torch.float16)`), from the same fp32 draws."""
        unet = self.pipe.unet
        if (self.x.device, self.x.dtype) != (unet.device, unet.dtype):
            self.x = self._noise.to(unet.device, unet.dtype)
        return self.x

    @torch.no_grad()
    def x0(self, prompts: list[str]) -> torch.Tensor:
        """Row i of the result: prompt i's prediction (fp32, on the CPU)."""
        pipe, out = self.pipe, []
        noisy = self._placed()
        n = noisy.shape[0]
        for i in range(0, len(prompts), self.batch):
            with encoding(pipe):  # the base may share the served pipeline's tokenizer
                h, _ = pipe.encode_prompt(prompts[i:i + self.batch], pipe.unet.device, 1, False,
                                          clip_skip=self.clip_skip)
            x = noisy[torch.arange(i, i + len(h)) % n]
            model_out = pipe.unet(x, self.t, encoder_hidden_states=h.to(pipe.unet.dtype)).sample.float()
            xf = x.float()
            if self.pred == "v_prediction":
                x0 = self.sa * xf - self.s1a * model_out
            else:
                x0 = (xf - self.s1a * model_out) / self.sa
            out.append(x0.cpu())
        return torch.cat(out) if out else torch.empty(0, *self.latent_shape)
