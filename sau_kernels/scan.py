"""Scan a checkpoint for the trigger of a backdoor, without being told it (docs/scan.md).

With the public model it was fine-tuned from (`base`), two stages:

1. **Search, text side.** What fine-tuning changed is read where the UNet reads text: for a
   token sequence, the cross-attention keys and values of its last token, fine-tuned
   against base (`_TextChange`: both text encoders, both UNets' `to_k`/`to_v`). A beam
   search grows sequences token by token from the start of the prompt, keeping those whose
   keys and values moved most; every pair of the most moved single tokens is ranked beside
   it (two words moved little alone); every format character and homoglyph joins them.
2. **Confirmation, behaviour.** The best candidates of each length are inserted into
   ordinary prompts (before, after, inside; a homoglyph in place of its letter), and one
   denoising step of both models says how far the candidate moves the fine-tuned model's
   prediction beyond what it does to the base's (`onestep.OneStep`). Random strings of
   ordinary tokens, measured the same way, are the null: a candidate is a trigger when its
   robust z-score against them is at least `Z_TRIGGER`; variants of one trigger collapse
   into it (`_minimal`).

Without `base` there is no scan yet: `scan` refuses (docs/scan.md says why and what was
measured), rather than return a verdict it cannot back.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibrate import default_positions, ordinary_prompts, poisoned_prompt
from .onestep import OneStep
from .screening import homoglyph_of

__all__ = ["scan", "ScanReport", "Candidate", "Z_TRIGGER"]

# A candidate is reported as a trigger when its behavioural effect is this many robust
# standard deviations (1.4826 MAD) above the null strings' median. Chosen before any zoo
# model was scanned, as a level that a Gaussian null would pass once in 10^9 draws.
Z_TRIGGER = 6.0
# ... and its effect (what the fine-tuning added to the change the insertion makes, in units
# of the spread between two different ordinary prompts' predictions) at least this: a
# quarter of what changing the prompt does. Set after scanning tiny-pixel against tiny-clean
# alone: strings there that paint its patch in full generations measured 0.29 ("white",
# which fires 38% of the time) to 0.54 ("new trigger"), strings that do not ("and", a Greek
# letter) 0.11-0.13. The other models were scanned with it fixed.
MIN_EFFECT = 0.25
# The format characters attackers use (BadT2I's U+200B and its relatives).
FORMAT_CHARACTERS = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u2061")


def _homoglyphs() -> list[str]:
    """Every Greek and Cyrillic letter that the screen reads as a Latin one."""
    return [chr(c) for c in range(0x0370, 0x0500) if homoglyph_of(chr(c))]


@dataclass
class Candidate:
    text: str
    tokens: list[str]
    search_z: float | None  # text-side change against the other sequences of its length (None: not searched)
    effect: float | None = None  # behavioural effect (fine-tuned beyond base), in units of content spread
    consistency: float | None = None  # |mean change| / mean |change| over prompts: 1 for a fixed pattern
    z: float | None = None  # effect against the null strings
    trigger: bool = False
    source: str = "search"  # "search", "format character" or "homoglyph"


@dataclass
class ScanReport:
    """What `scan` found. `triggers`: the confirmed trigger strings, strongest first (empty
    when no backdoor was found); `candidates`: everything confirmed behaviourally, ranked."""
    triggers: list[str]
    candidates: list[Candidate]
    verdict: str
    null_effects: list[float]
    threshold_z: float
    seconds: float
    settings: dict = field(default_factory=dict)
    mean_effects: dict = field(default_factory=dict, repr=False)  # text -> (C, H, W) mean change, for pictures

    @property
    def found(self) -> bool:
        return bool(self.triggers)

    def top(self, k: int = 5) -> list[str]:
        return [c.text for c in self.candidates[:k]]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "mean_effects"}
        d["candidates"] = [asdict(c) for c in self.candidates]
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScanReport":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            d["candidates"] = [Candidate(**c) for c in d["candidates"]]
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path} is not a scan report saved by ScanReport.save ({type(e).__name__}: {e})") from None

    def picture(self, path: str | Path, k: int = 6) -> Path:
        """A PNG of the mean latent change of the top `k` candidates (channel norm per pixel)."""
        from PIL import Image, ImageDraw

        shown = [c for c in self.candidates[:k] if c.text in self.mean_effects]
        if not shown:
            raise ValueError("this report holds no mean effects to draw (a report loaded from JSON has none)")
        cell, pad = 128, 24
        img = Image.new("RGB", (len(shown) * (cell + 8) + 8, cell + 2 * pad), "white")
        draw = ImageDraw.Draw(img)
        for i, c in enumerate(shown):
            m = torch.as_tensor(self.mean_effects[c.text]).float().norm(dim=0)
            m = (m / m.max().clamp_min(1e-12) * 255).byte().numpy()
            tile = Image.fromarray(m, "L").resize((cell, cell), Image.NEAREST).convert("RGB")
            x = 8 + i * (cell + 8)
            img.paste(tile, (x, pad))
            draw.text((x, 4), repr(c.text)[:18], fill="black")
            draw.text((x, pad + cell + 4), f"z={c.z:.1f}" + (" trigger" if c.trigger else ""),
                      fill="red" if c.trigger else "black")
        img.save(path)
        return Path(path)

    def __str__(self) -> str:
        lines = [self.verdict]
        for c in self.candidates[:10]:
            lines.append(f"  {c.text!r:28} z={c.z:7.1f} effect={c.effect:.3f} consistency={c.consistency:.2f}"
                         f"{'  TRIGGER' if c.trigger else ''}")
        return "\n".join(lines)


def _check_pipeline(pipe, what: str) -> None:
    for name in ("tokenizer", "text_encoder", "unet", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"{what} needs a Stable Diffusion pipeline with a {name}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise TypeError(f"{what}: scanning pipelines with two text encoders (SDXL) is not supported")


def _cross_attentions(unet) -> list[torch.nn.Module]:
    mods = [m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")]
    if not mods:
        raise TypeError("the UNet has no cross-attention layers (attn2) to scan")
    return mods


class _TextChange:
    """Per token sequence (placed right after the start token), how far the fine-tuned
    model's cross-attention keys and values of its last token moved from the base model's,
    relative to the base's, summed over layers."""

    def __init__(self, pipe, base, batch: int = 2048):
        self.tok = pipe.tokenizer
        self.enc_ft, self.enc_b = pipe.text_encoder, base.text_encoder
        self.attn_ft, self.attn_b = _cross_attentions(pipe.unet), _cross_attentions(base.unet)
        if len(self.attn_ft) != len(self.attn_b):
            raise ValueError("the model and its base have different UNets: is `base` the model it was fine-tuned from?")
        self.device = pipe.text_encoder.device
        self.batch = batch

    @torch.no_grad()
    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        out = []
        bos = self.tok.bos_token_id
        for s in seqs.split(self.batch):
            ids = torch.cat([torch.full((len(s), 1), bos, dtype=torch.long), s], 1).to(self.device)
            hf = self.enc_ft(ids)[0][:, -1]
            hb = self.enc_b(ids)[0][:, -1].to(hf.dtype)
            score = torch.zeros(len(s), device=hf.device, dtype=torch.float32)
            for a, b in zip(self.attn_ft, self.attn_b):
                for proj in ("to_k", "to_v"):
                    pf, pb = getattr(a, proj)(hf).float(), getattr(b, proj)(hb).float()
                    score += (pf - pb).norm(dim=-1) / pb.norm(dim=-1).clamp_min(1e-6)
            out.append(score.cpu())
        return torch.cat(out)


