"""What one defended call did: `SAUReport`, returned with the call's output.

The report belongs to the call: `pipe(...)` returns it as `output.sau_report` (with
`return_dict=False` diffusers' tuple stays as it is), and `pipe.sau_report` is the last
report of the calling thread, a convenience. Device-side numbers (mask coverage, output-check
scores) stay on the device during the call and are read once, when the call ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

__all__ = ["SAUReport", "RepairClock", "SuspectOutputError", "last_report", "set_last_report"]


class SuspectOutputError(RuntimeError):
    """An output carries a trigger's signature (patch(..., output_check="raise"))."""


class RepairClock:
    """Accumulates the repair op's time. On a GPU the op runs asynchronously, so host time
    would measure only its launch: CUDA events bracket it instead, read (with a wait for the
    last one) only when the time is asked for."""

    def __init__(self, device="cpu"):
        self.on_cuda = torch.device(device).type == "cuda"
        self._host_ms = 0.0
        self._events = []

    @contextlib.contextmanager
    def __call__(self):
        if self.on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_ms += (time.perf_counter() - t0) * 1e3

    @property
    def ms(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_ms + sum(start.elapsed_time(end) for start, end in self._events)


def prompt_entry(prompt, screened: list, profiles, action: str) -> dict:
    """The report's record of one prompt: `screened` holds its Screened of every text field
    (empty for a row of prompt_embeds, unscreened)."""
    hit = [s for s in screened if s.triggered]
    main = screened[0] if screened else None
    triggers = sorted({k for s in hit for k in s.triggers})
    return {"prompt": prompt, "triggered": bool(hit), "occurrences": sum(s.occurrences for s in hit),
            "triggers": [profiles[k].trigger for k in triggers], "spans": list(main.spans) if main else [],
            "clean_prompt": (main.clean_prompt if main.triggered else main.prompt) if hit else None,
            "action": action, "coverage": [], "output_check": []}


@dataclass
class SAUReport:
    """What one call of a patched pipeline did, for serving logs.

    prompts: one record per prompt: its text, whether and where a trigger matched, the clean
    prompt, the action ("none", "repair": the twin's pixels swapped in where the trigger
    acted, "strip": generated from the clean prompt alone), per repaired image its mask
    coverage, per image the output check's verdict.
    """

    prompts: list[dict] = field(default_factory=list)
    mode: str = "final"
    triggers: list[str] = field(default_factory=list)
    rows: int = 0  # UNet rows per step, twins included
    screening_ms: float = 0.0  # the wrapper's own time before the pipeline runs: binding, the screen, the plan
    unscreened: bool = False  # a prompt_embeds call let through with on_embeds="pass"
    output_check_skipped: str | None = None  # why the output check could not run on this call
    repair_clock: RepairClock = field(default_factory=RepairClock, repr=False)
    _pending: list = field(default_factory=list, repr=False)  # device tensors read at the end of the call

    @property
    def repair_ms(self) -> float:
        """Time spent in the repair op during the call (on a GPU, its kernels' time)."""
        return self.repair_clock.ms

    @property
    def triggered(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p["triggered"]]

    @property
    def suspects(self) -> list[int]:
        """Prompts with an output the output check flagged (the screened-through or the defended)."""
        return [i for i, p in enumerate(self.prompts)
                if any(c["suspect"] for image in p.get("output_check", []) for c in image)]

    def add_coverage(self, prompt_image: list[tuple[int, int]], trigger: str, coverage: torch.Tensor) -> None:
        """Record (on the device) the op's per-image (primary, secondary) mask coverage."""
        self._pending.append(("coverage", prompt_image, trigger, coverage))

    def add_output_scores(self, scores: torch.Tensor, n_images: int, checks, profiles) -> None:
        """Record (on the device) the output check's (rows, profiles) scores."""
        self._pending.append(("scores", n_images, (checks, profiles), scores))

    def finish(self, raise_suspects: bool) -> "SAUReport":
        """Read the device numbers (one transfer per kind) into the records."""
        for kind, where, extra, t in self._pending:
            values = t.float().cpu().tolist()
            if kind == "coverage":
                for (i, j), (primary, secondary) in zip(where, values):
                    self.prompts[i]["coverage"].append(
                        {"trigger": extra, "image": j, "primary": primary, "secondary": secondary})
            else:
                checks, profiles = extra
                for r, row in enumerate(values):
                    self.prompts[r // where]["output_check"].append([
                        # a score that is not a number (an empty signature) is no pass
                        {"trigger": p.trigger, "score": round(v, 4), "suspect": not v <= c[3]}
                        for p, c, v in zip(profiles, checks, row) if c is not None])
        self._pending.clear()
        if raise_suspects and self.suspects:
            raise SuspectOutputError(
                f"the outputs of prompts {self.suspects} carry the signature of a trigger "
                f"({', '.join(repr(t) for t in self.triggers)}) although the screen let them through or the "
                "defence ran: withheld. patch(..., output_check='flag') returns them and marks them in the report")
        return self

    def __str__(self) -> str:
        lines = [f"SAU ({self.mode}): {len(self.triggered)}/{len(self.prompts)} prompts triggered, "
                 f"{self.rows} UNet rows, screening {self.screening_ms:.2f} ms, repair {self.repair_ms:.2f} ms"]
        for i in self.triggered:
            p = self.prompts[i]
            cov = ", ".join(f"{c['primary']:.1%}/{c['secondary']:.1%}" for c in p["coverage"])
            how = f"mask coverage primary/secondary: {cov}" if cov else "generated from the clean prompt"
            lines.append(f"  [{i}] {p['prompt']!r} -> {p['clean_prompt']!r} ({p['action']}); {how}")
        for i in self.suspects:
            name = "a row of prompt_embeds" if self.prompts[i]["prompt"] is None else repr(self.prompts[i]["prompt"])
            lines.append(f"  [{i}] {name}: an output carries a trigger's signature")
        if self.unscreened:
            lines.append("  the call passed prompt_embeds and went through unscreened (on_embeds='pass')")
        return "\n".join(lines)


_LAST = threading.local()


def set_last_report(pipe, report: SAUReport) -> None:
    if not hasattr(_LAST, "reports"):
        _LAST.reports = {}
    _LAST.reports[id(pipe)] = report


def last_report(pipe) -> SAUReport | None:
    """The calling thread's last report from `pipe`, or None."""
    return getattr(_LAST, "reports", {}).get(id(pipe))
