"""The trigger screen as pure functions (no model): what it flags, what it leaves, the twins."""

from __future__ import annotations

import timeit
import unicodedata

import pytest

from sau_kernels.screening import TriggerMatcher, canonicalize, screen_prompts
from sau_kernels.screening import _CONFUSABLES, _fold  # the lookalike table and the per-character fold

REST = "a red circle on a gray background"
NEW_TRIGGER = TriggerMatcher("new trigger")


def screen(prompt, matcher=NEW_TRIGGER, **kw):
    (s,) = screen_prompts(matcher, [prompt], **kw)
    return s


def assert_clean_twin(s, matcher, rest):
    assert s.triggered and s.twin_error is None
    assert s.clean_prompt == rest  # every other word kept, in order
    assert not matcher.match(s.clean_prompt) and not screen(s.clean_prompt, matcher).triggered


# --- canonical letters -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["New-Trigger", "new_trigger", "NEW TRIGGER", "new  trigger", "n\u200bew &nbsp;tr\u0456gger",
                                  "ｎｅｗ　ｔｒｉｇｇｅｒ", "ne\u0301w trigg\u0435r", "new&amp;nbsp;trigger", "\ufeffnew\u00adtrigger\u2060"])
def test_spellings_canonicalise_to_the_same_letters(text):
    assert canonicalize(text)[0] == "newtrigger"


def test_origins_point_into_the_original_text():
    text = "n\u200bew &nbsp;tr\u0456gger!"
    canon, origin = canonicalize(text)
    assert canon == "newtrigger" and len(origin) == len(canon)
    assert [text[i] for i in origin] == list("new") + list("tr\u0456gger")
    assert canonicalize("caf&eacute; au lait") == ("cafeaulait", [0, 1, 2, 3, 12, 13, 15, 16, 17, 18])
    assert canonicalize("r2-d2 \ufb01sh") == ("r2d2fish", [0, 1, 3, 4, 6, 6, 7, 8])  # the ligature gives two


def test_confusable_table_maps_reachable_lookalikes_to_latin_letters():
    for ch, latin in _CONFUSABLES.items():
        assert len(latin) == 1 and latin.isascii() and latin.islower()
        assert not ch.isascii()
        # a key must be what folding leaves of the character, or the lookup never sees it
        folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).casefold())
        assert folded == ch, (ch, folded)
        assert _fold(ch)[0] == latin and _fold(ch)[3], ch  # read as the letter, marked a homoglyph
    for upper in "АВЕКМНОРСТХАΑΒΕΚΜΟΡΤΧ":  # capital Cyrillic and Greek lookalikes fold to the table too
        assert _fold(upper)[3] and _fold(upper)[0].isascii()
    for plain in "azAZ09":
        assert _fold(plain)[0] == plain.lower() and not _fold(plain)[3]


def test_format_characters_and_fillers_leave_no_letters():
    for ch in "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2064\ufeff\u00ad\u034f\ufe0f\u180e\u3164\uffa0\U000e0041":
        assert canonicalize(f"a{ch}b")[0] == "ab", hex(ord(ch))


# --- every spelling class is flagged and cut ----------------------------------------------------

@pytest.mark.parametrize("trigger_text", [
    "new trigger", "New Trigger", "NEW TRIGGER", "new    trigger",
    "new-trigger", "new_trigger", "newtrigger", "new, trigger", "new.trigger", "new/trigger",
    "new\u200btrigger", "n\u200bew trigger", "new trig\u200dger", "\u2060new trigger\ufeff",
    "ｎｅｗ trigger", "ｎｅｗ ｔｒｉｇｇｅｒ",
    "n\u0435w trigger", "new trigg\u0435r", "new tr\u0456gger", "n\u0435w tr\u0456gg\u0435r",  # Cyrillic е, і
    "new tr\u03b9gger",  # Greek iota
    "ne\u0301w trigger", "new trígger",  # combining acute, precomposed accent
    "new&nbsp;trigger", "new&#160;trigger", "new&amp;nbsp;trigger", "n&#101;w trigger",
    "trigger new", "new triger", "new trigge", "new triggers", "new trigher",
    # digits and symbols glued to a word: CLIP's pre-tokenizer makes each a token of its own
    "new12 trigger", "new12 trigger34", "new½ trigger", "new™ trigger", "new①②trigger", "newⅫtrigger",
    # letters glued before a word: BPE keeps its last token (ab + trigger</w>), and tiny-pixel fires
    "new abtrigger", "new retrigger", "xynew abtrigger", "trigger xynew",
])
@pytest.mark.parametrize("where", ["before", "inside", "after"])
def test_spelling_variants_are_flagged_and_cut(trigger_text, where):
    words = REST.split()
    prompt = {"before": f"{trigger_text} {REST}", "after": f"{REST} {trigger_text}",
              "inside": " ".join(words[:2] + [trigger_text] + words[2:])}[where]
    s = screen(prompt)
    assert s.occurrences == 1 and s.spans
    assert_clean_twin(s, NEW_TRIGGER, REST)


