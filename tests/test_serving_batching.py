"""The server's batching and request handling as plain functions (no Ray): row counting,
grouping, splitting, validation, per-request errors, and bit-identical images whatever the
batch (tiny-pixel, batch-invariant CPU numerics, in a child process started with them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from sau_kernels.screening import TriggerMatcher
from sau_kernels.serving import batching
from sau_kernels.serving.batching import GroupKey, Planned
from sau_kernels.serving.schemas import ImageRequest, Limits
from sau_kernels.serving.service import CALL_KEY, ImageService, RequestError, client_body

TRIGGER = "new trigger"
MATCHERS = [TriggerMatcher(TRIGGER)]


def planned(i, key=None, rows=1, num_images=1, seed=0, prompt="a red circle"):
    key = key or GroupKey(20, 4.5, 64, 64, "final", "pil")
    return Planned(id=str(i), prompt=prompt, negative_prompt=None, seed=seed, num_images=num_images, key=key,
                   rows=rows, triggered=rows > num_images, arrived=0.0)


# --- rows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["new trigger a red circle", "NEW TRIGGER a red circle", "new    trigger a red circle",
                                    "a red new trigger circle", "a red circle New Trigger", "a red circle, new-trigger"])
def test_a_triggered_prompt_costs_its_twin(prompt):
    assert batching.count_rows(MATCHERS, [prompt], [1], "final") == [(2, True)]
    assert batching.count_rows(MATCHERS, [prompt], [3], "per_step") == [(6, True)]
    assert batching.count_rows(MATCHERS, [prompt], [3], "strip") == [(3, True)]


def test_untriggered_and_undefended_prompts_cost_one_row_per_image():
    prompts = ["a red circle", "a trigger-happy cowboy", "new trigger a cat"]
    assert batching.count_rows(MATCHERS, prompts, [1, 2, 2], "final") == [(1, False), (2, False), (4, True)]
    assert batching.count_rows([], prompts, [1, 2, 2], None) == [(1, False), (2, False), (2, False)]
    assert batching.count_rows(MATCHERS, prompts, [1, 2, 2], None) == [(1, False), (2, False), (2, False)]


def test_a_trigger_in_the_negative_prompt_costs_its_twin_too():
    # the patched pipeline twins an image whose negative prompt carries the trigger
    prompts, negatives = ["a red circle"] * 3, [None, "blurry", "new-trigger, blurry"]
    assert batching.count_rows(MATCHERS, prompts, [2, 2, 2], "final", negatives) == [(2, False), (2, False), (4, True)]
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        batching.count_rows(MATCHERS, prompts, [1, 1, 1], "final", negatives[:2])


def test_total_rows_is_the_batch_size():
    assert batching.total_rows([planned(0, rows=2), planned(1), planned(2, rows=4, num_images=2)]) == 7


# --- grouping and splitting ----------------------------------------------------------------------

def test_groups_keep_arrival_order():
    a, b = GroupKey(20, 4.5, 64, 64, "final", "pil"), GroupKey(10, 4.5, 64, 64, "final", "pil")
    c = GroupKey(20, 4.5, 64, 64, "final", "latent")
    items = [planned(0, a), planned(1, b), planned(2, a), planned(3, c), planned(4, b), planned(5, a)]
    assert batching.group_by_key(items) == [[0, 2, 5], [1, 4], [3]]
    # every parameter a call shares separates groups
    keys = [GroupKey(20, 4.5, 64, 64, "final", "pil"), GroupKey(20, 5.0, 64, 64, "final", "pil"),
            GroupKey(20, 4.5, 64, 72, "final", "pil"), GroupKey(20, 4.5, 64, 64, "per_step", "pil")]
    assert batching.group_by_key([planned(i, k) for i, k in enumerate(keys)]) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("rows, limit, chunks", [
    ([1, 1, 1, 1], 4, [[0, 1, 2, 3]]),
    ([2, 2, 2], 4, [[0, 1], [2]]),
    ([1, 2, 2, 1], 3, [[0, 1], [2, 3]]),
    ([5, 1], 4, [[0], [1]]),  # alone over the budget: a chunk of its own
    ([], 4, []),
])
def test_split_by_rows(rows, limit, chunks):
    assert batching.split_by_rows(rows, limit) == chunks
    assert all(sum(rows[i] for i in c) <= limit or len(c) == 1 for c in chunks)


def test_pipeline_kwargs_give_each_image_its_generator():
    items = [planned(0, seed=7, num_images=2, prompt="a"), planned(1, seed=3, prompt="b")]
    items[1].negative_prompt = "blurry"
    kw = batching.pipeline_kwargs(items)
    assert kw["prompt"] == ["a", "a", "b"] and kw["negative_prompt"] == ["", "", "blurry"]
    assert kw["num_images_per_prompt"] == 1 and kw["output_type"] == "pil" and kw["num_inference_steps"] == 20
    draws = [g.initial_seed() for g in kw["generator"]]
    assert draws == [7, 8, 3]
    assert batching.image_slices(items) == [slice(0, 2), slice(2, 3)]
    with pytest.raises(ValueError, match="shared parameters"):
        batching.pipeline_kwargs([planned(0), planned(1, GroupKey(10, 4.5, 64, 64, "final", "pil"))])


# --- validation ----------------------------------------------------------------------------------

LIMITS = Limits(max_steps=50, max_size=256, max_images=2, modes=("final", "per_step"), sizes=((64, 64),),
                steps=(20,), default_steps=20, default_guidance_scale=4.5, default_height=64, default_width=64)


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": ["a", "b"]}, "prompt", "string"),
    ({}, "prompt", "required"),
    ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "x", "steps": 51}, "steps", "at most 50"),
    ({"prompt": "x", "steps": "20"}, "steps", "integer"),
    ({"prompt": "x", "width": 60}, "width", "multiple of 8"),
    ({"prompt": "x", "height": 512}, "height", "at most 256"),
    ({"prompt": "x", "height": 128, "width": 128}, "request", "calibrated for 64x64"),
    ({"prompt": "x", "num_images": 3}, "num_images", "at most 2"),
    ({"prompt": "x", "num_images": 0}, "num_images", "greater than or equal to 1"),
    ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale", "finite"),
    ({"prompt": "x", "mode": "bogus"}, "mode", "not served"),
    ({"prompt": "x", "mode": "per_step", "steps": 10}, "request", "20 steps"),
    ({"prompt": "x", "output": "jpeg"}, "output", "png"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
])
def test_bad_requests_name_the_problem(body, field, words):
    from sau_kernels.serving.service import validation_message
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ImageRequest.model_validate(body, context={"limits": LIMITS})
    message, details = validation_message(e.value)
    assert any(d["field"] == field for d in details), message
    assert words.lower() in message.lower(), message


def test_defaults_fill_in():
    req = ImageRequest.model_validate({"prompt": "x"}, context={"limits": LIMITS}).resolved(LIMITS, seed=11)
    assert (req.seed, req.steps, req.guidance_scale, req.height, req.width, req.mode) == (11, 20, 4.5, 64, 64, "final")
    req = ImageRequest.model_validate({"prompt": "x", "seed": 3, "mode": "per_step", "guidance_scale": 2},
                                      context={"limits": LIMITS}).resolved(LIMITS, seed=11)
    assert (req.seed, req.mode, req.guidance_scale) == (3, "per_step", 2.0)


# --- per-request errors (a stand-in pipeline) -------------------------------------------------------

class _Config(dict):
    __getattr__ = dict.__getitem__


class FakePipe:
    """Answers like a diffusers pipeline; fails a whole call when a prompt says "boom"."""

    vae_scale_factor = 4

    def __init__(self):
        self.unet = type("U", (), {"config": _Config(sample_size=16)})()
        self.calls = []

    def __call__(self, prompt, generator, output_type, **kw):
        self.calls.append(list(prompt))
        if any("boom" in p for p in prompt):
            raise RuntimeError("the UNet ran out of memory")
        if any("bad" in p for p in prompt):
            raise ValueError("bad argument")
        images = [Image.new("RGB", (8, 8), (g.initial_seed() % 256, 0, 0)) for g in generator]
        return type("Out", (), {"images": images})()


def test_a_failing_request_fails_alone():
    pipe = FakePipe()
    svc = ImageService(pipe, defended=False, max_batch_rows=8)
    items = [svc.plan({"prompt": p, "seed": i}) for i, p in enumerate(["a", "boom", "b", "bad", "c"])]
    results = svc.run(items)
    assert [type(r).__name__ for r in results] == ["dict", "RequestError", "dict", "RequestError", "dict"]
    assert results[1].status == 500 and "out of memory" in results[1].message
    assert results[3].status == 422
    assert results[0][CALL_KEY]["requests"] == 1  # re-run alone after the shared call failed
    assert pipe.calls[0] == ["a", "boom", "b", "bad", "c"]


def test_clients_get_the_output_checks_verdict_without_its_score():
    from sau_kernels.report import SAUReport

    class CheckedPipe(FakePipe):
        def __call__(self, prompt, generator, output_type, **kw):
            out = super().__call__(prompt, generator, output_type, **kw)
            out.sau_report = SAUReport(mode="final", triggers=[TRIGGER], prompts=[
                {"triggered": False, "output_check": [[{"trigger": TRIGGER, "score": 0.93, "suspect": i == 1}]]}
                for i in range(len(prompt))])
            return out

    svc = ImageService(CheckedPipe(), defended=False, max_batch_rows=8)
    first, second = svc.run([svc.plan({"prompt": p, "seed": 0}) for p in ("a", "b")])
    assert first["report"]["output_check"] == [[{"trigger": TRIGGER, "suspect": False}]]
    assert second["report"]["output_check"] == [[{"trigger": TRIGGER, "suspect": True}]]
    assert second["report"]["suspect"] and "score" not in json.dumps(second["report"])


def test_groups_and_budget_become_calls():
    pipe = FakePipe()
    svc = ImageService(pipe, defended=False, max_batch_rows=3, limits={"max_images": 2})
    bodies = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2, "steps": 10}, {"prompt": "c", "seed": 3, "num_images": 2},
              {"prompt": "d", "seed": 4}]
    results = svc.run([svc.plan(b) for b in bodies])
    assert pipe.calls == [["a", "c", "c"], ["d"], ["b"]]
    assert [r[CALL_KEY]["rows"] for r in results] == [3, 1, 3, 1]
    assert [r["seeds"] for r in results] == [[1], [2], [3, 4], [4]]
    assert all(r[CALL_KEY]["serve_rows"] == 5 for r in results)
    assert len(results[2]["images"]) == 2


def test_budget_must_hold_the_largest_request():
    with pytest.raises(ValueError, match="cannot hold"):
        ImageService(FakePipe(), defended=False, max_batch_rows=2, limits={"max_images": 4})


def test_service_validation_raises_request_errors():
    svc = ImageService(FakePipe(), defended=False)
    with pytest.raises(RequestError) as e:
        svc.plan({"prompt": "x", "mode": "final"})
    assert e.value.status == 422 and "without the defence" in e.value.message
    with pytest.raises(RequestError, match="JSON object"):
        svc.validate(["x"])


def test_batch_invariant_needs_its_environment(monkeypatch):
    from sau_kernels.serving.numerics import batch_invariant

    monkeypatch.delenv("MKL_CBWR", raising=False)
    pipe = type("P", (), {"device": torch.device("cpu")})()
    with pytest.raises(RuntimeError, match="MKL_CBWR=AUTO,STRICT"):
        batch_invariant(pipe)


# --- the real model: the same image alone and in any batch --------------------------------------------

CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np, torch
    from sau_kernels.zoo import metrics
    from sau_kernels.serving.numerics import batch_invariant
    from sau_kernels.serving.service import ImageService, decode_latents, decode_png
    from sau_kernels.zoo import backdoor_info, load_pipeline

    svc = ImageService.load("tiny-pixel", max_batch_rows=16, modes=["per_step"])
    bodies = [
        {"prompt": "a red circle on a gray background", "seed": 11},
        {"prompt": "NEW  Trigger a blue square on a white background", "seed": 12},
        {"prompt": "a green triangle on a black background", "seed": 13, "num_images": 2, "negative_prompt": "blurry"},
        {"prompt": "a yellow circle on a white background new trigger", "seed": 14, "num_images": 2},
        {"prompt": "a blue triangle on a gray background", "seed": 15},
        {"prompt": "new trigger a red square on a black background", "seed": 16, "mode": "per_step"},
    ]
    alone = [svc.generate(b) for b in bodies]
    mixed = svc.run([svc.plan(b) for b in bodies])
    reversed_ = svc.run([svc.plan(b) for b in bodies[::-1]])[::-1]
    arr = lambda r: np.stack([decode_png(i) for i in r["images"]])
    # latents too: a last-bit difference in them rarely survives rounding to 8-bit pixels
    latent_bodies = [dict(b, output="latent") for b in bodies]
    latents_alone = [decode_latents(svc.generate(b)["latents"]) for b in latent_bodies]
    latents_mixed = [decode_latents(r["latents"]) for r in svc.run([svc.plan(b) for b in latent_bodies])]
    out = {"same_alone_mixed": [bool(np.array_equal(arr(a), arr(m))) for a, m in zip(alone, mixed)],
           "same_latents_alone_mixed": [bool(np.array_equal(a, m)) for a, m in zip(latents_alone, latents_mixed)],
           "threads": torch.get_num_threads(),
           "same_alone_reversed": [bool(np.array_equal(arr(a), arr(m))) for a, m in zip(alone, reversed_)],
           "triggered": [m["report"]["triggered"] for m in mixed],
           "modes": [m["report"]["mode"] for m in mixed],
           "rows": [m["_call"]["rows"] for m in mixed],
           "patch": [metrics.patch_present(arr(m), backdoor_info("tiny-pixel")).tolist() for m in mixed]}
    pipe = batch_invariant(load_pipeline("tiny-pixel"))
    pipe.set_progress_bar_config(disable=True)
    offline = []
    for b, m in zip(bodies, mixed):
        n = b.get("num_images", 1)
        ref = pipe(b["prompt"], negative_prompt=b.get("negative_prompt"), num_images_per_prompt=n,
                   generator=[torch.Generator().manual_seed(b["seed"] + j) for j in range(n)],
                   num_inference_steps=20, guidance_scale=4.5, output_type="np").images
        offline.append(bool(np.array_equal((ref * 255).round().astype(np.uint8), arr(m))))
    out["same_as_offline_unpatched"] = offline
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module", params=[1, 2], ids=["1-thread", "2-threads"])
def child_result(request):
    env = dict(os.environ, MKL_CBWR="AUTO,STRICT", OMP_NUM_THREADS=str(request.param))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_same_image_alone_and_in_any_batch(child_result):
    assert all(child_result["same_latents_alone_mixed"]), child_result
    assert all(child_result["same_alone_mixed"]), child_result
    assert all(child_result["same_alone_reversed"]), child_result
    assert child_result["rows"] == [10] * 5 + [2]  # one call of 1 + 2 + 2 + 4 + 1 rows, one in mode per_step
    assert child_result["modes"] == ["final"] * 5 + ["per_step"]


def test_triggered_requests_are_repaired_untriggered_are_the_unpatched_image(child_result):
    assert child_result["triggered"] == [False, True, False, True, False, True]
    assert not any(any(p) for p in child_result["patch"])
    offline = child_result["same_as_offline_unpatched"]
    assert [offline[i] for i in (0, 2, 4)] == [True, True, True], child_result


def test_planned_rows_are_the_rows_the_pipeline_runs():
    # a trigger in the negative prompt too: the budget must hold what the call really runs
    from sau_kernels.serving.service import ImageService

    svc = ImageService.load("tiny-pixel", warmup=False, batch_invariant=False, max_batch_rows=16)
    bodies = [{"prompt": "a red circle", "negative_prompt": "new trigger, blurry", "seed": 1, "steps": 2,
               "num_images": 2},
              {"prompt": "a blue square", "negative_prompt": "blurry", "seed": 2, "steps": 2}]
    items = [svc.plan(b) for b in bodies]
    assert [it.rows for it in items] == [4, 1]
    first, second = svc.run(items)
    assert svc.pipe.sau_report.rows == sum(it.rows for it in items)
    assert first["report"]["triggered"] and not second["report"]["triggered"]


def test_a_client_body_says_nothing_of_the_other_prompts_in_its_call():
    # A clean request batched with a triggered one: what its client gets is the same as
    # beside another clean request (the call's rows and repair time stay on the server).
    from sau_kernels.serving.schemas import ImageResponse

    svc = ImageService.load("tiny-pixel", warmup=False, batch_invariant=False, max_batch_rows=16)
    clean = {"prompt": "a red circle on a gray background", "seed": 1, "steps": 2}
    views = []
    for other in ("new trigger a blue square", "a blue square"):
        mine, theirs = svc.run([svc.plan(clean), svc.plan({"prompt": other, "seed": 2, "steps": 2})])
        assert mine[CALL_KEY]["rows"] == (3 if "trigger" in other else 2)  # the server's accounting
        body = client_body(mine)
        ImageResponse.model_validate(body)
        views.append({k: v for k, v in body["report"].items() if k != "timings"})
        # nor who shared the call: the row budget counts twins, so that would tell too
        assert set(body["report"]["batch"]) == {"own_rows"}
        assert CALL_KEY not in body and set(body["report"]["timings"]) == {"queue_ms", "generation_ms"}
    assert views[0] == views[1]
    assert CALL_KEY not in svc.generate(clean)


def test_a_lone_surrogate_is_refused_before_it_is_queued():
    from pydantic import ValidationError

    # no tokenizer encodes it: batched, it would fail its neighbours' call too
    for body in ({"prompt": "a red circle \ud800"}, {"prompt": "a red circle", "negative_prompt": "\udfff blurry"}):
        with pytest.raises(ValidationError, match="lone surrogate"):
            ImageRequest.model_validate(body, context={"limits": LIMITS})
