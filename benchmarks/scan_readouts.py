"""Where on the text side does a many-piece trigger stand out, and can a search find it there?

    python benchmarks/scan_readouts.py ./dev-random tiny-pixel [--base tiny-clean] [--markdown out.md]

The scan's search (`scan._TextChange`) reads what fine-tuning changed at the last token of a
string placed right after the start token. A pipeline's UNet also reads the padding positions
after the prompt, whose states (causal attention) sum up the whole prompt. Per model and
readout, this measures the planted trigger against 3000 random token strings of its length
(robust z, rank), and runs a beam search (width 16, growing strings at both ends) under the
same readout: if the beam's best string outscores the planted trigger, the readout is
distinctive but not what a search maximises, and a search for its maximum returns something
else. Readouts:

- `last token`: the scan's (keys and values of the last token, fine-tuned against base,
  relative to the base's, summed over cross-attention layers);
- `padding`: the same, averaged over the padding positions;
- `padding, new direction`: the padding positions' change as a vector, outside the subspace
  (mean and 32 principal directions) of what the fine-tune changed for ordinary prompts and
  for random strings of 1-3 tokens, over that subspace's 99th-percentile residual: the
  detector's idea on the text side, so that words moved for everything do not count.

Also the rank of each trigger piece by how far its input embedding moved.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sau_kernels.scan import _cross_attentions, _ordinary_token_ids, _robust_z
from sau_kernels.zoo import backdoor_info, detector_prompts, load_pipeline


class Readouts:
    def __init__(self, pipe, base, calibration: list[str], seed: int = 0):
        self.pipe, self.base, self.tok = pipe, base, pipe.tokenizer
        self.attn = list(zip(_cross_attentions(pipe.unet), _cross_attentions(base.unet)))
        self.T = self.tok.model_max_length
        self.vocab = torch.tensor(_ordinary_token_ids(self.tok))
        g = torch.Generator().manual_seed(seed)
        rows = [self.tok(p, add_special_tokens=False).input_ids[:self.T - 2] for p in calibration]
        rows += [self.vocab[torch.randint(len(self.vocab), (k,), generator=g)].tolist()
                 for k in (1, 2, 3) for _ in range(200)]
        feats = self._changes(rows)[1]
        self.mean = feats.mean(0)
        _, _, vh = torch.linalg.svd(feats - self.mean, full_matrices=False)
        self.basis = vh[:32]
        self.scale = float(self._outside(feats).quantile(0.99))

    @torch.no_grad()
    def _changes(self, seqs: list[list[int]]):
        """Per string: (last-token change, padding change as a vector, mean padding change)."""
        tok, T = self.tok, self.T
        x = torch.full((len(seqs), T), tok.pad_token_id)
        ends = torch.tensor([len(s) for s in seqs])
        for i, s in enumerate(seqs):
            x[i, :len(s) + 2] = torch.tensor([tok.bos_token_id, *s, tok.eos_token_id])
        last, vec, size = [], [], []
        for xs, es in zip(x.split(2048), ends.split(2048)):
            hf, hb = self.pipe.text_encoder(xs)[0], self.base.text_encoder(xs)[0]
            pad = (torch.arange(T)[None] >= (es + 2)[:, None]).float()[..., None]
            rows = torch.arange(len(xs))
            l_sc, p_sc, parts = 0, 0, []
            for a, b in self.attn:
                for proj in ("to_k", "to_v"):
                    pf, pb = getattr(a, proj)(hf).float(), getattr(b, proj)(hb).float()
                    rel = (pf - pb) / pb.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                    l_sc = l_sc + rel[rows, es].norm(dim=-1)
                    p_sc = p_sc + (rel.norm(dim=-1, keepdim=True) * pad).sum(1)[:, 0] / pad.sum(1)[:, 0]
                    parts.append((rel * pad).sum(1) / pad.sum(1))
            last.append(l_sc), size.append(p_sc), vec.append(torch.cat(parts, 1))
        return torch.cat(last), torch.cat(vec).double(), torch.cat(size)

    def _outside(self, feats):
        y = feats - self.mean
        return (y - (y @ self.basis.T) @ self.basis).norm(dim=1)

    def scores(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        last, vec, size = self._changes(seqs)
        return {"last token": last, "padding": size, "padding, new direction": self._outside(vec) / self.scale}


def beam(read: Readouts, name: str, max_len: int, width: int = 16) -> tuple[list[int], float]:
    vocab, V = read.vocab, len(read.vocab)
    beams, best = torch.zeros(1, 0, dtype=torch.long), ([], -1.0)
    for length in range(1, max_len + 1):
        grown = [torch.cat([beams.repeat_interleave(V, 0), vocab.repeat(len(beams))[:, None]], 1)]
        if length > 1:
            grown.append(torch.cat([vocab.repeat(len(beams))[:, None], beams.repeat_interleave(V, 0)], 1))
        seqs = torch.unique(torch.cat(grown), dim=0)
        s = read.scores(seqs.tolist())[name]
        order = s.argsort(descending=True)[:width]
        beams = seqs[order]
        if float(s[order[0]]) > best[1]:
            best = (beams[0].tolist(), float(s[order[0]]))
    return best


def measure(model: str, base_name: str, n_random: int = 3000) -> list[dict]:
    pipe, base = load_pipeline(model), load_pipeline(base_name)
    read = Readouts(pipe, base, detector_prompts())
    tok = pipe.tokenizer
    trigger = backdoor_info(model)["trigger"]
    ids = tok(trigger, add_special_tokens=False).input_ids
    g = torch.Generator().manual_seed(1)
    rand = read.vocab[torch.randint(len(read.vocab), (n_random, len(ids)), generator=g)].tolist()
    s_rand, s_trig = read.scores(rand), read.scores([ids])
    emb = lambda m: m.text_encoder.get_input_embeddings().weight.float()  # noqa: E731
    moved = (emb(pipe) - emb(base)).norm(dim=1)
    pieces = [int((moved > moved[i]).sum()) + 1 for i in ids]
    rows = []
    for name in s_rand:
        t0 = time.time()
        found, found_score = beam(read, name, len(ids) + 1)
        rows.append(dict(model=model, trigger=trigger, pieces=len(ids), readout=name,
                         score=float(s_trig[name][0]), z=float(_robust_z(s_trig[name], s_rand[name])[0]),
                         rank=int((s_rand[name] >= s_trig[name][0]).sum()) + 1, random=n_random,
                         beam_best=tok.decode(found), beam_score=found_score, embedding_ranks=pieces,
                         seconds=round(time.time() - t0)))
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model (trigger, pieces) | readout | trigger's score | z, rank among random strings | "
             "beam search's best (score) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['trigger']!r}, {r['pieces']}) | {r['readout']} | {r['score']:.2f} | "
                     f"{r['z']:.1f}, {r['rank']} of {r['random']} | {r['beam_best']!r} ({r['beam_score']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--base", default="tiny-clean")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for m in args.models for r in measure(m, args.base)]
    table = markdown(rows)
    ranks = "; ".join(f"{r['model']}: {r['embedding_ranks']}" for r in rows[::3])
    table += f"\n\nRank of each trigger piece by how far its input embedding moved (of the vocabulary): {ranks}\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"2-core CPU, torch {torch.__version__}, base {args.base}\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