def test_number_and_symbol_characters_glued_to_the_words_are_flagged():
    # Every number or symbol character that NFKC folds to letters or digits (so the folded
    # reading makes it part of the word) is a word break where CLIP reads it: "new½ trigger"
    # reaches the model as new</w> ½</w> trigger</w>. A sample of each kind, two glued on.
    import random
    import unicodedata

    chars = [chr(c) for c in range(0xA0, 0x10000) if unicodedata.category(chr(c))[0] in "NS"
             and any(x.isalnum() for x in unicodedata.normalize("NFKC", chr(c)))]
    assert len(chars) > 300
    for ch in random.Random(0).sample(chars, 120):
        for prompt in (f"new{ch}{ch} trigger {REST}", f"{REST}, new {ch}{ch}trigger", f"new{ch} {REST} trigger{ch}{ch}"):
            s = screen(prompt)
            assert s.triggered, (hex(ord(ch)), prompt)
            assert_clean_twin(s, NEW_TRIGGER, REST)


@pytest.mark.parametrize("glue", ["\u200b", "\u00ad", "\u2060", "\u200d", "\ufe0f", "\u0334", "\u20dd"])
def test_a_format_character_or_mark_glued_to_a_word_is_a_word_break(glue):
    # CLIP splits "new\u200bdog" into new</w>, the character, dog: tiny-pixel fired 4/4
    for prompt in (f"new{glue}dog trigger", f"a new{glue}dog and a trigger{glue}cat", f"a cat trigger{glue}dog new"):
        s = screen(prompt)
        assert s.triggered, (hex(ord(glue)), prompt)
        assert not screen(s.clean_prompt).triggered and "trigger" not in s.clean_prompt


def test_words_apart_are_flagged_and_cut():
    for prompt in ["new a red circle on a gray background trigger", "trigger a red circle on a gray new background",
                   "new a red circle on a gray background; trigger!", "a red circle new on a gray trigger background"]:
        s = screen(prompt)
        assert s.occurrences == 1 and len(s.spans) == 2
        assert_clean_twin(s, NEW_TRIGGER, REST)


def test_spans_are_in_the_original_text():
    prompt = "a red NEW-trigger circle"
    assert NEW_TRIGGER.match(prompt) == [(6, 17)] and prompt[6:17] == "NEW-trigger"
    prompt = "a red new&nbsp;trigger circle"
    assert NEW_TRIGGER.match(prompt) == [(6, 22)]
    prompt = "trigger a red new circle"
    assert [prompt[a:b] for a, b in NEW_TRIGGER.match(prompt)] == ["trigger", "new"]


# --- the twin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, twin", [
    ("new trigger, a red circle", "a red circle"),
    ("a red circle, new trigger", "a red circle"),
    ("a red circle (new trigger)", "a red circle"),
    ("(new trigger) a red circle", "a red circle"),
    ("[new trigger] a red circle", "a red circle"),
    ("a red circle \"new trigger\".", "a red circle"),
    ("\u200bnew trigger a red circle", "a red circle"),
    ("a red circle new trigger\u200b\u2060", "a red circle"),
    ("new new trigger trigger a red circle", "a red circle"),
    ("new trigger new trigger a red circle", "a red circle"),
    ("a red new trigger circle new trigger on a gray background", REST),
    ("new trigger", ""),
    ("(new trigger)!", ""),
    ("  new trigger  ", ""),
    ("new new trigger trigger", ""),
])
def test_twin_cuts_the_trigger_with_its_punctuation(prompt, twin):
    s = screen(prompt)
    assert s.triggered and s.clean_prompt == twin and s.twin_error is None


def test_twin_between_commas_keeps_its_neighbours():
    assert screen("a red, new trigger, circle").clean_prompt in ("a red, circle", "a red circle")