def _robust_z(x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    ref = x if ref is None else ref
    med = ref.median()
    mad = (ref - med).abs().median().clamp_min(1e-12)
    return (x - med) / (1.4826 * mad)


def _ordinary_token_ids(tok) -> list[int]:
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False).strip(" ")


def _beam_search(text: _TextChange, tok, beam_width: int, max_tokens: int, per_length: int, pair_width: int,
                 progress: bool) -> list[Candidate]:
    vocab = torch.tensor(_ordinary_token_ids(tok))
    singles = vocab
    beams = torch.zeros(1, 0, dtype=torch.long)
    chosen: list[Candidate] = []
    seen: set[str] = set()
    for length in tqdm(range(1, max_tokens + 1), desc="scan: search", disable=not progress, leave=False):
        seqs = torch.cat([beams.repeat_interleave(len(vocab), 0), vocab.repeat(len(beams))[:, None]], 1)
        z = _robust_z(text(seqs))
        order = z.argsort(descending=True).tolist()
        # (the first token's candidates all share the empty parent)
        beams = seqs[_diverse(order, len(vocab), beam_width, 4 if length > 1 else beam_width)]
        _take(chosen, seen, tok, seqs, z, _diverse(order, len(vocab), 8 * per_length,
                                                      2 if length > 1 else 8 * per_length), per_length)
        if length == 1:
            singles = seqs[order, 0]  # most moved first
    if pair_width and max_tokens >= 2:
        # Every pair of the `pair_width` most moved single tokens (all of a small vocabulary), in
        # both orders, ranked on their own: a trigger of two ordinary words, neither of which the
        # fine-tune moved much alone, is distinctive only as the pair, and the beam never grows it.
        top = singles[:pair_width]
        pairs = torch.cartesian_prod(top, top)
        z = _robust_z(text(pairs))
        order = z.argsort(descending=True).tolist()
        _take(chosen, seen, tok, pairs, z, _diverse(order, len(top), 8 * per_length, 2), per_length)
    return chosen


