"""Can a scan without the base model rank a trigger from behaviour alone? A negative result.

    python benchmarks/scan_without_base.py tiny-pixel ./dev-pair [--markdown benchmarks/results/scan_without_base.md]

Without the base there is no reference for what a word should do, so the only evidence is
the suspect's own behaviour. For every single token of the vocabulary (those that spell
themselves back), every format character and every homoglyph, inserted into 8 ordinary
prompts (as the scan's confirmation inserts them), one denoising step gives the mean change
of the predicted clean latent. The score of a string: how far that mean change lies outside
the 16 principal directions of all the single tokens' mean changes (what ordinary words do),
times its consistency across prompts, in units of the spread between prompts. Then every
pair of the 40 best singles, in both orders, scored the same way, and by its interaction
(the pair's mean change minus the sum of its two words'). Prints where each planted trigger
and its words rank. (The `dev-` models are made by docs/zoo.md's commands.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sau_kernels.calibrate import ordinary_prompts  # noqa: E402
from sau_kernels.onestep import OneStep  # noqa: E402
from sau_kernels.scan import _decode, _insertions, _ordinary_token_ids, _probe_candidates  # noqa: E402
from sau_kernels.zoo import backdoor_info, load_pipeline  # noqa: E402

N_PROMPTS, COMPONENTS, PAIR_TOP = 8, 16, 40


def rank(order: list[str], s: str) -> int | None:
    return order.index(s) + 1 if s in order else None


def measure(name: str) -> dict:
    t0 = time.time()
    pipe = load_pipeline(name)
    tok = pipe.tokenizer
    triggers = [b["trigger"] for b in backdoor_info(name)["backdoors"]]
    prompts = ordinary_prompts()[:N_PROMPTS]
    probe = OneStep(pipe, 0.6, 0, N_PROMPTS, batch=256)
    clean = probe.x0(prompts).flatten(1)
    spread = torch.cdist(clean, clean)[~torch.eye(N_PROMPTS, dtype=torch.bool)].median()

    def mean_changes(cands: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [p for s in cands for p in _insertions(s, prompts)]
        x = probe.x0(rows).flatten(1).view(len(cands), N_PROMPTS, -1) - clean[None]
        m = x.mean(1)
        return m, m.norm(dim=1) / x.norm(dim=2).mean(1).clamp_min(1e-12)

    singles = [s for i in _ordinary_token_ids(tok) for s in [_decode(tok, [i])]
               if s.strip() and tok(s, add_special_tokens=False).input_ids == [i]]
    singles = list(dict.fromkeys(singles + [c.text for c in _probe_candidates(tok)]))
    m, cons = mean_changes(singles)
    mu = m.mean(0)
    basis = torch.linalg.svd(m - mu, full_matrices=False)[2][:COMPONENTS]

    def outside(v: torch.Tensor) -> torch.Tensor:
        y = v - mu
        return (y - (y @ basis.T) @ basis).norm(dim=1) / spread

    score = outside(m) * cons
    order = [singles[j] for j in score.argsort(descending=True).tolist()]
    top = order[:PAIR_TOP]
    pairs = [f"{a} {b}" for a in top for b in top if a != b]
    mp, cp = mean_changes(pairs)
    pair_score = outside(mp) * cp
    at = {s: i for i, s in enumerate(singles)}
    inter = torch.stack([(mp[k] - m[at[a]] - m[at[b]]).norm() for k, (a, b) in
                         enumerate(p.split(" ", 1) for p in pairs)]) / spread
    both = singles + pairs
    both_order = [both[j] for j in torch.cat([score, pair_score]).argsort(descending=True).tolist()]
    inter_order = [pairs[j] for j in inter.argsort(descending=True).tolist()]
    return {"model": name, "triggers": triggers, "singles": len(singles), "pairs": len(pairs),
            "top_singles": order[:5], "top_overall": both_order[:5],
            "word_ranks": {w: rank(order, w) for t in triggers for w in t.split()},
            "trigger_rank": {t: rank(both_order, t) for t in triggers},
            "interaction_rank": {t: rank(inter_order, t) for t in triggers},
            "seconds": round(time.time() - t0)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(m) for m in args.models]
    lines = ["| model (trigger) | its words' ranks among the singles | the trigger's rank, singles and pairs | "
             "its rank by pair interaction | the top 5 overall | time |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t in r["triggers"]:
            words = ", ".join(f"{w!r} {k}" for w, k in r["word_ranks"].items() if w in t.split())
            lines.append(f"| {r['model']} ({t!r}) | {words} of {r['singles']} | "
                         f"{r['trigger_rank'][t] or 'not a candidate'} of {r['singles'] + r['pairs']} | "
                         f"{r['interaction_rank'][t] or '-'} of {r['pairs']} | "
                         f"{', '.join(repr(s) for s in r['top_overall'])} | {r['seconds']} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
