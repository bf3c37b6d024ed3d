"""Which pipelines the defence has a plan for, and what each call argument means to the plan.

A pipeline call's arguments fall into a few kinds, and the planner (`planner.py`) treats
each kind the same way in every pipeline: text it screens and cuts the trigger from, tensors
with one row per prompt or per image that the twins extend, images that are shared by every
row or tiled over the rows, and arguments every row shares. An argument the plan cannot
honour (IP-Adapter images, the deprecated `callback`) is refused on every call, triggered or
not, so that a pipeline never works until an attacker arrives. A class not listed here, or a
subclass that overrides `__call__`, is refused by `patch()`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PipelineSpec", "spec_for", "UnsupportedPipelineError"]


class UnsupportedPipelineError(TypeError):
    """patch() has no plan for this pipeline class."""


@dataclass(frozen=True)
class PipelineSpec:
    text_fields: tuple[str, ...]  # screened per prompt; "prompt" first
    broadcast_text: frozenset  # text fields whose single string applies to every prompt
    prompt_tensors: tuple[str, ...]  # one row per prompt
    row_tensors: tuple[str, ...]  # one row per output image
    image_fields: tuple[str, ...]  # one image for every row, or k tiled over the rows (row r gets r % k)
    refused: frozenset  # arguments the defence cannot honour: refused whenever they are set
    per_step_eps: bool  # mode "per_step_eps" applies (the UNet takes no added conditioning)


_REFUSED = frozenset({"ip_adapter_image", "ip_adapter_image_embeds", "callback", "callback_steps"})

_SD = PipelineSpec(
    text_fields=("prompt", "negative_prompt"), broadcast_text=frozenset(),
    prompt_tensors=("negative_prompt_embeds",), row_tensors=("latents",), image_fields=(),
    refused=_REFUSED, per_step_eps=True)

_SPECS = {
    "StableDiffusionPipeline": _SD,
    "StableDiffusionImg2ImgPipeline": PipelineSpec(**{**_SD.__dict__, "row_tensors": (), "image_fields": ("image",)}),
    "StableDiffusionInpaintPipeline": PipelineSpec(
        **{**_SD.__dict__, "image_fields": ("image", "mask_image", "masked_image_latents")}),
    "StableDiffusionXLPipeline": PipelineSpec(
        text_fields=("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"),
        broadcast_text=frozenset({"negative_prompt", "negative_prompt_2"}),
        prompt_tensors=("negative_prompt_embeds", "negative_pooled_prompt_embeds"), row_tensors=("latents",),
        image_fields=(), refused=_REFUSED, per_step_eps=False),
}

SUPPORTED = tuple(_SPECS)


def spec_for(cls: type) -> PipelineSpec:
    """The plan's reading of `cls`'s call arguments; UnsupportedPipelineError if there is none."""
    import diffusers

    for name, spec in _SPECS.items():
        base = getattr(diffusers, name)
        if issubclass(cls, base):
            if cls.__call__ is not base.__call__:
                raise UnsupportedPipelineError(
                    f"{cls.__name__} overrides {name}.__call__, so the defence cannot know what its arguments "
                    f"mean: patch a {name}, or build one from this pipeline's components "
                    f"({name}.from_pipe(pipe))")
            return spec
    raise UnsupportedPipelineError(
        f"the defence has no plan for {cls.__name__}: it supports {', '.join(SUPPORTED)}. Build one of these "
        f"from the same components (e.g. StableDiffusionPipeline.from_pipe(pipe)) and patch that")
