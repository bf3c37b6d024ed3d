"""Why the detector is calibrated on prompts like the traffic: tiny-pixel's detector calibrated
only on prompts that name a background (as every training caption does) against one with a
fifth of its prompts leaving it unsaid (`zoo.detector_prompts`), both scored on held-out
prompts of each shape, triggered and clean.

    python benchmarks/detect_calibration_traffic.py
"""

import numpy as np
import torch

from sau_kernels import TriggerDetector
from sau_kernels.zoo import DETECTOR_PROMPTS_START, backdoor_info, detector_prompts, load_pipeline
from sau_kernels.zoo.evaluate import held_out_cases, place, short_prompts

torch.set_num_threads(1)
pipe, base = load_pipeline("tiny-pixel"), load_pipeline("tiny-clean")
bd = backdoor_info("tiny-pixel")["backdoors"][0]
named = [c.prompt for c in held_out_cases(300, start=2000, varied=True)]
unsaid = short_prompts(100, start=2000)
tests = {"background named": (named, place([c.prompt for c in held_out_cases(300, start=3000, varied=True)], bd, seed=3)),
         "background unsaid": (unsaid, place(short_prompts(100, start=3000), bd, seed=13))}
calibrations = {"256 naming it": [c.prompt for c in held_out_cases(256, start=DETECTOR_PROMPTS_START, varied=True)],
                "detector_prompts()": detector_prompts()}
print("| calibrated on | prompts scored | triggered flagged | clean flagged | clean refused |")
print("|---|---|---|---|---|")
for cname, cal in calibrations.items():
    det = TriggerDetector.calibrate(pipe, base, cal, progress=False)
    for tname, (clean, triggered) in tests.items():
        s_clean, s_trig = det.scores(clean), det.scores(triggered)
        refused = sum(not det.localise(p, s).found for p, s in zip(clean, s_clean) if s > 1)
        print(f"| {cname} | {tname} ({len(clean)} + {len(triggered)}) | {np.mean(s_trig > 1):.1%} | "
              f"{np.mean(s_clean > 1):.1%} | {refused / len(clean):.1%} |", flush=True)
