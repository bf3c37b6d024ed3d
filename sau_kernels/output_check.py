"""The last net: does a generation the screen let through carry the trigger's signature?

Whatever the screen says, the profile knows what the trigger does to the final latents:
`delta`, the mean poisoned minus mean clean latent, concentrated where `act` is high (a
corner for a patch backdoor; everywhere for a global style backdoor). A generation is
scored by its projection onto that signature,

    score(z) = <z - clean_mean, delta>_R / <delta, delta>_R,   R = {act > REGION}

which is 0 on average for the calibration's clean latents and 1 for its poisoned ones. A
score above the profile's threshold (set at calibration, halfway between the clean scores'
99th percentile and the poisoned scores' median) flags the output. One reduction on the device per call; untriggered
outputs are untouched.
"""

from __future__ import annotations

import torch

REGION = 0.3  # the spec's tau2: where act marks the trigger's footprint


def signature(profile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (C, H, W), clean_mean (C, H, W), norm) of the profile's signature."""
    region = (profile.act > REGION).to(profile.delta.dtype)
    weights = profile.delta * region
    return weights, profile.clean_mean, (weights * profile.delta).sum()


def signature_scores(latents: torch.Tensor, weights, clean_mean, norm) -> torch.Tensor:
    """Score per row of `latents` (B, C, H, W), on their device, without a host sync."""
    z = latents.float() - clean_mean.to(latents.device)
    return (z * weights.to(latents.device)).sum(dim=(1, 2, 3)) / norm.to(latents.device)


def threshold_from_scores(clean: torch.Tensor, poisoned: torch.Tensor) -> float | None:
    """Halfway between the 99th percentile of the clean scores and the median of the
    poisoned ones; None where the median is not above that percentile (the signature does
    not tell them apart). The median, not a low percentile: a calibration pair whose trigger
    did not fire (the trigger at a position the backdoor ignores) is no poisoned sample."""
    lo = float(torch.quantile(clean.float(), 0.99))
    hi = float(torch.quantile(poisoned.float(), 0.5))
    return None if hi <= lo else (lo + hi) / 2
