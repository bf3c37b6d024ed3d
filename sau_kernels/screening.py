"""Trigger screening on the prompt's text, on what it reads as, not how it is spelled.

A backdoored text encoder fires on what it reads, and an attacker varies the spelling
while it still fires: case and spacing (CLIP lower-cases and folds whitespace), punctuation
and separators ("new-trigger", "new_trigger", "newtrigger"), zero-width and other format
characters, full-width forms, accents and combining marks, homoglyphs (a Cyrillic "е"),
HTML entities (CLIP's original tokenizer unescapes them; transformers' fast one does not),
swapped, scattered or repeated words ("trigger new", "new ... trigger", "trigger trigger")
and misspellings ("new triger"). So the screen compares canonical letters: the text
HTML-unescaped twice and, where they differ, also as written and as ftfy repairs it (where
ftfy is installed), NFKC-normalised,
case-folded, stripped of accents,
of format and other default-ignorable characters and of everything that is not a letter
or a digit, with Cyrillic, Greek and other lookalikes mapped to the Latin letter they
imitate. A prompt is flagged when

- the trigger's canonical letters occur in the prompt's, within k edits (Levenshtein;
  k = 0 below 6 letters, 1 up to 11, 2 from 12);
- or, for a trigger of two or more words of at least 3 letters, the prompt has as many
  words that read as those words as the trigger has, a word being one or the end of one
  (same k, by the word's length: a byte-level BPE reads "abtrigger" as ab + trigger</w>),
  in any order, anywhere, repeated or not (one word once is not the trigger: "a
  trigger-happy cowboy" passes, "a new trigger-happy one" and "trigger trigger" not);
- both rules also read the prompt as CLIP's pre-tokenizer splits it, a number, symbol,
  mark or format character a word break ("new12 trigger", "new½ trigger": folded, "½" is
  "12"; "new\u200bdog trigger": folded, "newdog");
- a trigger with no letters, made of format characters (BadT2I's U+200B), matches every
  format or default-ignorable character of the prompt;
- a trigger that is itself a homoglyph ("о", Cyrillic, as Rickrolling uses) matches only
  where the prompt has a homoglyph of the same letter: a plain "o" is not one.

The screen leans to flagging: a false positive costs one extra trajectory (the clean twin),
a false negative lets the backdoor through. The clean twin is cut from the text: every
matched word goes, with the punctuation, brackets and format characters around it, and the
result is screened again until nothing matches. A homoglyph trigger inside a word gets the
letter it imitates put back instead ("sоfa" -> "sofa"), and a format-character trigger is
dropped alone.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from .tokenizer_locks import tokenizer_lock

__all__ = ["canonicalize", "cut_letters", "homoglyph_of", "plain_spelling", "TriggerMatcher", "Screened",
           "screen_prompts", "trigger_token_ids", "widest_edits"]


def trigger_token_ids(tokenizer, trigger: str) -> list[int]:
    with tokenizer_lock(tokenizer):  # patch() may run while another thread's pipeline encodes
        ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"trigger {trigger!r} tokenises to nothing")
    return list(ids)


# --- canonical letters -------------------------------------------------------------------------

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) beyond category Cf: the
# soft hyphen, the combining grapheme joiner, Hangul fillers (letters that render as
# nothing), variation selectors, tags. They render as nothing, so they may sit anywhere.
_IGNORABLE_RANGES = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
                     (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
                     (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
                     (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
                     (0xE0000, 0xE0FFF))


def _invisible(ch: str) -> bool:
    o = ord(ch)
    return unicodedata.category(ch) == "Cf" or any(a <= o <= b for a, b in _IGNORABLE_RANGES)


# Lookalikes of Latin letters, keyed by their case-folded, accent-stripped form (after
# Unicode's confusables.txt, UTS #39, cut to Cyrillic, Greek, Armenian, Coptic and
# Latin-extended letters). Case folding merges forms that imitate different letters
# (Cyrillic "Т" looks like T, "т" does not; Greek "Ν" is N, "ν" is v): the table keeps the
# lowercase reading, and one edit of slack covers the other. NFKC already folds full-width
# and mathematical letters; digits are left alone ("0" is no "o").
_CONFUSABLES = {c: latin for latin, chars in {
    "a": "аαɑ", "b": "вьβƅꞵ", "c": "сⲥᴄ", "d": "ԁđ", "e": "еҽεєꬲ", "f": "ϝ",
    "g": "ɡցԍᶃ", "h": "һнհħ", "i": "іιıɪɩꙇ", "j": "јϳʝ", "k": "кκⲕ", "l": "ӏǀł",
    "m": "мμϻⲙ", "n": "ηոռⲛ", "o": "оοσօⲟᴏøөɵ", "p": "рρⲣ", "q": "ԛգզ", "r": "гᴦꭇʀⲅ",
    "s": "ѕꜱƽ", "t": "тτŧⲧ", "u": "υսᴜʋ", "v": "ѵνᴠ", "w": "ԝѡɯᴡω", "x": "хχⲭ",
    "y": "уүγʏɣⲩ", "z": "ζᴢ",
}.items() for c in chars}



def homoglyph_of(ch: str) -> str | None:
    """The Latin letter a homoglyph character imitates (Cyrillic "о" -> "o"); None for others."""
    letters, _, _, homoglyph = _fold(ch)
    return letters if homoglyph and len(letters) == 1 else None


_SEP, _JOIN, _LETTER = 0, 1, 2  # word separator; inside a word but no letter (marks, format); letters


@lru_cache(maxsize=1 << 16)
def _fold(ch: str) -> tuple[str, int, bool, bool]:
    """One character's (canonical letters, kind, invisible, homoglyph)."""
    if not ch or _invisible(ch):  # "" is an entity that unescapes to nothing
        return "", _JOIN, True, False
    letters, homoglyph = [], False
    for c in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).casefold()):
        if unicodedata.category(c)[0] == "M" or _invisible(c):  # accents, and fillers NFKC makes
            continue
        latin = _CONFUSABLES.get(c, c)
        homoglyph |= latin != c
        if latin.isalnum():
            letters.append(latin)
    if letters:
        return "".join(letters), _LETTER, False, homoglyph
    return "", _JOIN if unicodedata.category(ch)[0] == "M" else _SEP, False, False