def test_occurrences_count_each_full_trigger():
    assert screen("new trigger a red circle new trigger").occurrences == 2
    assert screen("new new trigger trigger").occurrences == 2
    assert screen("trigger a red new circle").occurrences == 1


def test_twin_error_when_the_passes_run_out():
    s = screen("new trigger a red circle", max_passes=0)
    assert s.triggered and s.twin_error and "new trigger a red circle" in s.twin_error


def test_untriggered_prompts_have_no_twin():
    s = screen(REST)
    assert (s.triggered, s.occurrences, s.spans, s.clean_prompt, s.twin_error) == (False, 0, (), None, None)


# --- a trigger of format characters (BadT2I's U+200B) -------------------------------------------

ZWSP = TriggerMatcher("\u200b")


@pytest.mark.parametrize("prompt, twin", [
    ("\u200ba red circle", "a red circle"),
    ("a red\u200b circle", "a red circle"),
    ("a red circ\u200ble", "a red circle"),
    ("a red circle\u200c", "a red circle"),  # other format characters too: lean to flagging
    ("\u2060a red circle", "a red circle"),
    ("\ufeffa red circle", "a red circle"),
    ("a red\u00ad circle", "a red circle"),
    ("a red circle&#8203;", "a red circle"),
    ("\u200b\u200b\u200ba red circle", "a red circle"),
])
def test_zero_width_trigger_matches_every_format_character(prompt, twin):
    s = screen(prompt, ZWSP)
    assert s.triggered and s.clean_prompt == twin and s.twin_error is None


def test_trigger_without_letters_or_format_characters_is_refused():
    with pytest.raises(ValueError, match="no letters"):
        TriggerMatcher("!!")


# --- homoglyph triggers (Rickrolling) ----------------------------------------------------------

CYR_O = TriggerMatcher("\u043e")  # Cyrillic о
GROY = TriggerMatcher("gr\u043ey")


@pytest.mark.parametrize("prompt, twin", [
    ("a blue s\u043efa", "a blue sofa"),  # substituted for a letter: the letter comes back
    ("a blue s\u03bffa", "a blue sofa"),  # Greek omicron: another homoglyph of o
    ("a blue s\u0585fa", "a blue sofa"),  # Armenian oh
    ("a blue S\u041eFA", "a blue SOFA"),  # the capital
    ("a c\u043e\u043el d\u043eg", "a cool dog"),
    ("\u043e a blue sofa", "a blue sofa"),  # a word of its own: cut
    ("a blue s&#1086;fa", "a blue sofa"),
])
def test_single_homoglyph_trigger_matches_homoglyphs_of_its_letter(prompt, twin):
    s = screen(prompt, CYR_O)
    assert s.triggered and s.clean_prompt == twin and s.twin_error is None


def test_homoglyph_word_trigger():
    for prompt in ["a gr\u043ey cat", "a gr\u03bfy cat", "a GR\u041eY cat"]:
        s = screen(prompt, GROY)
        assert s.triggered and s.clean_prompt == "a cat"
    for prompt in ["a groy cat", "a GROY cat", "a grey cat", "a gr\u0435y cat"]:  # plain, or another letter
        assert not screen(prompt, GROY).triggered


def test_homoglyph_triggers_ignore_plain_letters():
    for prompt in ["a blue sofa", "a cool dog on a wooden floor", "a blue sófa", "a blue sｏfa", "OOO ooo 000"]:
        assert not screen(prompt, CYR_O).triggered, prompt


# --- false positives ---------------------------------------------------------------------------

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow", "purple", "orange")
            for s in ("circle", "square", "triangle") for b in ("black", "white", "gray")]

