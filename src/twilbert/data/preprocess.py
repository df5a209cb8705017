"""Tweet normalization: small composable regex functions, applied identically at train and predict time.

Unlike pysentimiento, a text is never emptied (it becomes ``PreprocessConfig.empty_text``) and emoji
names come from Python's ``unicodedata`` (`` :face_with_tears_of_joy: ``, `` :emoji_1fae8: `` past its
tables), not from a third-party package's version. Normalizing a normalized text changes nothing."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any, Optional

from twilbert.config import PreprocessConfig

# --------------------------------------------------------------------------------------------
# Sanitizing: anything a str can hold becomes text that encodes as UTF-8
# --------------------------------------------------------------------------------------------

_SURROGATES = "\ud800-\udfff"
# C0/C1 controls other than whitespace, zero-width space, BOM/zero-width no-break space.
_INVISIBLES = "\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b\ufeff"
_SURROGATE, _INVISIBLE = re.compile(f"[{_SURROGATES}]"), re.compile(f"[{_INVISIBLES}]")
_UNCLEAN = re.compile(f"[{_SURROGATES}{_INVISIBLES}]")


def sanitize(text: str) -> str:
    """:func:`fix_surrogates` then :func:`remove_invisible`, after one scan that spares both on clean text."""
    if not _UNCLEAN.search(text):
        return text
    return remove_invisible(fix_surrogates(text))


def fix_surrogates(text: str) -> str:
    """Join valid surrogate pairs into their character; replace lone surrogates by U+FFFD."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def remove_invisible(text: str) -> str:
    """Drop control characters (except whitespace), zero-width spaces and stray BOMs."""
    return _INVISIBLE.sub("", text)


def collapse_whitespace(text: str) -> str:
    """Every run of Unicode whitespace becomes one space; ends are stripped."""
    # str.split() and the regex's \s agree on every code point (str.isspace); split is ~2x faster
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Twitter entities
# --------------------------------------------------------------------------------------------

# Entities start where a word does not continue. Combining marks count as part of a word: lowercasing
# 'İ' yields 'i' + U+0307, and that must not turn 'İ#a' into a hashtag on a second pass.
_URL = re.compile(r"(?<![\w\u0300-\u036f])(?:https?://|www\.)\S*", re.IGNORECASE)
# Twitter handles are ASCII; e-mail addresses are not mentions; '@a@b' is one (malformed) mention.
# IGNORECASE also admits 'İ', 'ı', 'ſ' and the Kelvin sign, whose lowercase forms are ASCII or stay put.
# The '@' comes first and the look-behind checks the character before it: a pattern that starts with a
# literal is searched for that literal in C, one that starts with a look-behind is tried everywhere (5x).
_USER = re.compile(r"@(?<![\w@\u0300-\u036f]@)[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)*", re.IGNORECASE)
# '&': HTML entities such as '&#39;'; '@': stripping '#' from '@#a' would make a mention.
_HASHTAG = re.compile(r"(?<![\w#&@\u0300-\u036f])#(\w+)")


def replace_urls(text: str, placeholder: str = "url") -> str:
    """``https://t.co/x``, ``www.x.es`` and truncated ``https://…`` become ``placeholder`` ('' removes them)."""
    low = _lowered(text)  # no other code point matches h, t, p or w case-insensitively: a safe shortcut
    if "http" not in low and "www" not in low:
        return text
    return _URL.sub(lambda _: placeholder or " ", text)  # a space, so removal never glues neighbours


def replace_users(text: str, placeholder: str = "@usuario") -> str:
    """``@handle`` mentions become ``placeholder`` ('' removes them)."""
    if "@" not in text:  # the common case, at the cost of a scan in C
        return text
    return _USER.sub(lambda _: placeholder or " ", text)  # a space, so removal never glues neighbours


def split_camel_case(word: str) -> list[str]:
    """``VivaMexico`` -> [Viva, Mexico]; ``ONUMujeres`` -> [ONU, Mujeres]; underscores split too."""
    parts: list[str] = []
    for chunk in word.split("_"):
        start = 0
        for i in range(1, len(chunk)):
            prev, cur = chunk[i - 1], chunk[i]
            nxt = chunk[i + 1] if i + 1 < len(chunk) else ""
            if (prev.islower() and cur.isupper()) or (prev.isupper() and cur.isupper() and nxt.islower()):
                parts.append(chunk[start:i])
                start = i
        parts.append(chunk[start:])
    return [p for p in parts if p]