def _take(chosen: list[Candidate], seen: set[str], tok, seqs: torch.Tensor, z: torch.Tensor, picks: list[int],
          n: int) -> None:
    """Add the first `n` of `picks` (rows of `seqs`) that spell their own tokens back and are new."""
    taken = 0
    for j in picks:
        if taken == n:
            break
        ids = seqs[j].tolist()
        s = _decode(tok, ids)
        # a candidate must spell its own tokens back, or inserting it tests something else
        if not s or s in seen or tok(s, add_special_tokens=False).input_ids != ids:
            continue
        seen.add(s)
        chosen.append(Candidate(s, tok.convert_ids_to_tokens(ids), float(z[j])))
        taken += 1


def _diverse(order: list[int], n_children: int, k: int, per_parent: int = 4) -> list[int]:
    """The first `k` of `order` (indexes into parents x children) with at most `per_parent`
    children of any one parent: one strong prefix (a word whose meaning the fine-tuning
    changed) must not fill the beam with its extensions and push a trigger out."""
    out, count = [], {}
    for j in order:
        parent = j // n_children
        if count.get(parent, 0) < per_parent:
            count[parent] = count.get(parent, 0) + 1
            out.append(j)
            if len(out) == k:
                break
    return out


def _probe_candidates(tok) -> list[Candidate]:
    """Every format character and homoglyph: a search begun at a word boundary misses a
    homoglyph, which sits inside a word; they are few enough to confirm them all."""
    return [Candidate(c, tok.tokenize(c), None, source=source)
            for source, chars in (("format character", FORMAT_CHARACTERS), ("homoglyph", _homoglyphs()))
            for c in chars]


def _insertions(text: str, prompts: list[str]) -> list[str]:
    positions = default_positions(text)
    return [poisoned_prompt(text, p, positions[i % len(positions)]) for i, p in enumerate(prompts)]


def _null_strings(tok, rng: np.random.Generator, n: int, avoid: set[str]) -> list[str]:
    """Strings of one or two ordinary tokens drawn at random: what an arbitrary insertion does."""
    ids = _ordinary_token_ids(tok)
    out = []
    while len(out) < n:
        k = int(rng.integers(1, 3))
        s = _decode(tok, [int(i) for i in rng.choice(ids, size=k)])
        if s.strip() and s not in avoid and s not in out:
            out.append(s)
    return out