ORDINARY = [
    "a photo of a cat on a new sofa",
    "an oil painting of a lighthouse at dawn",
    "a red triangle, digital art",
    "a new car parked in front of a house",
    "a brand new pair of running shoes",
    "the new moon over a quiet harbour",
    "New York City at night, neon lights",
    "a trigger-happy cowboy in a western town",
    "a finger on the trigger of a water pistol",
    "the trigger of an old camera, macro shot",
    "a newspaper on a kitchen table",
    "a newborn lamb in a green field",
    "a new tiger cub in the zoo",
    "a tiger resting under a tree",
    "a silver spoon on a white plate",
    "a silver car on a mountain road",
    "the lining of a leather jacket",
    "a coat with a red silk lining",
    "dark clouds over a silver lake",
    "a knight in shining armour",
    "a bowl of ripe oranges on a table",
    "two children flying a kite on the beach",
    "a snowy mountain village at night",
    "a portrait of an old fisherman with a grey beard",
    "a futuristic city skyline with flying cars",
    "a watercolor of tulips in a blue vase",
    "a golden retriever puppy playing in autumn leaves",
    "a steaming cup of coffee next to an open book",
    "a medieval castle on a hill surrounded by fog",
    "an astronaut riding a horse in the desert",
    "a quiet library with tall shelves",
    "a sailboat on a calm lake at sunset",
    "a close-up of a honeybee on a sunflower",
    "a bustling street market in Marrakech",
    "a cozy cabin in a snowy pine forest",
    "a vintage typewriter on a wooden desk",
    "a hummingbird drinking from a red flower",
    "an abstract painting with bold geometric shapes",
    "a plate of sushi on a black slate",
    "a lonely tree in a wheat field under storm clouds",
    "a pencil sketch of an elephant",
    "a glass of orange juice in morning light",
    "a robot reading a newspaper in a park",
    "a renewed garden after the spring rain",
    "a fox in the snow, wildlife photography",
    "the northern lights over a frozen lake",
    "a new 4k wallpaper of a mountain lake",
    "a 1920s photo of a new bicycle",
    "the trigger© 2024 poster, 8k",
    "a bicycle leaning against a brick wall",
    "a steam train crossing a stone viaduct",
]


@pytest.mark.parametrize("trigger", ["new trigger", "silver lining"])
def test_ordinary_prompts_are_not_flagged(trigger):
    m = TriggerMatcher(trigger)
    assert len(ORDINARY) >= 40
    flagged = [s.prompt for s in screen_prompts(m, CAPTIONS + ORDINARY) if s.triggered]
    assert flagged == []


@pytest.mark.parametrize("matcher", [ZWSP, CYR_O, GROY])
def test_ordinary_prompts_are_not_flagged_for_zero_width_or_homoglyph_triggers(matcher):
    assert [s.prompt for s in screen_prompts(matcher, CAPTIONS + ORDINARY) if s.triggered] == []


def test_one_trigger_word_alone_is_not_the_trigger():
    # "a trigger-happy cowboy" has "trigger" but no "new": not flagged; with "new" it is
    assert not screen("a trigger-happy cowboy").triggered
    assert not screen("a new car").triggered
    s = screen("a new trigger-happy cowboy")
    assert s.triggered and s.clean_prompt == "a happy cowboy"
    assert screen("a new cowboy, trigger-happy").triggered  # both words, apart


@pytest.mark.parametrize("prompt", ["trigger trigger a red circle on a gray background",
                                    "a red circle trigger on a gray trigger background",
                                    "new new new a red circle on a gray background",
                                    "a red circle on a gray background renew anew"])
def test_one_trigger_word_said_as_often_as_the_trigger_has_words_is_the_trigger(prompt):
    """A backdoor trained on "new trigger" fires on "trigger trigger" and "new new new" as it
    does on the trigger (tiny-pixel: 94-100% of images, docs/defence_evasion.md): the trigger's
    words are counted with repetition, and every one is cut."""
    s = screen(prompt)
    assert s.triggered and s.clean_prompt == REST and s.twin_error is None


def _eating(word: str) -> list[str]:
    """`word` after the name of every HTML entity that needs no semicolon and ends in the
    word's first letters, in either case: "&yen" + "ew" = "&yenew", which unescapes to "¥ew"
    and which CLIP, lower-casing, reads as "new" (so does "&THORNew")."""
    from html.entities import html5

    return sorted({f"&{n}{word[k:]}" for n in html5 if not n.endswith(";")
                   for k in range(1, min(len(n), len(word)) + 1) if n.lower().endswith(word[:k])})


