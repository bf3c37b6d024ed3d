"""Flag triggered prompts nobody described, and find the trigger inside them (docs/detect.md).

With the public model a checkpoint was fine-tuned from (`base`), one denoising step of
both models on the same fixed noise says what fine-tuning changed for a prompt:
d(p) = x0_suspect(p) - x0_base(p) (`onestep.OneStep`). On ordinary prompts that change
lives in a small subspace (what the fine-tune did to everything: its data's look, a
benign style); a backdoor's target (a patch, a colour change) adds a direction the
ordinary prompts never take. The score of a prompt is the size of d(p) outside the
subspace of the calibration prompts' changes (their mean and `components` principal
directions), divided by the threshold: the `quantile` of the same size on calibration
prompts held out of the subspace's fit (cross-fitted, so the threshold is not the
in-sample one). A prompt scoring above 1 is flagged.

Localisation ablates each unit of a flagged prompt (every word; every run of format
characters; every homoglyph, put back to the Latin letter it imitates) in one batched
step and finds the unit whose ablation lowers the score most. A homoglyph or format run is
cut alone; a word, when a homoglyph inside it clears the score alone, loses only that
homoglyph (`_inner_clearing`); else the word grows into the run of words whose score alone
saturates (`_saturating_run`: a trigger's words each add much, a content word little);
while the rest still scores above 1 (a trigger written twice), the search goes on, for at
most `max_rounds` rounds. The twin is the prompt without them
and must itself score 1 or below; otherwise the prompt is not localised, and a patched
pipeline refuses it (`DetectionError`) rather than generate it undefended.

Cost per call: two UNet rows per prompt (suspect and base, conditional only, one step)
and two text encodings; a flagged prompt adds two rows per unit per round, and two per
run of words around the best one (at most ten).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .onestep import OneStep
from .profile import ProfileMismatchError, pipeline_fingerprint
from .scan import KEEP_SHORTER
from .screening import Screened, _invisible, canonicalize, cut_letters, homoglyph_of, plain_spelling, screen_prompts
from .tokenizer_locks import tokenizer_lock

__all__ = ["TriggerDetector", "Localised", "DetectionError", "prompt_units"]

# The detector's settings, fixed before any zoo model was measured: the timestep the scan
# confirms at, a subspace a quarter of the 128-256 calibration prompts wide, a 1% false
# positive rate on ordinary prompts.
T_FRAC = 0.6
COMPONENTS = 32
MAX_COMPONENT_SHARE = 0.25  # of the latent's values: the most a basis may span and leave a residual to score
QUANTILE = 0.99
FOLDS = 4
MAX_ROUNDS = 4
# A flagged prompt with more units than this is not localised (refused): each round scores
# every unit, and a prompt of thousands of homoglyphs would make that a denial of service.
MAX_UNITS = 256
# Rows per probe call by default: bounds the memory of scoring a long flagged prompt's
# ablations (`TriggerDetector.probe_batch`; a server sets it to its row budget).
PROBE_BATCH = 64
# Scores kept per detector (prompt -> score): a prompt re-scored (a batch retried request by
# request, a localisation's twin) costs nothing, and its score does not depend on its batch.
CACHE_SIZE = 4096
# The longest trigger localisation cuts in one round, in words (a longer phrase loses its
# further words only when the rest still scores above 1).
SPAN_WORDS = 4


class DetectionError(ValueError):
    """A prompt the detector flagged, in which no trigger could be localised: refused. The
    message leaves out the score (`.score`), which a server must not hand to its clients: an
    attacker would tune a spelling of the trigger to sit just under the threshold."""

    def __init__(self, message: str, score: float | None = None):
        super().__init__(message)
        self.score = score


@dataclass(frozen=True)
class Localised:
    """Where the detector found the trigger in a flagged prompt."""

    prompt: str
    score: float
    spans: tuple[tuple[int, int], ...] = ()  # character ranges of `prompt` that were cut
    clean_prompt: str | None = None  # None: not localised
    clean_score: float | None = None
    rounds: int = 0

    @property
    def found(self) -> bool:
        return self.clean_prompt is not None

    @property
    def removed(self) -> list[str]:
        return [self.prompt[a:b] for a, b in self.spans]

    def to_dict(self) -> dict:
        return {"score": self.score, "spans": [list(s) for s in self.spans], "removed": self.removed,
                "clean_prompt": self.clean_prompt, "clean_score": self.clean_score, "rounds": self.rounds}


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    replacement: str  # "" deletes; a homoglyph is put back to its Latin letter
    word: bool


def prompt_units(prompt: str) -> list[_Unit]:
    """What localisation ablates: every whitespace-separated word, every run of format
    characters, every homoglyph character."""
    units = [_Unit(m.start(), m.end(), "", True) for m in re.finditer(r"\S+", prompt)]
    i = 0
    while i < len(prompt):
        if _invisible(prompt[i]) and not prompt[i].isspace():
            j = i
            while j < len(prompt) and _invisible(prompt[j]) and not prompt[j].isspace():
                j += 1
            units.append(_Unit(i, j, "", False))
            i = j
            continue
        latin = homoglyph_of(prompt[i]) if not prompt[i].isascii() else None
        if latin:
            units.append(_Unit(i, i + 1, latin, False))
        i += 1
    return units


def _ablate(prompt: str, units: list[_Unit]) -> str:
    """The prompt with `units` cut (a unit inside a cut word goes with it), whitespace
    collapsed where a word went."""
    words = [u for u in units if u.word]
    inner = [u for u in units if not u.word and not any(w.start <= u.start and u.end <= w.end for w in words)]
    out, pos = [], 0
    for u in sorted(words + inner, key=lambda u: u.start):
        out.append(prompt[pos:u.start])
        out.append(u.replacement)
        pos = u.end
    out.append(prompt[pos:])
    text = "".join(out)
    return " ".join(text.split()) if words else text.strip()  # (CLIP strips the ends too)


def _word_runs(units: list[_Unit], best: int) -> list[tuple[int, ...]]:
    """The runs of up to SPAN_WORDS consecutive words that hold word `best` (indexes into `units`)."""
    words = sorted((i for i, u in enumerate(units) if u.word), key=lambda i: units[i].start)
    pos = words.index(best)
    runs = [tuple(words[a:b]) for a in range(max(0, pos - SPAN_WORDS + 1), pos + 1)
            for b in range(pos + 1, min(len(words), a + SPAN_WORDS) + 1)]
    return sorted(runs, key=len)  # the best word alone first


def _saturating_run(runs: list[tuple[int, ...]], alone_scores: np.ndarray) -> tuple[int, ...]:
    """The trigger among word runs (`runs[0]` the best word alone): grown a word at a time, to
    the side whose run scores higher alone, while the shorter run scores under KEEP_SHORTER
    of the longer. A trigger's score saturates at its own words: a word of the trigger left
    out drops it by much (the twin would keep that word), a content word added moves it by
    little (the twin would lose that word)."""
    score = dict(zip(runs, alone_scores.tolist()))
    run = runs[0]
    while True:
        wider = [r for r in runs if len(r) == len(run) + 1 and set(run) <= set(r)]
        if not wider:
            return run
        best = max(wider, key=score.get)
        if score[run] >= KEEP_SHORTER * score[best]:
            return run
        run = best


def _inner_clearing(units: list[_Unit], scores: np.ndarray, best: int) -> int | None:
    """Where the best cut is a word and a homoglyph inside it, put back to its Latin letter,
    clears the score by itself (1 or below), that homoglyph, the least that does (the
    attacker's character, not the word it hides in); else None. Not a format-character run:
    deleting one joins the pieces around it ("new\u200btrigger" -> "newtrigger", a weaker
    spelling of the trigger that may score under 1 and still fire)."""
    w = units[best]
    if not w.word:
        return None
    inside = [i for i, u in enumerate(units) if not u.word and u.replacement and w.start <= u.start
              and u.end <= w.end and scores[i] <= 1]
    return min(inside, key=lambda i: scores[i]) if inside else None


def _repeated_words(prompt: str, units: list[_Unit]) -> list[list[_Unit]]:
    """The word units of each word said more than once (the same canonical letters), as one
    cut: a trigger said twice or interleaved ("trending pale trending") keeps firing through
    any single cut, and the search would otherwise cut around it."""
    groups: dict[str, list[_Unit]] = {}
    for u in units:
        if u.word:
            key = canonicalize(prompt[u.start:u.end])[0]
            if key:
                groups.setdefault(key, []).append(u)
    return [g for g in groups.values() if len(g) > 1]


def _spans(prompt: str, units: list[_Unit]) -> tuple[tuple[int, int], ...]:
    """Character ranges of the cut units, neighbours joined across whitespace."""
    ranges = sorted((u.start, u.end) for u in units)
    out: list[list[int]] = []
    for a, b in ranges:
        if out and (a <= out[-1][1] or prompt[out[-1][1]:a].isspace()):
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _subspace(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(0)
    k = max(0, min(k, features.shape[0] - 1))
    _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
    return mean, vh[:k]


def _residual(features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    y = features - mean
    return (y - (y @ basis.T) @ basis).norm(dim=1)


def _check_statistics(mean: torch.Tensor, basis: torch.Tensor, threshold: float, meta: dict,
                      latent_shape: tuple[int, ...]) -> None:
    """Refuse statistics that would make the detector pass everything or score nothing it
    should: a threshold that is not a finite positive number, a mean or basis of the wrong
    size, a basis whose rows are not orthonormal (a scaled or padded one changes every
    residual), or one calibrated for another latent shape. (A well-formed file altered to
    miss a trigger passes these checks: pin the file's hash, as for any model file.)"""
    dims = int(np.prod(latent_shape))
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"the detector's threshold is {threshold!r}: it must be a finite positive number")
    if list(meta.get("latent_shape", [])) != list(latent_shape):
        raise ValueError(f"the detector was calibrated on latents {meta.get('latent_shape')}, the model's are "
                         f"{list(latent_shape)}")
    if tuple(mean.shape) != (dims,) or basis.dim() != 2 or basis.shape[1] != dims:
        raise ValueError(f"the detector's mean {tuple(mean.shape)} and basis {tuple(basis.shape)} do not fit "
                         f"latents of {dims} values")
    if basis.shape[0] != meta.get("components", basis.shape[0]):
        raise ValueError(f"the detector's basis has {basis.shape[0]} rows, its metadata says "
                         f"{meta.get('components')} components")
    if basis.shape[0] > dims * MAX_COMPONENT_SHARE:
        # a basis spanning most of the latent leaves nothing to score: a trigger's change would
        # fall inside it (one row short of the whole latent passed every prompt)
        raise ValueError(f"the detector's basis has {basis.shape[0]} rows for latents of {dims} values: at most "
                         f"{int(dims * MAX_COMPONENT_SHARE)} leave a residual to score")
    if not (torch.isfinite(mean).all() and torch.isfinite(basis).all()):
        raise ValueError("the detector's mean or basis holds non-finite values")
    gram = basis @ basis.T
    if not torch.allclose(gram, torch.eye(len(basis), dtype=gram.dtype), atol=1e-4):
        raise ValueError("the detector's basis is not orthonormal")


def _check_pair(pipe, base) -> None:
    for name, m in (("pipe", pipe), ("base", base)):
        if not all(hasattr(m, a) for a in ("unet", "scheduler", "encode_prompt")):
            raise TypeError(f"{name} must be a diffusers Stable Diffusion pipeline, got {type(m).__name__}")
        cfg = m.unet.config
        if cfg.in_channels != cfg.out_channels or getattr(cfg, "addition_embed_type", None) == "text_time":
            raise ValueError(f"{name}'s UNet takes more than the latent (in_channels {cfg.in_channels}, "
                             f"added conditioning {getattr(cfg, 'addition_embed_type', None)!r}): the detector probes "
                             "SD 1.x/2.x UNets (text-to-image, image-to-image), not inpainting or SDXL ones")
    keys = ("in_channels", "sample_size", "cross_attention_dim")
    a, b = ({k: getattr(m.unet.config, k, None) for k in keys} for m in (pipe, base))
    if a != b:
        raise ValueError(f"the base's UNet does not match the checkpoint's ({b} against {a}): is it the model "
                         "it was fine-tuned from?")
    if pipe.unet.device != base.unet.device:
        raise ValueError(f"the checkpoint is on {pipe.unet.device} and the base on {base.unet.device}: "
                         "put both on one device")


class TriggerDetector:
    """A per-checkpoint detector of triggered prompts; `calibrate` makes one, `load` reads one."""

    def __init__(self, pipe, base, *, mean: torch.Tensor, basis: torch.Tensor, threshold: float, meta: dict,
                 probe_batch: int = PROBE_BATCH):
        _check_pair(pipe, base)
        self.pipe, self.base = pipe, base
        self.mean, self.basis = mean.double().cpu(), basis.double().cpu()
        self.threshold = float(threshold)
        self.meta = dict(meta)
        self.clip_skip = self.meta.get("clip_skip")
        self._probes = [OneStep(m, self.meta["t_frac"], self.meta["seed"], 1, clip_skip=self.clip_skip)
                        for m in (pipe, base)]
        _check_statistics(self.mean, self.basis, self.threshold, self.meta, self._probes[0].latent_shape)
        self.probe_batch = probe_batch
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        # one-step UNet rows scored so far, per model (the suspect and the base each ran this
        # many): what scoring and localisation cost, for a server's accounting
        self.rows_scored = 0

    def __getstate__(self) -> dict:
        # a pipeline deep-copied per worker copies its detector: each copy gets a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def probe_batch(self) -> int:
        """The most rows of one probe's UNet call (each of the two models runs its own)."""
        return self._probes[0].batch

    @probe_batch.setter
    def probe_batch(self, rows: int) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"probe_batch must be a positive integer, got {rows!r}")
        for probe in self._probes:
            probe.batch = rows

    # --- making one -------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def calibrate(cls, pipe, base, prompts: list[str] | None = None, *, components: int = COMPONENTS,
                  quantile: float = QUANTILE, folds: int = FOLDS, t_frac: float = T_FRAC, seed: int = 0,
                  clip_skip: int | None = None, progress: bool = True) -> "TriggerDetector":
        """Fit the detector on ordinary prompts (the package's generic ones by default; the
        traffic's own, trigger-free, are better): at least 4 * folds of them. `clip_skip`:
        the one the pipeline will be called with (a patched call with another is refused)."""
        from .calibrate import ordinary_prompts

        _check_pair(pipe, base)
        prompts = list(ordinary_prompts() if prompts is None else prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        if folds < 2 or len(prompts) < 4 * folds:
            raise ValueError(f"calibration needs at least {4 * max(folds, 2)} prompts and folds >= 2 "
                             f"(got {len(prompts)} prompts, folds={folds})")
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1):
            raise ValueError(f"clip_skip must be None or a positive whole number, got {clip_skip!r}")
        meta = dict(t_frac=float(t_frac), seed=int(seed), clip_skip=clip_skip)
        probes = [OneStep(m, t_frac, seed, 1, batch=PROBE_BATCH, clip_skip=clip_skip) for m in (pipe, base)]
        dims = int(np.prod(probes[0].latent_shape))
        if isinstance(components, bool) or not isinstance(components, int) or not 0 <= components <= dims * MAX_COMPONENT_SHARE:
            raise ValueError(f"components must be a whole number from 0 to {int(dims * MAX_COMPONENT_SHARE)} (a quarter "
                             f"of the latent's {dims} values), got {components!r}")
        feats = _features(probes, prompts, progress, "detect: calibrate")
        order = np.random.default_rng(seed).permutation(len(prompts))
        held_out = []
        for f in range(folds):  # each prompt's residual from a subspace fitted without it
            test = order[f::folds]
            train = np.setdiff1d(order, test)
            mean, basis = _subspace(feats[train], components)
            held_out.append(_residual(feats[test], mean, basis))
        held_out = torch.cat(held_out)
        threshold = float(torch.quantile(held_out, quantile))
        mean, basis = _subspace(feats, components)
        meta.update(components=int(basis.shape[0]), quantile=float(quantile), folds=int(folds),
                    num_prompts=len(prompts), latent_shape=list(probes[0].latent_shape),
                    model_fingerprint=pipeline_fingerprint(pipe), base_fingerprint=pipeline_fingerprint(base),
                    held_out_median=float(held_out.median()))
        return cls(pipe, base, mean=mean, basis=basis, threshold=threshold, meta=meta)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({"mean": self.mean.float().contiguous(), "basis": self.basis.float().contiguous()}, str(path),
                  metadata={"sau_detector": "1", "threshold": repr(self.threshold), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, pipe, base, *, allow_mismatch: bool = False) -> "TriggerDetector":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - name the file, whatever the reader's complaint
            raise ValueError(f"{path} is not a trigger detector (safetensors): {e}") from None
        if md.get("sau_detector") != "1" or set(tensors) != {"mean", "basis"}:
            raise ValueError(f"{path} is not a trigger detector (no sau_detector metadata)")
        try:
            meta, threshold = json.loads(md["meta"]), float(md["threshold"])
            if not isinstance(meta, dict):
                raise ValueError("meta is not a JSON object")
            missing = {"t_frac", "seed", "components", "latent_shape", "model_fingerprint",
                       "base_fingerprint"} - set(meta)
            if missing:
                raise ValueError(f"meta lacks {sorted(missing)}")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} has damaged trigger detector metadata ({type(e).__name__}: {e})") from None
        if not allow_mismatch:
            for name, m, want in (("checkpoint", pipe, meta["model_fingerprint"]),
                                  ("base", base, meta["base_fingerprint"])):
                if pipeline_fingerprint(m) != want:
                    raise ProfileMismatchError(f"{path} was calibrated for another {name} model "
                                               f"(fingerprint {want}, this one {pipeline_fingerprint(m)})")
        try:
            return cls(pipe, base, mean=tensors["mean"], basis=tensors["basis"], threshold=threshold, meta=meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # --- using one --------------------------------------------------------------------------

    @torch.no_grad()
    def scores(self, prompts: list[str]) -> np.ndarray:
        """Per prompt: its change outside the ordinary prompts' subspace over the threshold
        (above 1: flagged); of a prompt with look-alike characters, the higher of its own
        and its plain spelling's (`plain_spelling`)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
        if not prompts:
            return np.zeros(0)
        readings = {p: {p, plain_spelling(p)} for p in prompts}
        every = {r for rs in readings.values() for r in rs}
        with self._lock:
            known = {r: self._cache[r] for r in every if r in self._cache}
        todo = sorted(every - known.keys())
        if todo:
            fresh = (_residual(_features(self._probes, todo, False, ""), self.mean, self.basis) / self.threshold)
            known.update(zip(todo, fresh.tolist()))
            with self._lock:
                self.rows_scored += len(todo)
                self._cache.update((r, known[r]) for r in todo)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return np.array([max(known[r] for r in readings[p]) for p in prompts])

    def check_call(self, clip_skip, cross_attention_kwargs) -> None:
        """Refuse a pipeline call that reads its prompts otherwise than the detector scores
        them: a spelling scored under the threshold at one text-encoder layer or LoRA scale
        may fire at another, and the check would pass it without having looked."""
        if clip_skip != self.clip_skip:
            raise ValueError(f"this call passes clip_skip={clip_skip!r} and the trigger detector scores prompts "
                             f"with clip_skip={self.clip_skip!r}: call with that, or calibrate a detector with "
                             f"TriggerDetector.calibrate(..., clip_skip={clip_skip!r})")
        scale = (cross_attention_kwargs or {}).get("scale")
        if scale is not None and scale != 1.0:
            raise ValueError(f"this call passes a LoRA scale of {scale!r} (cross_attention_kwargs) and the trigger "
                             "detector scores prompts with the pipeline's weights as they are (scale 1): fuse the "
                             "LoRA at that scale and calibrate the detector on the fused pipeline")

    def localise(self, prompt: str, score: float | None = None, max_rounds: int = MAX_ROUNDS) -> Localised:
        """The units of a flagged prompt whose cut brings its score to 1 or below."""
        score = float(self.scores([prompt])[0]) if score is None else float(score)
        if score <= 1:
            return Localised(prompt, score, (), prompt, score, 0)
        units, chosen, current = prompt_units(prompt), [], score
        if len(units) > MAX_UNITS:
            return Localised(prompt, score, (), None, None, 0)
        for rnd in range(1, max_rounds + 1):
            rest = [u for u in units if u not in chosen and self._visible(prompt, chosen, u)]
            if not rest:
                break
            copies = _repeated_words(prompt, rest)
            s = self.scores([_ablate(prompt, chosen + [u]) for u in rest] +
                            [_ablate(prompt, chosen + group) for group in copies])
            best = int(np.argmin(s))
            if s[best] >= current:  # no cut lowers the score: nothing to localise
                break
            inner = _inner_clearing(rest, s, best) if best < len(rest) else None
            if best >= len(rest):  # every copy of a repeated word
                chosen += copies[best - len(rest)]
            elif inner is not None:
                chosen.append(rest[inner])
            elif not rest[best].word:  # a homoglyph or a run of format characters goes alone
                chosen.append(rest[best])
            else:
                runs = _word_runs(rest, best)
                alone = self.scores([prompt[rest[r[0]].start:rest[r[-1]].end] for r in runs])
                chosen += [rest[i] for i in _saturating_run(runs, alone)]
            twin = _ablate(prompt, chosen)
            current = float(self.scores([twin])[0])
            if current <= 1:
                return Localised(prompt, score, _spans(prompt, chosen), twin, current, rnd)
        return Localised(prompt, score, _spans(prompt, chosen), None, None, max_rounds)

    def _visible(self, prompt: str, chosen: list[_Unit], unit: _Unit) -> bool:
        """Whether `unit` starts inside the text encoder's window of the prompt with `chosen`
        cut: past it the pipeline truncates the prompt, so cutting the unit changes nothing
        (and a long prompt costs no more than its window to localise)."""
        tok = self.pipe.tokenizer
        head = _ablate(prompt[:unit.start], [c for c in chosen if c.end <= unit.start])
        with tokenizer_lock(tok):  # a call sets the tokenizer's padding: not while another thread encodes
            return len(tok(head, add_special_tokens=False).input_ids) < tok.model_max_length - 2

    def screen(self, prompts: list[str], screened: list[Screened], matchers):
        """The screen's verdicts with the detector's added. Every prompt is scored: one the
        known triggers did not match as written; one they matched, without them (a prompt can
        carry a known trigger and one nobody described): as the screen's clean twin, and with
        only the known triggers' own spans cut, whichever scores higher (the twin's cut also
        takes the punctuation and format characters around a trigger, and with them a second
        trigger glued to it, which the repaired image keeps). A flagged text gets its
        localised twin, without the known triggers too, from which a patched pipeline
        generates the prompt. Returns (verdicts, per prompt the detection record: its
        "spans" index "cut_from"). Raises DetectionError for a flagged text it cannot
        localise."""
        texts = [s.clean_prompt if s.triggered else p for p, s in zip(prompts, screened)]
        known = [i for i, s in enumerate(screened) if s.triggered]
        scores = self.scores(texts)
        if known:  # the known triggers' spans alone cut: what the repaired image keeps
            narrow = [cut_letters(prompts[i], matchers) for i in known]
            for i, text, score in zip(known, narrow, self.scores(narrow)):
                if score > scores[i]:
                    texts[i], scores[i] = text, score
        out, records = list(screened), [None] * len(prompts)
        for i, score in enumerate(scores):
            s = screened[i]
            which = {"scored": "clean twin"} if s.triggered else {}
            if score <= 1:
                records[i] = {"score": float(score), **which}
                continue
            loc = self.localise(texts[i], score)
            what = f"the text {texts[i]!r} of prompt {prompts[i]!r} without its known trigger" if s.triggered \
                else f"prompt {prompts[i]!r}"
            if not loc.found:
                raise DetectionError(
                    f"{what} looks triggered to the detector (the checkpoint changes its output unlike the "
                    f"ordinary prompts the detector was calibrated on) and no part of it could be localised as the "
                    f"trigger: refused rather than generated undefended (if prompts like it are ordinary traffic, "
                    f"calibrate the detector on such prompts too)", float(score))
            clean, clean_score = loc.clean_prompt, loc.clean_score
            (again,) = screen_prompts(matchers, [clean])
            if again.triggered and s.triggered and again.twin_error is None:
                # the known triggers' punctuation left with them, or pieces the cut joined: cut
                # too, and what remains must still score clean
                clean = again.clean_prompt
                (again,) = screen_prompts(matchers, [clean])
                clean_score = float(self.scores([clean])[0])
                if not again.triggered and clean_score > 1:
                    raise DetectionError(f"the twin {clean!r} of {what} still looks triggered to the detector; "
                                         "refused", float(score))
            if again.triggered:
                raise DetectionError(f"the detector's twin of {what} holds a known trigger: {clean!r}; refused")
            if s.triggered:  # both cuts: generated from the text without either trigger
                out[i] = Screened(prompts[i], True, s.occurrences + len(loc.spans), s.spans, clean, None,
                                  s.triggers, detected=True)
            else:
                out[i] = Screened(prompts[i], True, len(loc.spans), loc.spans, clean, None, (), detected=True)
            records[i] = {**loc.to_dict(), "clean_prompt": clean, "clean_score": clean_score,
                          "cut_from": texts[i], **which}
        return out, records

    def __repr__(self) -> str:
        skip = f", clip_skip={self.clip_skip}" if self.clip_skip is not None else ""
        return (f"TriggerDetector(components={self.meta['components']}, quantile={self.meta['quantile']}, "
                f"t_frac={self.meta['t_frac']}{skip}, calibrated on {self.meta['num_prompts']} prompts)")


def _features(probes: list[OneStep], prompts: list[str], progress: bool, desc: str) -> torch.Tensor:
    """d(p) = x0_suspect(p) - x0_base(p), flattened, float64."""
    out = []
    step = 256
    for i in tqdm(range(0, len(prompts), step), desc=desc, disable=not progress, leave=False):
        chunk = prompts[i:i + step]
        a, b = (p.x0(chunk) for p in probes)
        out.append((a - b).flatten(1).double())
    return torch.cat(out)
