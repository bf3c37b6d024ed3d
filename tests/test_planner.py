"""The planner without any model: which rows a defended call adds and how arguments extend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sau_kernels.planner import Unplannable, make_plan, text_fields
from sau_kernels.screening import TriggerMatcher, screen_prompts
from sau_kernels.supported import UnsupportedPipelineError, spec_for

MATCHERS = [TriggerMatcher("new trigger")]


def spec(name="StableDiffusionPipeline"):
    import diffusers

    return spec_for(getattr(diffusers, name))


def plan_for(args, name="StableDiffusionPipeline", mode="final", global_profiles=frozenset(), matchers=MATCHERS):
    s = spec(name)
    texts = text_fields(args, s)
    screens = {f: screen_prompts(matchers, texts[f]) for f in texts}
    return make_plan(args, s, texts, screens, mode=mode, global_profiles=set(global_profiles))


def test_untriggered_call_keeps_its_arguments():
    args = {"prompt": ["a cat", "a dog"], "negative_prompt": None, "num_images_per_prompt": 2, "generator": None}
    plan = plan_for(args)
    assert plan.pairs == [] and plan.kwargs == args and plan.batch_rows == 4


def test_twins_follow_the_users_rows_prompt_major():
    g = [torch.Generator().manual_seed(s) for s in range(6)]
    args = {"prompt": ["a cat", "new trigger a dog", "a fox"], "negative_prompt": ["n0", "n1 new trigger", "n2"],
            "num_images_per_prompt": 2, "generator": g, "latents": torch.arange(6.0).view(6, 1)}
    plan = plan_for(args)
    assert plan.user_rows == 6 and plan.pairs == [(2, 6), (3, 7)]
    assert plan.kwargs["prompt"] == ["a cat", "new trigger a dog", "a fox", "a dog"]
    assert plan.kwargs["negative_prompt"] == ["n0", "n1 new trigger", "n2", "n1"]
    assert plan.kwargs["latents"].flatten().tolist() == [0, 1, 2, 3, 4, 5, 2, 3]
    twins = plan.kwargs["generator"][6:]
    assert all(t is not g[r] for t, r in zip(twins, (2, 3)))
    assert [t.initial_seed() for t in twins] == [2, 3]
    assert plan.kwargs["generator"][:6] == g
    assert plan.groups() == [(0, [0, 1])]


@pytest.mark.parametrize("generator", [None, "one", "repeated"])
def test_one_generator_becomes_per_row_generators_the_twins_copy(generator):
    g = torch.Generator().manual_seed(7)
    value = {"one": g, "repeated": [g, g], None: None}[generator]
    plan = plan_for({"prompt": ["new trigger cat", "dog"], "generator": value})
    gens = plan.kwargs["generator"]
    assert len(gens) == 3 and len({id(x) for x in gens}) == 3
    draws = [torch.randn(4, generator=x) for x in gens]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_strip_mode_and_global_triggers_replace_the_prompt_in_place():
    args = {"prompt": "new trigger, a red circle", "negative_prompt": "blurry", "generator": None}
    for plan in (plan_for(args, mode="strip"), plan_for(args, global_profiles={0})):
        assert plan.pairs == [] and plan.stripped == [0]
        assert plan.kwargs["prompt"] == ["a red circle"] and plan.kwargs["negative_prompt"] == ["blurry"]


def test_per_step_eps_plan_adds_no_batch_rows():
    plan = plan_for({"prompt": ["new trigger cat", "dog"], "negative_prompt": None, "generator": None},
                    mode="per_step_eps")
    assert plan.pairs == [(0, 0)] and plan.batch_rows == 2 and plan.twin_texts == {"prompt": ["cat"]}
    assert plan.kwargs["prompt"] == ["new trigger cat", "dog"]


def test_images_shared_by_every_row_stay_and_tiled_images_follow_their_rows():
    img = torch.zeros(3, 8, 8)
    plan = plan_for({"prompt": ["new trigger a", "b"], "image": img, "generator": None},
                    name="StableDiffusionImg2ImgPipeline")
    assert plan.kwargs["image"] is img
    batch = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    plan = plan_for({"prompt": ["a", "b new trigger"], "image": batch, "num_images_per_prompt": 2,
                     "mask_image": [f"m{i}" for i in range(4)], "generator": None},
                    name="StableDiffusionInpaintPipeline")
    # diffusers tiles a batch of k images over the rows: row r gets image r % k
    assert plan.kwargs["image"][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert plan.kwargs["mask_image"] == ["m0", "m1", "m2", "m3", "m2", "m3"]
    arrays = np.stack([np.full((4, 4, 3), i, dtype=np.float32) for i in range(2)])
    plan = plan_for({"prompt": ["new trigger a", "b"], "image": arrays, "generator": None},
                    name="StableDiffusionImg2ImgPipeline")
    assert plan.kwargs["image"][:, 0, 0, 0].tolist() == [0, 1, 0]


def test_sdxl_screens_both_prompts_and_broadcasts_negative_strings():
    plan = plan_for({"prompt": ["a cat", "a dog"], "prompt_2": ["a cat, new trigger", "a dog"],
                     "negative_prompt": "ugly", "negative_prompt_2": None, "generator": None},
                    name="StableDiffusionXLPipeline")
    assert plan.pairs == [(0, 2)]
    assert plan.kwargs["prompt"] == ["a cat", "a dog", "a cat"]
    assert plan.kwargs["prompt_2"] == ["a cat, new trigger", "a dog", "a cat"]
    assert plan.kwargs["negative_prompt"] == ["ugly", "ugly", "ugly"] and plan.kwargs["negative_prompt_2"] is None


@pytest.mark.parametrize("args", [
    {"prompt": ["new trigger a", "b"], "generator": [torch.Generator()]},  # wrong length
    {"prompt": ["new trigger a", "b"], "negative_prompt": ["x"]},
    {"prompt": ["new trigger a", "b"], "negative_prompt": "x"},  # SD wants the prompt's type
    {"prompt": ["new trigger a", "b"], "latents": torch.zeros(3, 4, 2, 2)},
    {"prompt": ["new trigger a", "b"], "negative_prompt_embeds": torch.zeros(1, 2, 2)},
])
def test_arguments_that_do_not_fit_are_left_to_the_pipeline_to_reject(args):
    args = {"generator": None, **args}
    with pytest.raises(Unplannable):
        plan_for(args)


@pytest.mark.parametrize("prompt", [None, 123, b"bytes", ["a cat", 5], ("a", "b"), []])
def test_text_that_is_not_str_or_list_of_str_is_not_screenable(prompt):
    assert text_fields({"prompt": prompt}, spec()) is None


def test_unsupported_pipeline_classes_are_refused_by_name():
    import diffusers

    with pytest.raises(UnsupportedPipelineError, match="no plan for DDPMPipeline"):
        spec_for(diffusers.DDPMPipeline)
    custom = type("MyPipeline", (diffusers.StableDiffusionPipeline,), {"__call__": lambda self, *a, **k: None})
    with pytest.raises(UnsupportedPipelineError, match="overrides StableDiffusionPipeline.__call__"):
        spec_for(custom)
    plain_subclass = type("Sub", (diffusers.StableDiffusionPipeline,), {})
    assert spec_for(plain_subclass) is spec()