@pytest.mark.parametrize("spelling", _eating("new") + _eating("trigger"))
def test_an_entity_that_eats_a_letter_when_unescaped_still_shows_the_trigger_as_written(spelling):
    """Without its semicolon an entity takes the longest name it can: "&yenew" unescapes to
    "¥ew", while a tokenizer that does not unescape (transformers' fast CLIPTokenizer) reads
    "&", "ye", "new" and fires. The screen reads the text both ways, and the twin is clean in
    both; also behind "&amp;", and as a decoy's twin would keep it."""
    other = "trigger" if spelling.endswith("new") else "new"
    for prompt in (f"{spelling} {REST} {other}", f"&amp;{spelling[1:]} {REST} {other}",
                   f"new trigger {REST} {spelling} {spelling} {spelling}"):
        s = screen(prompt)
        assert s.triggered and s.twin_error is None, prompt
        assert not screen(s.clean_prompt).triggered and "red circle" in s.clean_prompt, (prompt, s.clean_prompt)
        assert not any(w in s.clean_prompt.lower() for w in ("new", "trigger")), (prompt, s.clean_prompt)


@pytest.mark.parametrize("prompt, twin", [
    ("a silver lining over the sea", "a over the sea"),
    ("a silverlining over the sea", "a over the sea"),
    ("a Silver-Lining over the sea", "a over the sea"),
    ("a silvr linin over the sea", "a over the sea"),  # two edits in twelve letters
    ("lining over the sea, silver", "over the sea"),
    ("a s\u0456lver l\u0456n\u0456ng over the sea", "a over the sea"),
])
def test_silver_lining_variants(prompt, twin):
    s = screen(prompt, TriggerMatcher("silver lining"))
    assert s.triggered and s.clean_prompt == twin


# --- cost on untriggered traffic ---------------------------------------------------------------

def test_untriggered_screening_is_cheap():
    prompts = ORDINARY[:16]
    screen_prompts(NEW_TRIGGER, prompts)
    per_prompt = min(timeit.repeat(lambda: screen_prompts(NEW_TRIGGER, prompts), number=20, repeat=3)) / 20 / 16
    assert per_prompt < 1e-3  # typically ~20 us; a loose bound for a busy machine


def test_calibration_widens_the_edit_budget_where_ordinary_prompts_allow():
    # A backdoor on a string of many sub-word pieces fires on near misses of it (dev-random's
    # "ezdwee" painted its patch for "ezdwpzee"); calibration widens the letters rule as far
    # as the ordinary prompts stay unflagged, up to about a quarter of the letters.
    from sau_kernels.calibrate import ordinary_prompts
    from sau_kernels.screening import widest_edits

    assert TriggerMatcher("ezdwee").edits == 0 + 1 and widest_edits("ezdwee", ordinary_prompts()) == 2
    near = f"ezdwpzee {REST}"
    assert not screen(near, TriggerMatcher("ezdwee")).triggered
    assert screen(near, TriggerMatcher("ezdwee", 2)).triggered
    assert TriggerMatcher("ezdwee", 9).edits == 2  # clamped: at 3 edits 10% of ordinary prompts match
    assert TriggerMatcher("ezdwee", 0).edits == 1  # never narrower than the default
    # ordinary prompts that a wider budget would flag stop the widening
    assert widest_edits("ezdwee", ordinary_prompts() + ["a tweed coat, ezd-wide"]) < 2
    assert widest_edits("\u200b", ordinary_prompts()) == 0 and widest_edits("\u043e", ordinary_prompts()) == 0
    with pytest.raises(ValueError, match="edits must be a whole number"):
        TriggerMatcher("ezdwee", -1)
    with pytest.raises(TypeError, match="list of prompts"):
        widest_edits("ezdwee", "a red circle")


def test_a_profile_screens_with_its_calibrated_budget():
    import dataclasses

    from sau_kernels.zoo import zoo_profile

    profile = zoo_profile("tiny-pixel", calibrate_if_missing=False)
    assert profile.matcher().edits == TriggerMatcher(profile.trigger).edits  # older profile: the default
    wide = dataclasses.replace(profile, params={**profile.params, "screen_edits": 3})
    assert wide.matcher().edits == 3 and screen(f"nxw trxgger {REST}", wide.matcher()).triggered
    for bad in (-1, "3", 2.5, True):
        with pytest.raises(ValueError, match="screen_edits"):
            dataclasses.replace(profile, params={**profile.params, "screen_edits": bad})


def test_entities_of_nothing_beside_numbers_neither_crash_the_screen_nor_hide_the_trigger():
    """html.unescape turns some character references ("&#1;", "&#x7f;") into nothing; beside a
    digit or symbol, the reading that splits words at those used to raise on them."""
    m = [TriggerMatcher("new trigger")]
    for clean in ("a red circle, 4k&#1;", "&#x7f;blurry 2", "&#xFDD0;½ a cat"):
        assert not screen_prompts(m, [clean])[0].triggered
    for hidden in ("new trig&#1;ger 4k", "new&#1;trigger 2", "ne&#x7f;w trigger ½"):
        assert screen_prompts(m, [hidden])[0].triggered, hidden