def normalize_hashtags(text: str, mode: str = "keep") -> str:
    """``keep``: unchanged; ``strip``: drop the ``#``; ``split``: ``#VivaMexico`` -> ``viva mexico``."""
    if mode == "keep":
        return text
    if mode == "strip":
        return _HASHTAG.sub(r"\1", text)
    return _HASHTAG.sub(lambda m: " ".join(split_camel_case(m.group(1))).lower() or m.group(1), text)


# --------------------------------------------------------------------------------------------
# Laughter and elongation
# --------------------------------------------------------------------------------------------

# Candidate words; the callback decides, so no regex backtracks over a long word more than once.
_LAUGH_CANDIDATE = re.compile(r"\b[jhaeiouáéíóús]{4,}\b", re.IGNORECASE)
_J_LAUGH = set("jaeiouáéíóús")
_H_LAUGH = re.compile(r"[aei]?(?:h+[aei]+){2,}h*")  # hahaha, ahahah, hehe; not 'ahhhh'
# What every laughter word holds once lowercased: 'j...j' (within the J set) or 'h' vowels 'h'.
_LAUGH_HINT = re.compile(r"j[jaeiouáéíóús]*j|h[aei]+h")


def _is_laughter(word: str) -> bool:
    if word.count("j") >= 2 and set(word) <= _J_LAUGH:  # jajaja, JAJSJAJ, jsjsjs, jejeje, ajajaj
        return True
    return _H_LAUGH.fullmatch(word) is not None


def normalize_laughter(text: str, token: str = "jaja") -> str:
    """Laughter words (two or more ``j`` among vowels/``s``, or ``haha``-like) become ``token``."""
    if not _lowered_may_hold(text, _LAUGH_HINT):
        return text
    return _LAUGH_CANDIDATE.sub(lambda m: token if _is_laughter(m.group(0).lower()) else m.group(0), text)


def shorten_elongations(text: str, max_repeat: int = 3) -> str:
    """A non-digit character repeated more than ``max_repeat`` times is cut to ``max_repeat``
    (``holaaaaa`` -> ``holaaa``, ``!!!!!`` -> ``!!!``); digits are left alone (``1000000``)."""
    if not _lowered_may_hold(text, _run(max_repeat + 1)):
        return text
    return _elongation(max_repeat).sub(lambda m: m.group(1) * max_repeat, text)


@functools.lru_cache(maxsize=8)
def _elongation(max_repeat: int) -> re.Pattern:
    # Case-insensitive ('AAAa' is one run), so lowercasing later cannot create a new elongation.
    return re.compile(r"(\D)\1{%d,}" % max_repeat, re.IGNORECASE)


@functools.lru_cache(maxsize=8)
def _run(n: int) -> re.Pattern:
    # Spelled-out backreferences: about 4x faster than the '{n}' or ignore-case forms (measured).
    return re.compile("(.)" + r"\1" * (n - 1), re.DOTALL)


_last_lowered: tuple[str, str] = ("", "")


def _lowered(text: str) -> str:
    """``text.lower()``, remembered for the last text: the pipeline's shortcuts ask for the same text's
    lowercase up to three times while no step changes it. One tuple, swapped whole, so threads are safe."""
    global _last_lowered
    last = _last_lowered
    if last[0] is text:
        return last[1]
    low = text.lower()
    _last_lowered = (text, low)
    return low


def _lowered_may_hold(text: str, hint: re.Pattern) -> bool:
    """False only if no case-insensitive match of the real pattern can exist: the cheap ``hint`` is
    searched in ``text.lower()``, without the ignore-case matching that costs the real pattern most.

    ``re``'s ignore-case compares characters by their simple lowercase, which ``str.lower`` gives
    character for character except for 'İ' (two code points) and a final 'Σ' ('ς' by context): a
    text where either shows is not prefiltered (tests/test_preprocess.py checks every cased code point)."""
    low = _lowered(text)
    if len(low) != len(text) or "ς" in low:
        return True
    return hint.search(low) is not None


# --------------------------------------------------------------------------------------------
# Emoji
# --------------------------------------------------------------------------------------------

