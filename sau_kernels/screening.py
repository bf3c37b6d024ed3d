"""Trigger screening on token ids.

The pipeline's own tokenizer decides what the model sees: CLIP lower-cases and normalises
whitespace, so "New Trigger", "NEW TRIGGER" and "new  trigger" are one trigger to the model
and must be one to the screen. A token scan is all it costs on untriggered traffic.
"""

from __future__ import annotations

from dataclasses import dataclass


def trigger_token_ids(tokenizer, trigger: str) -> list[int]:
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"trigger {trigger!r} tokenises to nothing")
    return list(ids)


def find_occurrences(ids: list[int], pattern: list[int]) -> list[int]:
    """Start positions of the non-overlapping occurrences of `pattern` in `ids`."""
    n, m = len(ids), len(pattern)
    starts, i = [], 0
    while i <= n - m:
        if ids[i:i + m] == pattern:
            starts.append(i)
            i += m
        else:
            i += 1
    return starts


def remove_occurrences(ids: list[int], pattern: list[int]) -> list[int]:
    out, last = [], 0
    for s in find_occurrences(ids, pattern):
        out.extend(ids[last:s])
        last = s + len(pattern)
    out.extend(ids[last:])
    return out


@dataclass(frozen=True)
class Screened:
    prompt: str
    triggered: bool
    occurrences: int
    clean_prompt: str | None  # the prompt with every occurrence of the trigger removed


def screen_prompts(tokenizer, prompts: list[str], trigger_ids: list[int]) -> list[Screened]:
    batch = tokenizer(list(prompts), add_special_tokens=False).input_ids
    out = []
    for prompt, ids in zip(prompts, batch):
        starts = find_occurrences(ids, trigger_ids)
        clean = None
        if starts:
            clean = tokenizer.decode(remove_occurrences(ids, trigger_ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).strip()
        out.append(Screened(prompt, bool(starts), len(starts), clean))
    return out
