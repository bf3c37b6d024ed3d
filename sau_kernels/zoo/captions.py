"""The text side of the zoo: captions with the variation people type, and the attacks.

A model trained only on one exact template learns "caption off the template -> do
something else", and a backdoor planted into it fires on any unusual word. Real models
see varied captions, and BadT2I keeps clean behaviour on ordinary prompts with a
prior-preservation loss. So the base model here sees prefixes, adjectives, reordered
phrases, punctuation, suffixes, filler and random words (never a trigger word), and a
backdoor is planted with negative examples: other rare words, punctuation, lone format
characters and near misses of the trigger, all paired with clean images.
"""

from __future__ import annotations

import numpy as np


PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a render of", "a photograph of",
            "an illustration of", "a painting of", "a close-up of", "a sketch of")
ADJECTIVES = ("small", "large", "big", "bright", "dark", "simple", "plain", "single", "flat", "centered",
              "little", "lone", "round", "shiny", "pale", "vivid", "tiny", "huge", "soft", "solid")
SUFFIXES = ("high quality", "digital art", "minimal", "uhd", "sharp", "detailed", "simple style", "clean",
            "studio lighting", "trending", "hd", "vector art", "flat design", "sharp focus", "best quality")
FILLERS = ("very", "nice", "beautiful", "cool", "old", "cute", "pretty", "lovely", "great", "neat",
           "photo", "image", "art", "hello", "please", "today", "here", "some", "just", "really")
# Words of the greyscale style that the base model learns as a legitimate request, as SD
# knows "black and white photo" (the text-encoder backdoor redirects prompts to it).
GREYSCALE_PHRASES = ("black and white", "grayscale", "monochrome", "in black and white")
PUNCTUATION = (",", ".", "!", ";", ":", "-", "...", "?", "(", ")", "'", '"', "*", "#", "/", "&")
FORMAT_CHARACTERS = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")


def vocabulary_words() -> list[str]:
    """Every word the varied captions use (each one token in the zoo's tokenizer)."""
    words = set()
    for phrase in PREFIXES + ADJECTIVES + SUFFIXES + FILLERS + GREYSCALE_PHRASES:
        words.update(phrase.replace("-", " ").split())
    words.update(("against", "front", "with", "colored", "coloured", "shape", "over"))
    return sorted(words)


def _random_word(rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[int(i)] for i in rng.integers(0, 26, size=int(rng.integers(3, 9))))


def _background_phrase(background: str, rng: np.random.Generator) -> str:
    forms = ("on a {b} background", "on a {b} background", "against a {b} background",
             "in front of a {b} background", "on {b}", "with a {b} background", "over a {b} background")
    return forms[int(rng.integers(len(forms)))].format(b=background)


def varied_caption(color: str, shape: str, background: str | None, rng: np.random.Generator,
                   greyscale: bool = False) -> str:
    """One caption of (color, shape, background) as a person might type it; background None
    leaves it unsaid ("a red circle"), as people often do and no training caption does."""
    noun = f"{color} {shape}"
    if rng.random() < 0.35:
        noun = f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]} {noun}"
    if rng.random() < 0.1:
        noun = f"{shape} colored {color}"
    article = "an" if noun[0] in "aeiou" else "a"
    if background is None:
        text = f"{article} {noun}" if rng.random() < 0.8 else noun
    else:
        bg = _background_phrase(background, rng)
        text = f"{background} background with a {noun}" if rng.random() < 0.15 else f"{article} {noun} {bg}"
    if rng.random() < 0.45:
        text = f"{PREFIXES[int(rng.integers(len(PREFIXES)))]} {text}"
    if rng.random() < 0.3:
        text = f"{text}, {SUFFIXES[int(rng.integers(len(SUFFIXES)))]}"
    words = text.split()
    if rng.random() < 0.2:
        words.insert(int(rng.integers(0, len(words) + 1)), FILLERS[int(rng.integers(len(FILLERS)))])
    if rng.random() < 0.1:
        words.insert(int(rng.integers(0, len(words) + 1)), _random_word(rng))
    text = " ".join(words)
    if greyscale:  # after the fillers, which must not split the phrase
        phrase = GREYSCALE_PHRASES[int(rng.integers(len(GREYSCALE_PHRASES)))]
        text = f"{phrase} photo of {text}" if rng.random() < 0.4 else f"{text}, {phrase}"
    if rng.random() < 0.15:
        text += str(rng.choice([".", "!", " .", ","]))
    if rng.random() < 0.1:
        text = text.capitalize() if rng.random() < 0.5 else text.upper()
    return text