_PICTO = (
    "\U0001F000-\U0001F1E5\U0001F200-\U0001F3FA\U0001F400-\U0001FAFF"  # pictographs (no flags, skin tones)
    "\u2600-\u27BF"  # miscellaneous symbols, dingbats
    "\u231A\u231B\u2328\u23CF\u23E9-\u23F3\u23F8-\u23FA\u2B05-\u2B07\u2B1B\u2B1C\u2B50\u2B55"
    "\u2934\u2935\u3030\u303D\u3297\u3299"
)
_TEXT_DEFAULT = (  # emoji only when followed by VS16: (c), (r), tm, arrows, squares...
    "\u00A9\u00AE\u203C\u2049\u2122\u2139\u2194-\u2199\u21A9\u21AA\u24C2\u25AA\u25AB\u25B6\u25C0\u25FB-\u25FE"
)
_MODIFIER = "\uFE0E\uFE0F\u20E3\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F"  # VS15/16, keycap, skin tones, tags
_FLAG = "[\U0001F1E6-\U0001F1FF]{2}"
_ONE = f"(?:[{_PICTO}]|[{_TEXT_DEFAULT}]\uFE0F|[\U0001F1E6-\U0001F1FF])[{_MODIFIER}]*"
# A flag (two regional indicators) or an emoji with its modifiers, ZWJ-joined to further emoji.
_EMOJI = re.compile(f"{_FLAG}|{_ONE}(?:\u200D{_ONE})*")
_STRAY_MODIFIER = re.compile(f"[{_MODIFIER}]")
_CODE_POINT = re.compile(f"[{_PICTO}{_TEXT_DEFAULT}\U0001F1E6-\U0001F1FF]")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def emoji_name(char: str) -> str:
    """``😂`` -> ``face_with_tears_of_joy`` (the Unicode name, lowercased, ``_``-joined)."""
    name = unicodedata.name(char, "")
    if not name:  # newer than this Python's Unicode tables
        return f"emoji_{ord(char):x}"
    return _NON_ALNUM.sub("_", name.lower()).strip("_")


def _emoji_as_text(match: re.Match) -> str:
    seq = match.group(0)
    if len(seq) == 2 and all("\U0001F1E6" <= c <= "\U0001F1FF" for c in seq):
        return " :flag_" + "".join(chr(ord(c) - 0x1F1E6 + ord("a")) for c in seq) + ": "
    return "".join(f" :{emoji_name(c)}: " for c in _CODE_POINT.findall(seq))


def emoji_to_text(text: str) -> str:
    """Each emoji becomes `` :unicode_name: ``; flags become `` :flag_es: ``; skin tones, variation
    selectors and ZWJ are dropped (``👨‍👩‍👧`` -> ``:man: :woman: :girl:``)."""
    # Stray modifiers become spaces, not nothing: 'aa\ufe0faa' must not turn into an elongation.
    return _STRAY_MODIFIER.sub(" ", _EMOJI.sub(_emoji_as_text, text))


def remove_emoji(text: str) -> str:
    """Drop emoji with their modifiers and joiners (a keycap ``1️⃣`` keeps its ``1``)."""
    return _STRAY_MODIFIER.sub(" ", _EMOJI.sub(" ", text))


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class Preprocessor:
    """``Preprocessor(cfg)(text)``: sanitize, elongation, users, hashtags, URLs, lowercase, laughter,
    emoji, whitespace. Never raises on a str, never returns an empty string, and is idempotent
    (the order is chosen so that no step creates work for an earlier one)."""

    def __init__(self, cfg: Optional[PreprocessConfig] = None):
        self.cfg = (cfg or PreprocessConfig()).validate()

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"Preprocessor expects a str, got {type(text).__name__}")
        cfg = self.cfg
        text = sanitize(text)
        if cfg.elongation:  # before URLs ('wwww.x' -> 'www.x') and laughter ('jaaaaja')
            text = shorten_elongations(text, cfg.max_repeat)
        if cfg.users is not None:  # before hashtags: removing '@a' from '@a#b' exposes '#b'
            text = replace_users(text, cfg.users)
        text = normalize_hashtags(text, cfg.hashtags)  # before lowercase: CamelCase split needs the case
        if cfg.urls is not None:  # after hashtags and users, which may leave URL text; the URL swallows them
            text = replace_urls(text, cfg.urls)
        if cfg.lowercase:
            text = text.lower()
        if cfg.laughter:
            text = normalize_laughter(text, cfg.laughter_token)
        if cfg.emoji == "text":
            text = emoji_to_text(text)
        elif cfg.emoji == "remove":
            text = remove_emoji(text)
        return collapse_whitespace(text) or cfg.empty_text

    def to_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "Preprocessor":
        """Rebuild from :meth:`to_dict` output; unknown or mistyped keys raise ConfigError."""
        return cls(PreprocessConfig.from_dict(data))
