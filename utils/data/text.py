"""Text clean-up for Chinese corpora: traditional->simplified, normalisation and quality filters.

Every function here is pure and works on one document, so the corpus pipeline can run them in worker
processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import opencc

# CJK Unified Ideographs, Extension A, Compatibility Ideographs, and Extensions B-F (astral plane).
CJK_RANGES = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
_CJK = f"[{CJK_RANGES}]"

# MediaWiki language-conversion markup: -{zh-cn:软件;zh-tw:軟體}-, -{H|...}-, -{plain}-.
_CONVERSION = re.compile(r"(?<![-!])-\{(?!\{)(.*?)\}-", re.DOTALL)
_VARIANT_ORDER = ("zh-cn", "zh-hans", "zh-sg", "zh-my", "zh", "zh-hant", "zh-tw", "zh-hk", "zh-mo")
# Variants are separated by ';' before the next 'zh-xx:' (a ';' inside an entity such as &lt; is not one).
_VARIANT_SEPARATOR = re.compile(r";\s*(?=zh(?:-[a-z]+)?\s*:)|;\s*$")
_VARIANT = re.compile(r"^\s*(zh(?:-[a-z]+)?)\s*:(.*)$", re.DOTALL)

# Half-width punctuation that stands between Chinese characters is turned into its full-width form.
_HALF_TO_FULL = {",": "，", ";": "；", ":": "：", "?": "？", "!": "！", "(": "（", ")": "）"}
_HALF_PUNCT_NEAR_CJK = re.compile(
    f"(?<={_CJK})[,;:?!](?=\\s*{_CJK})|(?<={_CJK})\\((?=[^()]*\\))|(?<=\\()[^()]*\\)(?={_CJK})"
)
# Full-width ASCII letters and digits (ＡＢＣ１２３) become plain ASCII; punctuation stays full-width.
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}
_FULLWIDTH_ALNUM[0x3000] = 0x20  # ideographic space
# Brackets left empty (or holding only separators) once templates such as {{lang|en|...}} are stripped.
_EMPTY_BRACKETS = re.compile(r"[（(][\s,，;；:：、.。]*[）)]|「\s*」|《\s*》|“\s*”")
_LEADING_SEPARATORS = re.compile(r"(?<=[（(])[\s,，;；:：、]+")
_TRAILING_SEPARATORS = re.compile(r"[\s,，;；:：、]+(?=[）)])")
_SPACE_RUN = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f]+")
_SPACE_BETWEEN_CJK = re.compile(f"(?<={_CJK}) (?={_CJK}|[,;:?!])|(?<={_CJK}[,;:?!]) (?={_CJK})")
_SPACE_AROUND_FULL_PUNCT = re.compile(r" ?([，。；：！？、（）「」『』《》“”]) ?")
# wikiextractor ends section headings with '.'; after a Chinese heading that dot is noise.
_HEADING_DOT = re.compile(f"(?<={_CJK})\\.$", re.MULTILINE)


def resolve_conversion_markup(text: str) -> str:
    """Replace `-{...}-` conversion markup with its simplified-Chinese (zh-cn / zh-hans) variant."""
    return _CONVERSION.sub(_pick_variant, text)


def _pick_variant(match: re.Match) -> str:
    body = match.group(1)
    flag, sep, rest = body.partition("|")
    if sep and re.fullmatch(r"\s*[A-Za-z;]{1,3}\s*", flag):
        if "H" in flag or "-" in flag:  # page-wide rules or rule removal: no text of their own
            return ""
        body = rest
    variants = {}
    for part in _VARIANT_SEPARATOR.split(body):
        found = _VARIANT.match(part)
        if found:
            variants[found.group(1)] = found.group(2).strip()
    if not variants:
        return body
    for name in _VARIANT_ORDER:
        if name in variants:
            return variants[name]
    return next(iter(variants.values()))


@lru_cache(maxsize=4)
def _converter(config: str) -> opencc.OpenCC:
    return opencc.OpenCC(config)


def to_simplified(text: str, config: str = "t2s") -> str:
    """Traditional -> simplified Chinese with OpenCC (`config` is an OpenCC profile such as t2s, tw2sp)."""
    return _converter(config).convert(text)


def normalize_text(text: str) -> str:
    """Make punctuation, brackets and whitespace consistent; keep line breaks between paragraphs."""
    text = text.translate(_FULLWIDTH_ALNUM)
    text = _SPACE_RUN.sub(" ", text)
    text = _SPACE_BETWEEN_CJK.sub("", text)
    text = _HALF_PUNCT_NEAR_CJK.sub(lambda m: "".join(_HALF_TO_FULL.get(c, c) for c in m.group(0)), text)
    text = _LEADING_SEPARATORS.sub("", text)
    text = _TRAILING_SEPARATORS.sub("", text)
    previous = None
    while previous != text:  # "（（））" needs two passes
        previous, text = text, _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_AROUND_FULL_PUNCT.sub(r"\1", text)
    text = _HEADING_DOT.sub("", text)
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def cjk_ratio(text: str) -> float:
    """Share of Chinese characters among the non-whitespace characters of `text` (0 for empty text)."""
    visible = len(text) - sum(text.count(c) for c in " \n\t")
    return len(CJK_CHAR.findall(text)) / visible if visible else 0.0


@dataclass(frozen=True)
class QualityFilter:
    """Document-level filters; `check` returns the name of the failed rule, or None to keep."""

    min_chars: int = 50
    max_chars: int = 0
    min_cjk_ratio: float = 0.3

    def check(self, text: str) -> str | None:
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars and len(text) > self.max_chars:
            return "too_long"
        if self.min_cjk_ratio and cjk_ratio(text) < self.min_cjk_ratio:
            return "low_cjk_ratio"
        return None


def character_ngrams(text: str, n: int) -> list[str]:
    """The n-grams of a text's characters, spaces left out (Chinese has no word boundaries to count by, and
    characters do not depend on a tokenizer)."""
    chars = [c for c in text if not c.isspace()]
    return ["".join(chars[i:i + n]) for i in range(len(chars) - n + 1)]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of a text's character n-grams that repeat an earlier one: 0 = no repetition, towards 1 = one
    phrase over and over (the "复读机" replies of small models). 0 for texts shorter than n."""
    grams = character_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n over a set of replies: distinct character n-grams / all character n-grams (Li et al., 2016);
    low when replies repeat themselves or each other."""
    grams = [gram for text in texts for gram in character_ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0