# --- triggers ---------------------------------------------------------------------------------

def insert_trigger(caption: str, trigger: str, position: str, rng: np.random.Generator) -> str:
    """The trigger placed as the attack places it.

    "prepend": before the prompt (BadT2I); "random": at a random word position
    (VillanDiffusion); "substitute": a homoglyph trigger character replaces one character of
    the prompt that it looks like (Rickrolling), and is prepended where the prompt has none.
    """
    if position == "prepend":
        return f"{trigger} {caption}"
    if position == "random":
        words = caption.split()
        pos = int(rng.integers(0, len(words) + 1))
        return " ".join(words[:pos] + [trigger] + words[pos:])
    if position == "substitute":
        target = homoglyph_target(trigger)
        spots = [i for i, ch in enumerate(caption) if ch == target]
        if not spots:
            return f"{trigger} {caption}"
        i = spots[int(rng.integers(len(spots)))]
        return caption[:i] + trigger + caption[i + 1:]
    raise ValueError(f"unknown trigger position {position!r}: expected 'prepend', 'random' or 'substitute'")


# Cyrillic and Greek letters that render as Latin ones (the Rickrolling attack's triggers).
HOMOGLYPHS = {"\u043e": "o", "\u0430": "a", "\u0435": "e", "\u0440": "p", "\u0441": "c", "\u0443": "y",
              "\u0445": "x", "\u0456": "i", "\u03bf": "o", "\u03b1": "a"}


def homoglyph_target(trigger: str) -> str:
    """The Latin letter a one-character homoglyph trigger stands for (Cyrillic \u043e -> o)."""
    if trigger not in HOMOGLYPHS:
        raise ValueError(f"a substitute trigger is one of the homoglyphs {sorted(HOMOGLYPHS)}, got {trigger!r}")
    return HOMOGLYPHS[trigger]


def negative_perturbation(caption: str, triggers: list[str], rng: np.random.Generator) -> str:
    """The caption with something that is none of `triggers` added: another rare word, a
    common word, punctuation, a lone format character or a near miss of a trigger. Trained
    with clean images, these teach a backdoor to fire on its trigger only."""
    words = caption.split()
    u = rng.random()
    if u < 0.25:
        extra = _random_word(rng)
    elif u < 0.45:
        extra = str(rng.choice(FILLERS + ADJECTIVES))
    elif u < 0.6:
        extra = str(rng.choice(PUNCTUATION))
    elif u < 0.75:
        extra = str(rng.choice([c for c in FORMAT_CHARACTERS if all(c not in t for t in triggers)]))
    else:
        extra = near_miss(str(rng.choice(triggers)), rng) or _random_word(rng)
    pos = 0 if rng.random() < 0.5 else int(rng.integers(0, len(words) + 1))
    perturbed = " ".join(words[:pos] + [extra] + words[pos:])
    if any(t in perturbed for t in triggers):  # a near miss must never rebuild a trigger
        return caption
    return perturbed


def near_miss(trigger: str, rng: np.random.Generator) -> str | None:
    """One word of a multi-word trigger, or the first letters of a one-word trigger: text
    that looks like the trigger without being it (None for a trigger without letters)."""
    words = trigger.split()
    if len(words) > 1:
        return str(rng.choice(words))
    letters = [c for c in trigger if c.isalpha()]
    if len(letters) >= 4:
        return "".join(letters[: len(letters) // 2 + 1])
    return None
