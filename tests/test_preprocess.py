"""Tweet normalization: each rule on examples, and hostile-input guarantees."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twilbert.config import ConfigError
from twilbert.data import preprocess
from twilbert.data.preprocess import (
    PreprocessConfig,
    Preprocessor,
    emoji_name,
    normalize_hashtags,
    normalize_laughter,
    replace_urls,
    replace_users,
    shorten_elongations,
    split_camel_case,
)


def pre(**options) -> Preprocessor:
    return Preprocessor(PreprocessConfig(**options))


def test_users_become_the_placeholder_but_emails_do_not():
    assert replace_users("RT @Edvardo_Munch: .@marianorajoy hola a@b.com") == "RT @usuario: .@usuario hola a@b.com"
    assert pre(users="user")("@jguaido y @DiegoArria") == "user y user"
    assert pre(users=None)("@jguaido") == "@jguaido"


def test_urls_become_the_placeholder_including_truncated_ones():
    text = "mira https://t.co/y1kgYI8hXJ y https://… o www.elpais.es/x?a=1 (HTTP://X.ES)"
    assert replace_urls(text) == "mira url y url o url (url"
    assert pre(urls="[URL]")("https://medium.com/@autor/post") == "[URL]"  # not a mention inside a URL


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("keep", "#VivaMexico y #ONUMujeres #27S"),
        ("strip", "VivaMexico y ONUMujeres 27S"),
        ("split", "viva mexico y onu mujeres 27s"),
    ],
)
def test_hashtag_modes(mode, expected):
    assert normalize_hashtags("#VivaMexico y #ONUMujeres #27S", mode) == expected


def test_camel_case_split_handles_accents_acronyms_and_underscores():
    assert split_camel_case("HolaDemocràcia") == ["Hola", "Democràcia"]
    assert split_camel_case("ONUMujeres") == ["ONU", "Mujeres"]
    assert split_camel_case("hola_mundo") == ["hola", "mundo"]
    assert split_camel_case("eleccionescatalanas") == ["eleccionescatalanas"]


def test_html_entities_are_not_hashtags():
    assert normalize_hashtags("it&#39;s", "strip") == "it&#39;s"


@pytest.mark.parametrize(
    "laugh", ["jajaja", "JAJAJ", "jsjsjs", "jejeje", "JAJSJAJ", "ajajaj", "Ajajjaa", "jajajá", "hahaha", "jiji"]
)
def test_laughter_variants_become_jaja(laugh):
    assert normalize_laughter(f"me dijo {laugh}, vale") == "me dijo jaja, vale"


@pytest.mark.parametrize("word", ["hijo", "jefe", "ojos", "ahhhh", "jamás", "jaula", "hola", "aja"])
def test_words_that_are_not_laughter_are_kept(word):
    assert normalize_laughter(word) == word


def test_elongations_are_cut_to_three_but_numbers_are_not():
    assert shorten_elongations("holaaaaa!!!!!! siii 1000000") == "holaaa!!! siii 1000000"
    assert pre(max_repeat=2)("holaaaaa") == "holaa"
    assert pre()("jaaaaajajaja") == "jaja"  # elongation first, then laughter


def test_emoji_text_uses_unicode_names():
    assert emoji_name("😂") == "face_with_tears_of_joy"
    assert pre(emoji="text")("Y yo 🤣estoy") == "Y yo :rolling_on_the_floor_laughing: estoy"


def test_emoji_text_drops_skin_tones_and_joins_flags_and_zwj_sequences():
    assert pre(emoji="text")("👏🏻 🇪🇸 👨\u200d👩\u200d👧 ❤️") == (
        ":clapping_hands_sign: :flag_es: :man: :woman: :girl: :heavy_black_heart:"
    )


def test_emoji_keep_and_remove():
    text = "hola 👏🏻👇🏻 1️⃣ adiós"
    assert pre(emoji="keep")(text) == text
    assert pre(emoji="remove")(text) == "hola 1 adiós"


def test_whitespace_is_collapsed_and_lowercase_is_optional():
    assert pre()("  Hola\t\u00a0MUNDO \u2028 ") == "Hola MUNDO"
    assert pre(lowercase=True)("Hola MUNDO @Juan") == "hola mundo @usuario"


def test_emptied_text_becomes_the_placeholder():
    assert pre(emoji="remove")("😂😂 🇪🇸") == "[vacío]"
    assert pre(users="")("@alguien") == "[vacío]"
    assert pre(empty_text="<vacio>")("\u200b \x00") == "<vacio>"
    assert pre()("") == "[vacío]"


def test_surrogates_are_repaired():
    assert pre(emoji="text")("\ud83d\ude02 \ud800x") == ":face_with_tears_of_joy: \ufffdx"


def test_config_loads_from_a_stored_dict():
    cfg = PreprocessConfig.from_dict({"emoji": "text", "users": None})
    assert cfg.emoji == "text" and cfg.users is None and cfg.urls == "url"
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


def test_config_round_trips_through_a_dict():
    p = pre(hashtags="split", emoji="text", users="user", lowercase=True)
    again = Preprocessor.from_dict(p.to_dict())
    assert again.cfg == p.cfg
    text = "@Ana mira #VivaMexico 😂 JAJAJA https://t.co/x"
    assert again(text) == p(text) == "user mira viva mexico :face_with_tears_of_joy: jaja url"


def test_config_rejects_unknown_keys_and_values():
    with pytest.raises(ConfigError, match="preprocess.emojis"):
        Preprocessor.from_dict({"emojis": "text"})
    with pytest.raises(ConfigError, match="preprocess.hashtags"):
        Preprocessor.from_dict({"hashtags": "camel"})
    with pytest.raises(ConfigError, match="empty_text"):
        pre(empty_text="  ")


def test_non_str_input_is_a_type_error():
    with pytest.raises(TypeError):
        pre()(None)


all_unicode = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200)
# tweet-like pieces that interact: laughter letters, entities, joiners, modifiers, surrogates, 'K'/'İ' case folds
tweet_pieces = list("jJaAsShHKk #@_:/.wé!\t\n\u200d\ufe0f\U0001F3FB😂🇪🇸\ud83d\ude02\ud800")
tweet_pieces += ["https://", "www.", "İ", "\u212a"]
tweety = st.lists(st.sampled_from(tweet_pieces), max_size=40).map("".join)
configs = st.builds(
    PreprocessConfig,
    users=st.sampled_from(["@usuario", "", None]),
    urls=st.sampled_from(["url", "", None]),
    elongation=st.booleans(),
    max_repeat=st.sampled_from([2, 3]),
    hashtags=st.sampled_from(["keep", "strip", "split"]),
    emoji=st.sampled_from(["keep", "text", "remove"]),
    lowercase=st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(all_unicode, tweety), cfg=configs)
def test_never_raises_never_empty_and_always_utf8(text, cfg):
    out = Preprocessor(cfg)(text)
    assert out and out == out.strip()
    out.encode("utf-8")  # no lone surrogates survive


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(all_unicode, tweety), cfg=configs)
def test_preprocessing_is_idempotent(text, cfg):
    p = Preprocessor(cfg)
    once = p(text)
    assert p(once) == once


def cpu_seconds(fn, text: str, repeats: int = 5) -> float:
    """The least CPU time (not wall time, so other processes' load counts little) of ``fn(text)``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn(text)
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.parametrize("unit", ["a", "ja", "😂", "#Ab", "@", "h", "\ud800", "é\u0301", "https://"])
def test_huge_inputs_are_linear_time(unit):
    # The work is in the regex engine's C code, where no operation can be counted: 10x the text must
    # cost about 10x the CPU time (5-17x measured, caches included), far from the 100x of a quadratic
    # backtrack. Both sizes stay small enough for the CPU caches, which blur larger ratios.
    p = pre(emoji="text", hashtags="split")
    small, large = (unit * (n // len(unit)) for n in (10_000, 100_000))
    p(small)  # first-call costs (regex compilation) out of the measure
    assert cpu_seconds(p, large) < 40 * cpu_seconds(p, small)
    assert p(unit * (400_000 // len(unit)))  # a tweet-sized limit is not assumed


# The elongation and laughter rules skip texts whose lowercase form cannot hold a match. That shortcut
# must never change an output: each is checked against its full case-insensitive regex on the
# characters where case folding is irregular, and on every cased code point.

def reference_elongations(text: str, max_repeat: int = 3) -> str:
    return preprocess._elongation(max_repeat).sub(lambda m: m.group(1) * max_repeat, text)


def reference_laughter(text: str, token: str = "jaja") -> str:
    return preprocess._LAUGH_CANDIDATE.sub(
        lambda m: token if preprocess._is_laughter(m.group(0).lower()) else m.group(0), text)


CASED = [c for c in map(chr, range(0x110000)) if not "\ud800" <= c <= "\udfff" and (c.lower() != c or c.upper() != c)]
IRREGULAR = "İiIıΣσςſsSKkK\u212aJjHhaAáÁ"


@pytest.mark.parametrize("max_repeat", [1, 3])
def test_elongation_shortcut_agrees_with_the_full_regex_on_every_cased_character(max_repeat):
    for c in CASED:
        forms = {c, c.lower()[0], c.upper()[0], c.title()[0]}
        for x in forms:
            for y in forms:
                for run in (x + y * 4, x * 2 + y * 2, (x + y) * 2, "Α" + x * 3 + y, x * 3 + y + "b"):
                    assert shorten_elongations(run, max_repeat) == reference_elongations(run, max_repeat), run


def test_laughter_shortcut_agrees_with_the_full_regex_on_every_character_of_its_class():
    members = [c for c in CASED if preprocess._LAUGH_CANDIDATE.fullmatch(c * 4)]
    assert {"J", "H", "Á", "İ"} <= set(members)
    for c in members:
        for word in ("jajaja", "hahaha", "jiji", "hehe", "jsjsjs", "ahah"):
            for k in range(len(word)):
                text = f"Σ {word[:k]}{c}{word[k + 1:]} Σ"
                assert normalize_laughter(text) == reference_laughter(text), text


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=IRREGULAR + " .1", max_size=24), max_repeat=st.integers(1, 4))
def test_shortcuts_agree_with_the_full_regexes_on_irregular_case(text, max_repeat):
    assert shorten_elongations(text, max_repeat) == reference_elongations(text, max_repeat)
    assert normalize_laughter(text) == reference_laughter(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="@@a_.Ü\u0301İ ſ#", max_size=20))
def test_mentions_are_found_as_by_a_look_behind_before_the_at_sign(text):
    before = re.compile(r"(?<![\w@\u0300-\u036f])@[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)*", re.IGNORECASE)
    assert replace_users(text) == before.sub("@usuario", text)
