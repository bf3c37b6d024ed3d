"""Could a behaviour-guided search grow a many-piece trigger? An oracle test.

    python benchmarks/scan_growth_oracle.py ./tiny-random ./tiny-phrase [--markdown out.md]

A search that grows candidate strings a token at a time, scoring each by what it does to
the model (here the per-prompt detector's score of the string put before ordinary
prompts), can only find a trigger of many sub-word pieces if, at every length, the right
next piece stands out. This gives the search the best possible start: the planted
trigger's own last pieces (its suffix of each length), and ranks every vocabulary token
put before that suffix. If the true piece does not rank near the top even then, no beam
of a practical width will hold it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from sau_kernels.detect import TriggerDetector
from sau_kernels.scan import _ordinary_token_ids
from sau_kernels.zoo import backdoor_info, detector_prompts, load_pipeline
from sau_kernels.zoo.evaluate import held_out_cases


def oracle_ranks(name: str, base_name: str, carriers: int = 2) -> list[dict]:
    pipe, base = load_pipeline(name), load_pipeline(base_name)
    det = TriggerDetector.calibrate(pipe, base, detector_prompts(), progress=False)
    tok = pipe.tokenizer
    trigger = backdoor_info(name)["trigger"]
    ids = tok(trigger, add_special_tokens=False).input_ids
    vocab = _ordinary_token_ids(tok)
    prompts = [c.prompt for c in held_out_cases(carriers, start=3000, varied=True)]
    rows = []
    for length in range(1, len(ids) + 1):
        suffix = ids[len(ids) - length + 1:]
        strings = [tok.decode([v] + suffix, clean_up_tokenization_spaces=False).strip() for v in vocab]
        s = det.scores([f"{x} {p}" for x in strings for p in prompts]).reshape(len(vocab), len(prompts)).mean(1)
        true = vocab.index(ids[len(ids) - length])
        order = np.argsort(-s)
        rows.append(dict(model=name, trigger=trigger, length=length, string=strings[true], score=float(s[true]),
                         rank=int(np.where(order == true)[0][0]) + 1, vocabulary=len(vocab),
                         top=[(strings[j], round(float(s[j]), 2)) for j in order[:3]]))
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | length | true string | its score | its rank | best strings (score) |", "|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{t!r} ({v})" for t, v in r["top"])
        lines.append(f"| {r['model']} | {r['length']} | {r['string']!r} | {r['score']:.2f} | "
                     f"{r['rank']} of {r['vocabulary']} | {top} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--base", default="tiny-clean")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = [r for m in args.models for r in oracle_ranks(m, args.base)]
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"2-core CPU, torch {torch.__version__}\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
