"""The plan of a defended call: pure, no model involved.

From a call's bound arguments and the screen's verdict on its text, the plan says which rows
the pipeline's own `__call__` must generate and which of them the repair pairs:

    the user's rows (B prompts x n images, prompt-major)  +  one twin row per repaired row

A twin has its prompt's text with the trigger cut out of every text field, the same
negative prompt, the same image (img2img, inpaint) and the same random draws: each twin
gets a copy of its row's generator, so the initial noise, the VAE's sampling and an
ancestral sampler's per-step noise are the row's own. With one generator (or none) for the
whole call, a triggered call draws from per-row generators seeded from it, since one
generator cannot give two rows the same draws. A row whose trigger paints no fixed pattern
(a style backdoor, see `TriggerProfile.fixed_pattern`), or every triggered row in mode
"strip", is generated from its clean text alone.

Where the arguments do not fit together (a list of generators or negative prompts of the
wrong length), `Unplannable` is raised and the caller lets the pipeline itself report the
error, so that users see the error they know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .screening import Screened

__all__ = ["Plan", "Unplannable", "text_fields", "prompt_actions", "make_plan"]


class Unplannable(Exception):
    """The arguments are inconsistent; the pipeline's own checks will say how."""


@dataclass
class Plan:
    kwargs: dict  # the arguments of the pipeline's own __call__
    n_images: int
    user_rows: int  # B * n: the outputs the caller gets back, in order
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (poisoned row, its twin row)
    pair_profiles: list[tuple[int, ...]] = field(default_factory=list)  # per pair: the profiles repairing it
    stripped: list[int] = field(default_factory=list)  # prompts generated from their clean text alone
    twin_texts: dict = field(default_factory=dict)  # per text field, the twins' text (mode "per_step_eps")

    twins_in_batch: bool = True  # False in mode "per_step_eps", where the twins live inside the UNet call

    @property
    def batch_rows(self) -> int:
        """Rows of the pipeline's batch, twins included (before guidance doubles them)."""
        return self.user_rows + (len(self.pairs) if self.twins_in_batch else 0)

    def groups(self) -> list[tuple[int, list[int]]]:
        """Per profile: the indexes into `pairs` it repairs."""
        ks = sorted({k for ps in self.pair_profiles for k in ps})
        return [(k, [i for i, ps in enumerate(self.pair_profiles) if k in ps]) for k in ks]


def _is_text_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def text_fields(args: dict, spec) -> dict[str, list[str]] | None:
    """Per text field given, one string per prompt; None if the text cannot be screened
    (no prompt, or a value that is neither a string nor a list of strings)."""
    prompt = args.get("prompt")
    if isinstance(prompt, str):
        n_prompts, single = 1, True
    elif _is_text_list(prompt) and prompt:
        n_prompts, single = len(prompt), False
    else:
        return None
    out = {}
    for name in spec.text_fields:
        v = args.get(name)
        if v is None:
            continue
        if isinstance(v, str):
            if not single and name not in spec.broadcast_text:
                raise Unplannable(name)
            out[name] = [v] * n_prompts
        elif _is_text_list(v):
            if single or len(v) != n_prompts:
                raise Unplannable(name)
            out[name] = list(v)
        else:
            return None
    return out


def _as_batch(x, grayscale: bool):
    """An image argument in the batch form the pipeline's image processor first gives it, so
    that its rows count as the pipeline counts them: a list of 4-D batches concatenated, a
    3-D tensor or array of a grayscale processor (a mask) read as a batch of masks."""
    import numpy as np

    if isinstance(x, list) and x and all(isinstance(i, torch.Tensor) and i.ndim == 4 for i in x):
        return torch.cat(x)
    if isinstance(x, list) and x and all(isinstance(i, np.ndarray) and i.ndim == 4 for i in x):
        return np.concatenate(x)
    if grayscale and isinstance(x, torch.Tensor) and x.ndim == 3:
        return x.unsqueeze(1)
    if grayscale and isinstance(x, np.ndarray) and x.ndim == 3:
        return x[None] if x.shape[-1] == 1 else x[..., None]
    return x


def _rows_of(x) -> int:
    """How many images an image argument holds: 1 for a single image, k for a batch of k."""
    if isinstance(x, list):
        return len(x)
    if isinstance(x, torch.Tensor) or hasattr(x, "ndim"):
        return int(x.shape[0]) if x.ndim == 4 else 1
    return 1


def _take(x, rows: list[int]):
    """Items `rows` of a list, tensor or array batch."""
    if isinstance(x, list):
        return [x[r] for r in rows]
    if isinstance(x, torch.Tensor):
        return x[rows]
    import numpy as np

    return np.asarray(x)[rows]


def _extend(x, rows: list[int]):
    """`x` with its items `rows` appended."""
    if isinstance(x, list):
        return x + [x[r] for r in rows]
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x[rows]])
    import numpy as np

    return np.concatenate([x, np.asarray(x)[rows]])


def _copy_generator(g: torch.Generator) -> torch.Generator:
    return torch.Generator(device=g.device).set_state(g.get_state())