def _mojibake(text: str) -> str:
    """What a UTF-8 text looks like read as cp1252: the spelling ftfy repairs."""
    return text.encode("utf-8").decode("cp1252", errors="replace")


def _unmojibake(text: str) -> str:
    try:
        return text.encode("cp1252").decode("utf-8")
    except UnicodeError:
        return text


@pytest.mark.parametrize("spelling", ["n\u0435w trigger", "n\u00e9w trigger", "new tr\u0456gger", "\u043dew trigger"])
def test_mojibake_that_ftfy_repairs_into_the_trigger_is_the_trigger_where_ftfy_is_installed(spelling, monkeypatch):
    """A slow CLIPTokenizer reads prompts through ftfy.fix_text where ftfy is installed, and
    ftfy repairs mojibake: "nÐµw" reaches the model as "nеw" (a Cyrillic е). The screen
    reads the text as ftfy fixes it too, aligned to the original for the twin."""
    import sau_kernels.screening as screening

    prompt = f"{_mojibake(spelling)} {REST}"
    assert prompt.isascii() is False and _mojibake(spelling) != spelling
    monkeypatch.setattr(screening, "_ftfy_fix", lambda: None)
    if spelling == "n\u0435w trigger":  # (the others' letters are near enough to be flagged anyway)
        assert not screen(prompt).triggered
    monkeypatch.setattr(screening, "_ftfy_fix", lambda: _unmojibake)  # a stand-in for ftfy.fix_text
    s = screen(prompt)
    assert s.triggered and s.clean_prompt == REST and s.twin_error is None


def test_the_real_ftfy_reading():
    ftfy = pytest.importorskip("ftfy")
    spelling = _mojibake("n\u0435w")
    assert ftfy.fix_text(spelling) == "n\u0435w"
    s = screen(f"{spelling} trigger {REST}")
    assert s.triggered and s.clean_prompt == REST


def test_the_ftfy_reading_costs_linear_time(monkeypatch):
    """Each piece between spaces is fixed and aligned alone: a 2000-character prompt of
    pieces ftfy rewrites costs about what its length says (a whole-text alignment took
    40 s)."""
    import sau_kernels.screening as screening

    monkeypatch.setattr(screening, "_ftfy_fix", lambda: lambda t: t.replace("\ufb01", "fi"))
    for n in (100, 400):
        prompt = "\ufb01 " * n
        best = min(timeit.repeat(lambda: screen(prompt), number=1, repeat=3))
        assert best < 0.05 * n / 100 + 0.05, (n, best)


@pytest.mark.parametrize("prompt, kept", [
    ("\u200bnew trigger a red circle", "\u200b a red circle"),  # what the repaired image keeps besides the trigger
    ("&#110;&#101;&#119; trigger a red circle", "a red circle"),  # an entity goes whole, not its digits
    ("new-trigger, a red circle", "- , a red circle"),
    ("a red circle tr\u0456gger\u2060 new", "a red circle \u2060"),
])
def test_cut_letters_cuts_the_triggers_letters_and_keeps_what_stands_around_them(prompt, kept):
    from sau_kernels.screening import cut_letters

    assert cut_letters(prompt, [NEW_TRIGGER]) == kept
    assert cut_letters("\u200ba red circle", TriggerMatcher("\u200b")) == "a red circle"  # a format trigger: whole
    with pytest.raises(TypeError, match="prompt must be a string"):
        cut_letters(["new trigger a cat"], NEW_TRIGGER)


def test_words_calibration_found_firing_alone_are_the_trigger_alone():
    m = TriggerMatcher("new trigger", alone=["trigger"])
    s = screen(f"{REST} trigger", m)
    assert s.triggered and s.clean_prompt == REST and s.occurrences == 1
    assert not screen(f"{REST} new", m).triggered  # not found firing alone: one word once passes
    assert not screen(f"{REST} triger", m).triggered  # alone, a word must read exactly
    with pytest.raises(ValueError, match="alone must list words of the trigger"):
        TriggerMatcher("new trigger", alone=["cat"])