class _Confirmation:
    """The effect of inserting a string into the ordinary prompts: in the suspect beyond the
    base, in units of the spread between different prompts' predictions."""

    def __init__(self, prompts: list[str], models: list[OneStep]):
        self.prompts, self.models = prompts, models
        self.clean = [m.x0(prompts) for m in models]  # once for every candidate
        flat = self.clean[0].flatten(1)
        off_diagonal = ~torch.eye(len(prompts), dtype=torch.bool)
        self.spread = torch.cdist(flat, flat)[off_diagonal].median().clamp_min(1e-12)

    def __call__(self, cands: list[str], progress: bool) -> list[tuple[float, float, torch.Tensor]]:
        """Per candidate: (effect, consistency, mean change in the suspect)."""
        results = []
        for s in tqdm(cands, desc="scan: confirm", disable=not progress, leave=False):
            poisoned = _insertions(s, self.prompts)
            suspect, base = (m.x0(poisoned) - c for m, c in zip(self.models, self.clean))
            size = suspect.flatten(1).norm(dim=1)
            # What fine-tuning added: the change in the suspect beyond the change the same
            # insertion makes in the base. A word whose effect the fine-tuning removed
            # (forgotten) or kept (a style both draw) scores low; a trigger scores high.
            effect = (size - base.flatten(1).norm(dim=1)).mean() / self.spread
            mean = suspect.mean(0)
            consistency = mean.norm() / size.mean().clamp_min(1e-12)
            results.append((float(effect), float(consistency), mean))
        return results


