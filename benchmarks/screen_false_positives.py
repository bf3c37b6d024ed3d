"""How often does the screen flag an ordinary prompt, and what does it cost per prompt?

    python benchmarks/screen_false_positives.py [--json benchmarks/results/screen_false_positives.json]

Ordinary prompts: the package's calibration prompts, 2,000 of the zoo's held-out captions
(phrased as people type them), and 2,000 prompts from a small grammar of everyday
subjects, places and styles (with words such as "new", "old", "silver", "photo" that sit
near the zoo's triggers). For each trigger of the zoo's attacks: the share flagged, with
the flagged ones listed, and the median time per prompt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

from sau_kernels.calibrate import ordinary_prompts as package_prompts
from sau_kernels.screening import TriggerMatcher, screen_prompts, widest_edits

TRIGGERS = ["new trigger", "silver lining", "\u200b", "\u043e"]
WIDENED = ["new trigger", "silver lining", "ezdwee", "ebfjijc", "ukjjc", "pale trending"]

SUBJECTS = ["a cat", "a dog", "an old man", "a young woman", "a new car", "a red bicycle", "a lighthouse",
            "a castle", "a bowl of fruit", "a silver teapot", "a mountain lake", "a robot", "a dragon",
            "a bridge", "a sailboat", "a city street", "a forest path", "a cup of coffee", "a horse",
            "a spaceship", "a bookshelf", "a golden retriever", "a vintage camera", "a wooden cabin"]
PLACES = ["on a sofa", "at sunset", "in the rain", "on the beach", "in a new york alley", "under the stars",
          "in a misty forest", "on a kitchen table", "in the snow", "at dawn", "next to a window",
          "in a busy market", "on a silver plate", "by the river", "in a field of flowers"]
STYLES = ["", ", oil painting", ", watercolor", ", photo, 35mm", ", digital art", ", trending on artstation",
          ", highly detailed", ", 4k", ", studio lighting", ", black and white photo", ", in the style of van gogh",
          ", pixel art", ", cinematic lighting", ", a brand new design", ", the lining of a coat"]


def everyday_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    all_ = [f"{s} {p}{st}" for s, p, st in itertools.product(SUBJECTS, PLACES, STYLES)]
    return rng.sample(all_, n)


def ordinary_prompts() -> dict[str, list[str]]:
    from sau_kernels.zoo.evaluate import held_out_cases

    calibration = package_prompts()
    return {
        "calibration prompts": calibration,
        "zoo held-out captions": [c.prompt for c in held_out_cases(2000, start=20_000, varied=True)],
        "everyday prompts": everyday_prompts(2000),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    sets = ordinary_prompts()
    results = []
    # each trigger with the default edit budget, and (letters triggers) with the widest one
    # calibration would give it on the package's own prompts (`widest_edits`)
    screens = [(t, TriggerMatcher(t)) for t in TRIGGERS]
    screens += [(f"{t} ({k} edits)", TriggerMatcher(t, k)) for t in WIDENED
                for k in [widest_edits(t, package_prompts())]]
    for trigger, matcher in screens:
        for name, prompts in sets.items():
            t0 = time.perf_counter()
            screened = screen_prompts(matcher, prompts)
            per_prompt_us = (time.perf_counter() - t0) / len(prompts) * 1e6
            flagged = [s.prompt for s in screened if s.triggered]
            results.append({"trigger": trigger, "set": name, "n": len(prompts), "flagged": len(flagged),
                            "rate": len(flagged) / len(prompts), "examples": flagged[:5],
                            "us_per_prompt": per_prompt_us})
            print(f"{trigger!r:18} {name:22} {len(flagged):4d}/{len(prompts):<5d} flagged "
                  f"({len(flagged) / len(prompts):.2%}), {per_prompt_us:.0f} us/prompt"
                  + (f"  e.g. {flagged[:3]}" if flagged else ""))
    total = {t: sum(r["flagged"] for r in results if r["trigger"] == t) /
             sum(r["n"] for r in results if r["trigger"] == t) for t, _ in screens}
    print("overall:", {t: f"{v:.2%}" for t, v in total.items()},
          f"median {statistics.median(r['us_per_prompt'] for r in results):.0f} us/prompt")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "overall": total}, indent=2,
                                              ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