# html.unescape's own pattern: unescaping match by match gives what it gives on the whole.
_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def _unescape(units: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """One html.unescape pass over (start, end, char) units: an entity's characters take its
    whole span of the original text."""
    text = "".join(u[2] for u in units)
    out, last = [], 0
    for m in _ENTITY.finditer(text):
        entity = m.group()
        rep = html.unescape(entity)
        if rep == entity:
            continue
        a, b = m.span()
        keep = 0  # "&ampfoo" -> "&foo": the tail "foo" is the original's, not the entity's
        while keep < min(len(rep), len(entity) - 1) and rep[-1 - keep] == entity[-1 - keep]:
            keep += 1
        start, end = units[a][0], units[b - 1 - keep][1]
        out += units[last:a]
        out += [(start, end, c) for c in rep[:len(rep) - keep]] or [(start, end, "")]
        out += units[b - keep:b]
        last = b
    return out + units[last:]


@lru_cache(maxsize=1)
def _ftfy_fix():
    """ftfy.fix_text where ftfy is installed (a slow CLIPTokenizer reads prompts through it), else None."""
    try:
        import ftfy
    except ImportError:
        return None
    return getattr(ftfy, "fix_text", None)  # (None: something else named ftfy)


def _ftfy_units(text: str) -> list[tuple[int, int, str]] | None:
    """The text as ftfy fixes it, as (start, end, char) units of the original, where ftfy is
    installed and changes it; else None. Fixed piece by piece between spaces (mojibake and
    entities lie inside one): a changed piece's characters all take its span, so the cost
    stays linear in the prompt (an alignment of the whole took 40 s on 2000 characters)."""
    fix = _ftfy_fix()
    if fix is None or (text.isascii() and "&" not in text):
        return None
    units, changed = [], False
    for m in re.finditer(r"[^ ]+| +", text):
        piece, (a, b) = m.group(), m.span()
        fixed = fix(piece) if not piece.startswith(" ") and not (piece.isascii() and "&" not in piece) else piece
        if fixed == piece:
            units += [(a + k, a + k + 1, c) for k, c in enumerate(piece)]
        else:
            changed = True
            units += [(a, b, c) for c in fixed] or [(a, b, "")]
    return units if changed else None


@lru_cache(maxsize=1 << 16)
def _breaks_clip_word(ch: str) -> bool:
    """Whether CLIP's pre-tokenizer (letter runs, single numbers, runs of anything else)
    ends a word at `ch` where the folded reading does not: a number or symbol character
    ("1", "½", "™", "①"), a combining mark or a format character (U+200B, the soft hyphen).
    Cached, as `_fold` is: every prompt's every character is asked."""
    return unicodedata.category(ch)[0] in "NSM" or _fold(ch)[2]


def _split_fold(ch: str) -> tuple[str, int, bool, bool]:
    """A character's fold as CLIP's pre-tokenizer splits words: one that breaks a CLIP word
    separates words and adds no letters ("new12 trigger" reads "new", "1", "2", "trigger";
    "new\u200bdog" reads "new", "dog")."""
    return ("", _SEP, False, False) if ch and _breaks_clip_word(ch) else _fold(ch)  # ("": an entity of nothing)


class _Scan:
    """A text read as canonical letters: the units (one character each after unescaping,
    with the span of the original text it came from), their folds, and the letters."""

    __slots__ = ("text", "units", "folds", "canon", "cunit", "_words", "_split", "_readings")

    def __init__(self, text: str, units: list[tuple[int, int, str]] | None = None, fold=_fold):
        own_units = units is None
        if units is None:
            units = [(i, i + 1, c) for i, c in enumerate(text)]
            if "&" in text:
                for _ in range(2):  # twice, as CLIP's basic_clean does: "&amp;nbsp;" is a space too
                    units = _unescape(units)
        self.text = text
        self.units = units
        self.folds = [fold(u[2]) for u in units]
        self.canon = "".join(f[0] for f in self.folds)
        self.cunit = [i for i, f in enumerate(self.folds) for _ in f[0]]  # canonical char -> unit
        self._words = None
        self._split = self if fold is _split_fold else None
        self._readings = None if own_units else [self]  # a reading built from units is one reading

    def readings(self) -> list["_Scan"]:
        """The text as CLIP's original tokenizer reads it (HTML entities unescaped, as its
        basic_clean does) and, where they differ, as written (a fast tokenizer leaves "&yenew"
        as "&", "ye", "new" while the unescaped reading is "¥ew") and as ftfy fixes it, where
        ftfy is installed (a slow CLIPTokenizer reads through `ftfy.fix_text`, which also
        repairs mojibake: "nÐµw" is "nеw" to it). A trigger in any reading is in the prompt."""
        if self._readings is None:
            self._readings = [self]
            if len(self.units) != len(self.text) or any(u[2] != c for u, c in zip(self.units, self.text)):
                # unescaping changed the text: not every tokenizer unescapes
                self._readings.append(_Scan(self.text, [(i, i + 1, c) for i, c in enumerate(self.text)]))
            fixed = _ftfy_units(self.text)
            if fixed is not None and all([u[2] for u in fixed] != [u[2] for u in r.units] for r in self._readings):
                self._readings.append(_Scan(self.text, fixed))
        return self._readings

    def split_reading(self) -> "_Scan":
        """The same units read with number and symbol characters as word breaks
        (`_split_fold`); itself where the text has none."""
        if self._split is None:
            self._split = self
            if any(u[2] and _breaks_clip_word(u[2]) for u in self.units):
                self._split = _Scan(self.text, self.units, _split_fold)
        return self._split

    def words(self) -> list[tuple[str, int, int]]:
        """(canonical letters, first unit, end unit) of each word: a run of units without a
        separator (format characters and marks stay inside the word: "n\\u200bew" is "new")."""
        if self._words is None:
            self._words, start = [], None
            for i, f in enumerate(self.folds + [("", _SEP, False, False)]):
                if f[1] != _SEP and start is None:
                    start = i
                elif f[1] == _SEP and start is not None:
                    letters = "".join(g[0] for g in self.folds[start:i])
                    if letters:
                        self._words.append((letters, start, i))
                    start = None
        return self._words

    def span(self, u0: int, u1: int) -> tuple[int, int]:
        """Units [u0, u1) as a span of the original text."""
        return self.units[u0][0], self.units[u1 - 1][1]


def canonicalize(text: str) -> tuple[str, list[int]]:
    """The canonical letters of `text`, and for each the index of the original character it
    came from (an HTML entity's letters point at its "&")."""
    s = _Scan(text)
    return s.canon, [s.units[u][0] for u in s.cunit]


def plain_spelling(prompt: str) -> str:
    """The prompt with every homoglyph put back to its Latin letter, format characters and
    marks dropped, compatibility forms (fullwidth letters) folded: how the attacker wants it
    read (the trigger detector scores it beside the prompt as written)."""
    out = []
    for ch in prompt:
        if ch.isascii():
            out.append(ch)
            continue
        letters, kind, _, _ = _fold(ch)
        out.append(letters if kind == _LETTER else " " if kind == _SEP and not _invisible(ch) else "")
    return "".join(out)


# --- matching ----------------------------------------------------------------------------------

def _edits_allowed(n: int) -> int:
    """The default edit budget for n canonical letters (a calibrated profile may widen the
    letters rule's, up to `_max_edits`: `widest_edits`)."""
    return 0 if n < 6 else 1 if n < 12 else 2


def _max_edits(n: int) -> int:
    """The widest budget calibration may give n letters: about a quarter of them (6 letters
    2, 10 letters 3). At a third, random letter strings match ordinary text (6 letters, 3
    edits: 10% of prompts)."""
    return max(_edits_allowed(n), (n + 2) // 4)


def widest_edits(trigger: str, ordinary: list[str]) -> int:
    """The widest edit budget for the letters rule (up to about a quarter of the trigger's
    letters) at which the screen flags none of `ordinary` that it does not flag at the default. A
    backdoor trained on a string of many sub-word pieces also fires on near misses of it
    ("ezdwpzee" for "ezdwee", "sulver lidxning" for "silver lining":
    benchmarks/screen_fuzz.py), and a false positive costs one twin."""
    if isinstance(ordinary, str) or not all(isinstance(p, str) for p in ordinary):
        raise TypeError("ordinary must be a list of prompts (strings)")
    default = TriggerMatcher(trigger)
    if default.mode != "letters":
        return default.edits
    flagged = [s.triggered for s in screen_prompts(default, ordinary)]
    best = default.edits
    for k in range(default.edits + 1, _max_edits(len(default.canon)) + 1):
        wider = [s.triggered for s in screen_prompts(TriggerMatcher(trigger, k), ordinary)]
        if any(w and not f for w, f in zip(wider, flagged)):
            break
        best = k
    return best


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (ca != cb), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


def _could_occur(p: str, t: str, k: int) -> bool:
    """Pigeonhole: k edits leave at least one of k+1 pieces of `p` intact in `t`. This is
    all that untriggered traffic usually costs."""
    n = len(p) // (k + 1)
    return any(p[i * n:(i + 1) * n if i < k else len(p)] in t for i in range(k + 1))


def _approx_find(p: str, t: str, k: int) -> list[tuple[int, int, int]]:
    """(edits, start, end) of each substring of `t` within k edits of `p` (Sellers' dynamic
    programme, tracking where each alignment starts); the caller picks among overlaps."""
    if k == 0:
        out, i = [], t.find(p)
        while i >= 0:
            out.append((0, i, i + len(p)))
            i = t.find(p, i + 1)
        return out
    if not _could_occur(p, t, k):
        return []
    m = len(p)
    dist, start = list(range(m + 1)), [0] * (m + 1)  # column 0: p[:i] against nothing
    out = []
    for j, c in enumerate(t, 1):
        d, s = [0] * (m + 1), [j] * (m + 1)  # row 0: a match may start anywhere
        for i in range(1, m + 1):
            best, st = dist[i - 1] + (p[i - 1] != c), start[i - 1]  # match or substitute
            if d[i - 1] + 1 < best:
                best, st = d[i - 1] + 1, s[i - 1]  # p[i-1] missing from the text
            if dist[i] + 1 < best:
                best, st = dist[i] + 1, start[i]  # t[j-1] extra in the text
            d[i], s[i] = best, st
        if d[m] <= k:
            out.append((d[m], s[m], j))
        dist, start = d, s
    return out


def _merge(ranges) -> list[tuple[int, int]]:
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _disjoint(cands: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The best non-overlapping (start, end): fewest edits, then shortest, then leftmost."""
    chosen = []
    for _, a, b in sorted(cands, key=lambda c: (c[0], c[2] - c[1], c[1])):
        if all(b <= x or a >= y for x, y in chosen):
            chosen.append((a, b))
    return sorted(chosen)


class TriggerMatcher:
    """Finds a trigger in prompts however it is spelled (see the module's docstring).
    Built once per trigger; `match(prompt)` gives the matched spans of the original text."""

    def __init__(self, trigger: str, edits: int | None = None, alone=()):
        """`edits`: the letters rule's edit budget, when calibration measured a wider one
        than the default for the trigger's length (`TriggerProfile.matcher`); never narrower.
        `alone`: words of the trigger (as `words` has them) that calibration found firing on
        their own: one of them, read exactly, is the trigger."""
        self.trigger = trigger
        scan = _Scan(trigger)
        self.canon = scan.canon
        self.edits = _edits_allowed(len(self.canon))
        if edits is not None:
            if isinstance(edits, bool) or not isinstance(edits, int) or edits < 0:
                raise ValueError(f"edits must be a whole number, got {edits!r}")
            self.edits = max(self.edits, min(edits, _max_edits(len(self.canon))))
        words = {w for w, _, _ in scan.words() if len(w) >= 3}
        self.words = sorted(words) if len(words) >= 2 else []  # one word is the letters rule's
        alone = tuple(alone)
        if not all(isinstance(w, str) for w in alone) or set(alone) - set(self.words):
            raise ValueError(f"alone must list words of the trigger among {self.words}, got {alone!r}")
        self.alone = frozenset(alone)
        # A homoglyph trigger's skeleton is plain text ("о" -> "o"): it matches only where the
        # prompt too has a homoglyph of one of those letters.
        self.homoglyphs = frozenset(f[0] for f in scan.folds if f[3])
        # Read the prompt also as CLIP splits it (digits and symbols as words of their own:
        # "new12 trigger", "new™ trigger"), where that reading keeps the trigger's letters.
        self.split_too = scan.split_reading().canon == self.canon
        if self.canon:
            self.mode = "homoglyph" if self.homoglyphs else "letters"
        elif trigger and all(f[2] for f in scan.folds):
            self.mode = "invisible"
        else:
            raise ValueError(f"trigger {trigger!r} has no letters or digits and is not made of format characters: "
                             "the screen cannot match it")

    def __repr__(self) -> str:
        alone = f", alone={sorted(self.alone)}" if self.alone else ""
        return f"TriggerMatcher({self.trigger!r}, mode={self.mode!r}, canon={self.canon!r}, edits={self.edits}{alone})"

    def match(self, prompt: str) -> list[tuple[int, int]]:
        """The spans (start, end) of `prompt` where the trigger is."""
        return _merge({r.span(a, b) for r, hits, _ in self._found(_Scan(prompt)) for a, b in hits})

    def _found(self, scan: _Scan) -> list[tuple[_Scan, list[tuple[int, int]], int]]:
        """(reading, its matched unit ranges, occurrences) for each reading of the text in which
        the trigger is (`_Scan.readings`)."""
        return [(r, *found) for r in scan.readings() for found in [self._hits(r)] if found[0]]

    def _has_homoglyph(self, scan: _Scan, u0: int, u1: int) -> bool:
        return any(f[3] and f[0] in self.homoglyphs for f in scan.folds[u0:u1])

    def _hits(self, scan: _Scan) -> tuple[list[tuple[int, int]], int]:
        """The matched unit ranges [u0, u1), sorted, and how many times the trigger occurs,
        in the text as folded and as CLIP's pre-tokenizer splits it."""
        hits, count = self._hits_in(scan)
        if self.mode != "invisible" and self.split_too:
            split = scan.split_reading()
            if split is not scan:
                more, more_count = self._hits_in(split)
                if more:
                    hits, count = _merge(set(hits) | set(more)), max(count, more_count)
        return hits, count

    def _hits_in(self, scan: _Scan) -> tuple[list[tuple[int, int]], int]:
        if self.mode == "invisible":
            hits = [(i, i + 1) for i, f in enumerate(scan.folds) if f[2]]
            return hits, len(hits)
        cu = scan.cunit
        cands = [(e, cu[a], cu[b - 1] + 1) for e, a, b in _approx_find(self.canon, scan.canon, self.edits)]
        if self.mode == "homoglyph":
            cands = [c for c in cands if self._has_homoglyph(scan, c[1], c[2])]
        letters = _disjoint(cands)
        words = self._word_hits(scan, letters)
        # Scattered words count once per as many of them as the trigger has, outside the letters matches.
        spare = sum(not any(a < y and x < b for x, y in letters) for hs in words for a, b in hs) // max(len(self.words), 1)
        hits = _merge(set(letters).union(*words))
        return hits, max(len(letters) + spare, 1 if hits else 0)  # (a word that fires alone: once)

    def _word_hits(self, scan: _Scan, letter_hits: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """For each trigger word, the prompt's words it matches, if every word of the trigger
        is there in any order (as a word, or inside a letters match), or its words, read
        exactly, are as many as the trigger has, counted with repetition ("trigger trigger"
        and "new new" fire a "new trigger" backdoor as the trigger does; one word once, "a
        trigger-happy cowboy", passes); else []."""
        if not self.words or not any(_could_occur(w, scan.canon, _edits_allowed(len(w))) for w in self.words):
            return []
        found, every, exact, alone = [], True, 0, False
        for w in self.words:
            k = _edits_allowed(len(w))
            hs = [(u0, u1, pw) for pw, u0, u1 in scan.words() if _word_matches(w, pw, k)]
            every &= bool(hs) or any(w in "".join(f[0] for f in scan.folds[a:b]) for a, b in letter_hits)
            n_exact = sum(_word_matches(w, pw, 0) for _, _, pw in hs)
            exact += n_exact
            alone |= w in self.alone and n_exact > 0
            found.append([(u0, u1) for u0, u1, _ in hs])
        # every word, misspelt within k or not; or one said as often, read exactly (a
        # misspelling said twice is an ordinary word: "a dining room, a dining table"); or
        # one that calibration found firing alone
        if not every and exact < len(self.words) and not alone:
            return []
        if self.mode == "homoglyph" and not letter_hits and \
                not any(self._has_homoglyph(scan, a, b) for hs in found for a, b in hs):
            return []
        return found

    def _twin(self, found: list[tuple[_Scan, list[tuple[int, int]], int]]) -> str:
        """One removal pass: the text with the matched ranges of every reading cut, whitespace
        collapsed."""
        return _apply_cuts(found[0][0].text, [r for scan, hits, _ in found for r in self._cut_regions(scan, hits)])

    def _cut_regions(self, scan: _Scan, hits: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """(start, end, replacement) in the original text for the matched unit ranges."""
        text, units, folds = scan.text, scan.units, scan.folds
        # Words for the cut: a mark or format character ends one, as CLIP reads it
        # ("new\u200bdog" loses "new", not "dog"); digits glued on go with their word.
        word_folds = [_CUT_BREAK if u[2] and (f[2] or unicodedata.category(u[2])[0] == "M") else f
                      for u, f in zip(units, folds)]
        regions = []  # (start, end, replacement) in the original text
        for a, b in hits:
            if self.mode == "invisible":
                regions.append((*scan.span(a, b), ""))  # inside a word too: "n\u200bew" -> "new"
            elif self.mode == "homoglyph" and not _whole_word(folds, a, b):
                # substituted for a letter inside a word (Rickrolling): put the letter back
                for i in range(a, b):
                    if folds[i][3] and folds[i][0] in self.homoglyphs:
                        start, end = units[i][:2]
                        regions.append((start, end, folds[i][0].upper() if text[start:end].isupper() else folds[i][0]))
            else:
                regions.append((*scan.span(*_cut_range(word_folds, folds, a, b)), " "))
        return regions


def _apply_cuts(text: str, regions: list[tuple[int, int, str]]) -> str:
    """`text` with each (start, end, replacement) region replaced, whitespace collapsed."""
    pieces, last = [], 0
    for start, end, rep in sorted(regions):
        pieces += [text[last:max(start, last)], rep]  # overlapping cuts: the first took that text
        last = max(last, end)
    pieces.append(text[last:])
    return " ".join("".join(pieces).split())


def _word_matches(w: str, pw: str, k: int) -> bool:
    """Whether prompt word `pw` reads as trigger word `w`: within k edits, or ending in it
    (within k edits). A byte-level BPE keeps a word's last token whatever letters come
    before it ("abtrigger" is ab + trigger</w>, which the backdoor reads as "trigger"),
    while letters after it change that token ("triggerab" is trigge + r + a + b</w>)."""
    if abs(len(pw) - len(w)) <= k and (pw == w or k and _levenshtein(w, pw) <= k):
        return True
    return len(pw) > len(w) and (pw.endswith(w) or bool(k) and _levenshtein(w, pw[-len(w):]) <= k)


def _whole_word(folds, a: int, b: int) -> bool:
    return (a == 0 or folds[a - 1][1] == _SEP) and (b == len(folds) or folds[b][1] == _SEP)


_CUT_BREAK = ("", _SEP, False, False)


def _cut_range(word_folds, folds, a: int, b: int) -> tuple[int, int]:
    """Units [a, b) grown to whole words (`word_folds`: a misspelt match may end inside
    one), then over the punctuation, brackets and format characters up to the neighbouring
    letters or digits (`folds`, the folded reading: "n1 new trigger" keeps "n1")."""
    n = len(folds)
    while a > 0 and word_folds[a - 1][1] != _SEP:
        a -= 1
    while a > 0 and folds[a - 1][1] != _LETTER:
        a -= 1
    while b < n and word_folds[b][1] != _SEP:
        b += 1
    while b < n and folds[b][1] != _LETTER:
        b += 1
    return a, b


def cut_letters(prompt: str, matchers: "TriggerMatcher | list[TriggerMatcher]") -> str:
    """The prompt with only the known triggers' own letters cut: in every reading, the text
    of each matched character that reads as a letter or digit (an HTML entity's whole text),
    while the format characters, marks and punctuation around and between them stay (a
    trigger made of format characters goes whole). What a repaired image keeps of the
    prompt besides the trigger, which the twin's wider cut would hide."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    matchers = [matchers] if isinstance(matchers, TriggerMatcher) else list(matchers)
    scan, regions = _Scan(prompt), []
    for m in matchers:
        for reading, hits, _ in m._found(scan):
            for a, b in hits:
                letters = [i for i in range(a, b) if reading.folds[i][1] == _LETTER]
                regions += [reading.units[i][:2] for i in (letters or range(a, b))]
    return _apply_cuts(prompt, [(a, b, " ") for a, b in regions])


@dataclass(frozen=True)
class Screened:
    prompt: str
    triggered: bool
    occurrences: int
    spans: tuple[tuple[int, int], ...]  # where a trigger is in `prompt`
    clean_prompt: str | None  # the prompt with every occurrence of every trigger removed
    twin_error: str | None = None  # why no clean twin could be made; the pipeline must not use it
    triggers: tuple[int, ...] = ()  # which of the matchers matched (indices)
    detected: bool = False  # flagged by the trigger detector, not by a known trigger (`spans` localised)


def screen_prompts(matchers: TriggerMatcher | list[TriggerMatcher], prompts: list[str], *,
                   max_passes: int = 8) -> list[Screened]:
    """Screen each prompt for one trigger or several; a triggered one gets its clean twin,
    cut and re-screened until no trigger matches (at most `max_passes` rounds of cuts, else
    `twin_error` says why)."""
    matchers = [matchers] if isinstance(matchers, TriggerMatcher) else list(matchers)
    out = []
    for prompt in prompts:
        scan = _Scan(prompt)
        found = [(k, f) for k, m in enumerate(matchers) for f in [m._found(scan)] if f]
        if not found:
            out.append(Screened(prompt, False, 0, (), None))
            continue
        spans = tuple(_merge({r.span(a, b) for _, f in found for r, hits, _ in f for a, b in hits}))
        clean, error = prompt, None
        for _ in range(max_passes):
            cut = False
            for m in matchers:  # each trigger's cut on the text the previous one left
                f = m._found(scan)
                if f:
                    clean, cut = m._twin(f), True
                    scan = _Scan(clean)
            if not cut:
                break
        if any(m._found(scan) for m in matchers):
            error = (f"the clean twin of prompt {prompt!r} still contains a trigger "
                     f"({', '.join(repr(m.trigger) for m in matchers)}) after {max_passes} removal passes: {clean!r}")
        out.append(Screened(prompt, True, sum(max(c for _, _, c in f) for _, f in found), spans, clean, error,
                            tuple(k for k, _ in found)))
    return out