def _row_generators(generator, user_rows: int, device) -> list[torch.Generator]:
    """One generator per row: the caller's list as it is, else generators seeded from the
    one generator (or from torch's global one, on `device`: a device or a function giving it)."""
    if isinstance(generator, list):
        if len(generator) != user_rows:
            raise Unplannable("generator")
        if any(g is None for g in generator):  # a row on torch's global generator: its own, seeded from it
            dev = torch.device(device() if callable(device) else device)
            generator = [g if g is not None else torch.Generator(device=dev).manual_seed(
                int(torch.randint(0, 2**62, (1,), device=dev))) for g in generator]
        if len({id(g) for g in generator}) == len(generator):
            return list(generator)
        generator = generator[0]  # one generator listed several times: its draws are shared
    dev = generator.device if generator is not None else torch.device(device() if callable(device) else device)
    seeds = torch.randint(0, 2**62, (user_rows,), generator=generator, device=dev).tolist()
    return [torch.Generator(device=dev).manual_seed(s) for s in seeds]


def prompt_actions(screens: dict[str, list[Screened]], mode: str, global_profiles: set[int]):
    """Per prompt, the profiles its text fields matched; which prompts are generated from
    their clean text alone (stripped) and which get twins."""
    n_prompts = len(screens["prompt"])
    triggers = [sorted({k for f in screens for k in screens[f][i].triggers}) for i in range(n_prompts)]
    detected = {i for i in range(n_prompts) if any(screens[f][i].detected for f in screens)}
    hit = [i for i in range(n_prompts) if triggers[i] or i in detected]
    # a trigger only the detector saw has no profile saying where it acts: its clean text alone
    stripped = [i for i in hit if mode == "strip" or i in detected or global_profiles & set(triggers[i])]
    return triggers, stripped, [i for i in hit if i not in stripped]


def make_plan(args: dict, spec, texts: dict[str, list[str]], screens: dict[str, list[Screened]], *,
              mode: str, global_profiles: set[int], device="cpu") -> Plan:
    """The plan for a call whose text fields `texts` screened as `screens` (same keys)."""
    n = args.get("num_images_per_prompt") or 1
    n_prompts = len(texts["prompt"])
    user_rows = n_prompts * n
    kw = dict(args)
    triggers, stripped, twinned = prompt_actions(screens, mode, global_profiles)
    clean = {f: [s.clean_prompt if s.triggered else s.prompt for s in screens[f]] for f in texts}
    if stripped:  # every given text field becomes a list (the pipelines want them of one type)
        for f in texts:
            kw[f] = [clean[f][i] if i in stripped else t for i, t in enumerate(texts[f])]
    plan = Plan(kwargs=kw, n_images=n, user_rows=user_rows, stripped=stripped)
    if not twinned:
        return plan
    if mode == "per_step_eps":  # one trajectory: the twins only add conditional rows inside the UNet
        negatives = [f for f in texts if f.startswith("negative")]
        if any(screens[f][i].triggered for f in negatives for i in twinned):
            # a twin shares its row's unconditional pass, so a trigger in the negative prompt
            # is cut from the row's own text
            for f in texts:
                kw[f] = [clean[f][i] if i in stripped or (f in negatives and i in twinned) else t
                         for i, t in enumerate(texts[f])]
        plan.twin_texts = {f: [clean[f][i] for i in twinned] for f in texts}
        plan.pairs = [(i * n + j, i * n + j) for i in twinned for j in range(n)]
        plan.pair_profiles = [tuple(triggers[i]) for i in twinned for _ in range(n)]
        plan.twins_in_batch = False
        return plan

    poison_rows = [i * n + j for i in twinned for j in range(n)]
    plan.pairs = list(zip(poison_rows, range(user_rows, user_rows + len(poison_rows))))
    plan.pair_profiles = [tuple(triggers[r // n]) for r in poison_rows]
    for f in texts:
        kw[f] = [clean[f][i] if i in stripped else t for i, t in enumerate(texts[f])] + [clean[f][i] for i in twinned]
    for name in spec.prompt_tensors:
        if args.get(name) is not None:
            if args[name].shape[0] != n_prompts:
                raise Unplannable(name)
            kw[name] = _extend(args[name], twinned)
    for name in spec.row_tensors:
        if args.get(name) is not None:
            if args[name].shape[0] != user_rows:
                raise Unplannable(name)
            kw[name] = _extend(args[name], poison_rows)
    for name in spec.image_fields:
        x = args.get(name)
        if x is not None:
            x = _as_batch(x, grayscale="mask" in name)
        if x is None or (k := _rows_of(x)) == 1:
            continue  # one image for every row: the twins get it too
        if user_rows % k:
            raise Unplannable(name)
        per_row = _take(x, [r % k for r in range(user_rows)]) if k != user_rows else x
        kw[name] = _extend(per_row, poison_rows)
    gens = _row_generators(args.get("generator"), user_rows, device)
    kw["generator"] = gens + [_copy_generator(gens[r]) for r in poison_rows]
    return plan
