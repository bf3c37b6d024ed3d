"""How requests become pipeline calls: plain functions, no Ray.

A Serve batch holds requests in arrival order, up to a budget of UNet rows. The rows a
request costs: one per image, and for a triggered prompt (or negative prompt) the clean twin's too (modes
"final", "per_step", "per_step_eps": 2 per image; "strip": 1). Requests that share what one
pipeline call must share (`GroupKey`: steps, guidance scale, size, mode, output type) run
in one call; each image is its own entry of the call's prompt list with its own
generator, so a request's images do not depend on what else is in the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..screening import TriggerMatcher, screen_prompts

# UNet rows per image of a triggered prompt, by defence mode (per CFG branch). per_step_eps
# adds only the twin's conditional rows (1.5x the UNet work); it is counted as 2, the
# memory its calls may need at most.
TRIGGERED_ROWS = {"final": 2, "per_step": 2, "per_step_eps": 2, "strip": 1}

__all__ = ["TRIGGERED_ROWS", "GroupKey", "Planned", "count_rows", "total_rows", "group_by_key", "split_by_rows",
           "pipeline_kwargs", "image_seeds"]


@dataclass(frozen=True)
class GroupKey:
    """What every request of one pipeline call must share."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    mode: str | None  # None: the model without the defence
    output_type: str  # "pil" or "latent"


@dataclass
class Planned:
    """A validated request with its defaults filled in, ready for a batch."""

    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    num_images: int
    key: GroupKey
    rows: int
    triggered: bool
    arrived: float  # time.monotonic() at the model replica
    output: str = "png"
    extra: dict = field(default_factory=dict)


def count_rows(matchers: Sequence[TriggerMatcher], prompts: Sequence[str], num_images: Sequence[int],
               mode: str | None, negative_prompts: Sequence[str | None] | None = None) -> list[tuple[int, bool]]:
    """(UNet rows, triggered) per prompt: what it will cost in a pipeline call.

    The one place the batch budget is computed: the screen here is the engine's own
    (`screen_prompts`), on the text fields the engine screens (a trigger in the negative
    prompt gets its image a twin too), so a prompt the patched pipeline will twin is
    counted twice."""
    if mode is None or not matchers:
        return [(n, False) for n in num_images]
    screened = screen_prompts(list(matchers), list(prompts))
    negatives = list(negative_prompts or [None] * len(screened))
    if len(negatives) != len(screened):
        raise ValueError(f"{len(negatives)} negative prompts for {len(screened)} prompts")
    negative_hit = [s.triggered for s in screen_prompts(list(matchers), [n or "" for n in negatives])]
    per_image = TRIGGERED_ROWS[mode]
    return [(n * per_image, True) if s.triggered or neg else (n, False)
            for s, neg, n in zip(screened, negative_hit, num_images)]


def total_rows(items: Sequence[Planned]) -> int:
    """`batch_size_fn` of the Serve batch: UNet rows, twins included."""
    return sum(it.rows for it in items)


def group_by_key(items: Sequence, key: Callable = lambda it: it.key) -> list[list[int]]:
    """Indices of `items` grouped by key: groups in order of first arrival, arrival order inside."""
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    return list(groups.values())


def split_by_rows(rows: Sequence[int], max_rows: int) -> list[list[int]]:
    """Consecutive chunks of indices whose rows add up to at most `max_rows` (a request
    alone over the budget gets a chunk of its own)."""
    chunks, current, used = [], [], 0
    for i, r in enumerate(rows):
        if current and used + r > max_rows:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += r
    if current:
        chunks.append(current)
    return chunks


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Image j of a request uses seed + j (as offline with generator=[Generator().manual_seed(seed + j) ...])."""
    return [seed + j for j in range(num_images)]


def pipeline_kwargs(items: Sequence[Planned]) -> dict:
    """One pipeline call for requests of one group: each image its own prompt entry and
    CPU generator (num_images_per_prompt=1; diffusers draws the noise on the CPU and moves
    it, so a seed gives the same noise on every device), negative prompts as a list ("" for
    none, which is what diffusers uses for no negative prompt)."""
    keys = {it.key for it in items}
    if len(keys) != 1:
        raise ValueError(f"one pipeline call needs one set of shared parameters, got {len(keys)}")
    key = keys.pop()
    prompts, negatives, generators = [], [], []
    for it in items:
        for s in image_seeds(it.seed, it.num_images):
            prompts.append(it.prompt)
            negatives.append(it.negative_prompt or "")
            generators.append(torch.Generator().manual_seed(s))
    return dict(prompt=prompts, negative_prompt=negatives, generator=generators, num_images_per_prompt=1,
                num_inference_steps=key.steps, guidance_scale=key.guidance_scale, height=key.height,
                width=key.width, output_type=key.output_type)


def image_slices(items: Sequence[Planned]) -> list[slice]:
    """Which entries of the call's outputs belong to each request."""
    out, start = [], 0
    for it in items:
        out.append(slice(start, start + it.num_images))
        start += it.num_images
    return out
