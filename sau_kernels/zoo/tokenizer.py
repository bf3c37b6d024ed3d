"""A CLIP byte-level BPE tokenizer built locally for the zoo.

The vocabulary holds every byte (so any text tokenises, character by character in the
worst case), plus one merged token for each word of the synthetic world and a few common
words. Merges are added word by word, each new merge joining the first adjacent pair that
the merges so far leave apart: a merge added later has a lower rank, so it can never split
a word that is already one token ("red" inside "green" stays harmless).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from . import captions, world

MODEL_MAX_LENGTH = 32
EXTRA_WORDS = (
    "a", "an", "the", "on", "in", "of", "with", "and", "background", "photo", "image", "picture",
    "new", "trigger", "small", "large", "big", "bright", "dark", "shape",
)
# U+200B, BadT2I's trigger, is one token, so that a model can learn it as it learns a word.
ZERO_WIDTH_SPACE = "\u200b"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable character map
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    return word


def _first_words() -> list[str]:
    return sorted(set(EXTRA_WORDS) | set(world.COLORS) | set(world.SHAPES) | set(world.BACKGROUNDS))


def vocabulary_words() -> list[str]:
    """The first vocabulary, then the varied captions' words appended: a merge added later
    never changes an earlier token's id, so a model trained on the first vocabulary can be
    trained on (`train_base(init_from=...)`) with its embeddings kept."""
    first = _first_words()
    added = sorted(set(captions.vocabulary_words()) - set(first))
    return first + added + [ZERO_WIDTH_SPACE]


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        symbols = [_bytes_to_unicode()[b] for b in w.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_tokens.append(pair[0] + pair[1])
            pieces = _bpe(pieces, ranks)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def save_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config; load with CLIPTokenizer.from_pretrained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(vocabulary_words())
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return directory


def build_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    save_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(str(directory))
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Every vocabulary word must be one token, and case/space variants must agree."""
    for w in vocabulary_words():
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits vocabulary word {w!r} into {tok.convert_ids_to_tokens(ids)}")
    a = tok("New  Trigger a red circle").input_ids
    b = tok("new trigger a red circle").input_ids
    if a != b:
        raise RuntimeError("tokenizer does not normalise case and whitespace as CLIP does")