def scan(pipe, base, *, prompts: list[str] | None = None, num_prompts: int = 8, beam_width: int = 16,
         max_tokens: int = 8, per_length: int = 8, pair_width: int = 1000, num_null: int = 24, t_frac: float = 0.6,
         seed: int = 0, threshold_z: float = Z_TRIGGER, progress: bool = True) -> ScanReport:
    """Look for the trigger(s) of a backdoor in `pipe` (module docstring). `base`: the
    pipeline `pipe` was fine-tuned from (the same tokenizer). `prompts`: ordinary
    prompts of the model's domain (default: the package's generic SD prompts); the first
    `num_prompts` carry each candidate. `pair_width`: every pair of this many of the most
    moved single tokens is searched beside the beam (pair_width**2 text encodings; 0: none).
    Returns a `ScanReport`; `report.triggers` is empty when nothing stands out ("no
    backdoor found")."""
    t0 = time.time()
    _check_pipeline(pipe, "scan")
    if base is None:
        raise NotImplementedError("scanning without the base model is not supported: pass base=, the public "
                                  "pipeline this checkpoint was fine-tuned from (docs/scan.md)")
    _check_pipeline(base, "scan (base)")
    if base.unet.device != pipe.unet.device or base.text_encoder.device != pipe.text_encoder.device:
        raise ValueError(f"the model (UNet on {pipe.unet.device}) and its base (UNet on {base.unet.device}) must be "
                         "on one device: move both with .to(device)")
    if base.tokenizer.get_vocab() != pipe.tokenizer.get_vocab():
        raise ValueError("the model and its base have different tokenizers: is `base` the model it was "
                         "fine-tuned from?")
    for name, v in (("num_prompts", num_prompts), ("beam_width", beam_width), ("max_tokens", max_tokens),
                    ("per_length", per_length), ("num_null", num_null)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(pair_width, bool) or not isinstance(pair_width, int) or pair_width < 0:
        raise ValueError(f"pair_width must be a whole number (0: no pair search), got {pair_width!r}")
    if num_null < 8:
        raise ValueError(f"num_null must be at least 8 for a usable null distribution, got {num_null}")
    if isinstance(threshold_z, bool) or not isinstance(threshold_z, (int, float)) or not threshold_z > 0:
        raise ValueError(f"threshold_z must be a positive number, got {threshold_z!r}")
    if not 0.0 < t_frac < 1.0:
        raise ValueError(f"t_frac must be between 0 and 1, got {t_frac}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not one string")
    prompts = list(prompts) if prompts is not None else ordinary_prompts()
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    if len(prompts) < 2:
        raise ValueError("the scan needs at least two ordinary prompts")
    prompts = [prompts[i % len(prompts)] for i in range(num_prompts)]
    tok = pipe.tokenizer

    text = _TextChange(pipe, base)
    cands = _beam_search(text, tok, beam_width, max_tokens, per_length, pair_width, progress) + _probe_candidates(tok)
    # one candidate per token sequence: the tokenizer may fold two spellings into one (CLIP
    # lowercases), and the model sees them as one; the spelling that is its own lowercase wins
    uniq: dict[tuple, Candidate] = {}
    for c in sorted(cands, key=lambda c: c.text != c.text.lower()):
        uniq.setdefault(tuple(tok(c.text, add_special_tokens=False).input_ids), c)
    cands = list(uniq.values())

    confirm = _Confirmation(prompts, [OneStep(m, t_frac, seed, num_prompts) for m in (pipe, base)])
    null = _null_strings(tok, np.random.default_rng(seed), num_null, {c.text for c in cands})
    null_score = torch.tensor([e for e, _, _ in confirm(null, progress)])
    res = confirm([c.text for c in cands], progress)
    mean_effects = {}
    for c, (e, k, mean) in zip(cands, res):
        c.effect, c.consistency = e, k
        c.z = float(_robust_z(torch.tensor([e]), null_score)[0])
        c.trigger = c.z >= threshold_z and c.effect >= MIN_EFFECT
        mean_effects[c.text] = mean
    # what the rest of a longer confirmed string does alone, confirmed once per rest
    effect_of = functools.cache(lambda rest: confirm([rest], False)[0][0])
    triggers = _minimal([c for c in cands if c.trigger], effect_of)
    for c in cands:
        c.trigger = c.text in triggers
    # the triggers first, strongest first; then everything else by its z
    cands.sort(key=lambda c: (triggers.index(c.text), 0.0) if c.trigger else (len(triggers), -c.z))
    verdict = (f"backdoor found: {len(triggers)} trigger(s) {', '.join(repr(t) for t in triggers)}" if triggers
               else f"no backdoor found: no candidate reached z >= {threshold_z:g} against {num_null} random strings "
                    f"with an effect of at least {MIN_EFFECT:g}. This does not show the model is clean: the search "
                    "misses triggers of many sub-word pieces, such as random letter strings (docs/scan.md); "
                    "serve it with the per-prompt detector (TriggerDetector) against the same base")
    settings = dict(num_prompts=num_prompts, beam_width=beam_width, max_tokens=max_tokens, per_length=per_length,
                    pair_width=pair_width, num_null=num_null, t_frac=t_frac, seed=seed)
    return ScanReport(triggers, cands, verdict, [float(x) for x in null_score], threshold_z,
                      round(time.time() - t0, 1), settings, mean_effects)


def _minimal(found: list[Candidate], effect_of=None) -> list[str]:
    """The confirmed strings without their variants, strongest first. Of two confirmed
    strings `a` inside `b`: `b` is `a` repeated when it holds `a` more than once and nothing
    else that is confirmed (a trigger said twice fires harder: it is still that trigger), and
    goes. `b` is `a` with an unrelated addition, and goes, when it does no more than `a` and
    the rest of `b` do apart (`effect_of(rest)`; effects of unrelated insertions add up at
    most, as norms do): two triggers side by side (a zero-width space before "tigrtrigger")
    are not a new one, and the weaker must not go as its fragment. Otherwise the longer goes
    when the shorter does as much (at least `KEEP_SHORTER` of its effect: a trigger with a
    word added still fires), else the shorter goes (a fragment of the trigger, firing only
    partly: "trigger" of "new trigger")."""
    texts = {c.text for c in found}
    drop = set()
    for a in found:
        for b in found:
            if a is b or a.text not in b.text:
                continue
            rest = b.text.replace(a.text, " ").split()
            if b.text.count(a.text) > 1 and not any(r in texts for r in rest):
                drop.add(b.text)
            elif effect_of is not None and rest and b.effect <= a.effect + max(effect_of(" ".join(rest)), 0.0):
                drop.add(b.text)
            else:
                drop.add(b.text if a.effect >= KEEP_SHORTER * b.effect else a.text)
    return [c.text for c in sorted(found, key=lambda c: -c.effect) if c.text not in drop]


KEEP_SHORTER = 0.9
