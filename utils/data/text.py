"""Text clean-up for Chinese corpora: traditional->simplified, normalisation and quality filters.

Every function here is pure and works on one document, so the corpus pipeline can run them in worker
processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import opencc

# Extension A, CJK Unified Ideographs, Compatibility Ideographs, and Extensions B-F (astral plane): code point
# ranges for NumPy, and the same as a regex character class.
_CJK_CODE_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2EBEF))
CJK_RANGES = "".join(f"{chr(first)}-{chr(last)}" for first, last in _CJK_CODE_RANGES)
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
_FULLWIDTH_RUN = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000]+")
# Brackets left empty (or holding only separators) once templates such as {{lang|en|...}} are stripped.
_EMPTY_BRACKETS = re.compile(r"[（(][\s,，;；:：、.。]*[）)]|「\s*」|《\s*》|“\s*”")
_LEADING_SEPARATORS = re.compile(r"(?<=[（(])[\s,，;；:：、]+")
_TRAILING_SEPARATORS = re.compile(r"[\s,，;；:：、]+(?=[）)])")
_SPACE_RUN = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f]+")
# These patterns start with the space they remove, and look behind it afterwards, so that the regex engine
# jumps from space to space instead of trying a look-behind at every character (several times faster).
_SPACE_BETWEEN_CJK = re.compile(f" (?:(?<={_CJK} )(?={_CJK}|[,;:?!])|(?<={_CJK}[,;:?!] )(?={_CJK}))")
_FULL_PUNCT = "[，。；：！？、（）「」『』《》“”]"
_SPACE_AROUND_FULL_PUNCT = re.compile(f" (?={_FULL_PUNCT})| (?<={_FULL_PUNCT} )")
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
    text = _FULLWIDTH_RUN.sub(lambda run: run.group(0).translate(_FULLWIDTH_ALNUM), text)
    text = _SPACE_RUN.sub(" ", text)
    text = _SPACE_BETWEEN_CJK.sub("", text)
    text = _HALF_PUNCT_NEAR_CJK.sub(lambda m: "".join(_HALF_TO_FULL.get(c, c) for c in m.group(0)), text)
    text = _LEADING_SEPARATORS.sub("", text)
    text = _TRAILING_SEPARATORS.sub("", text)
    previous = None
    while previous != text:  # "（（））" needs two passes
        previous, text = text, _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_AROUND_FULL_PUNCT.sub("", text)
    text = _HEADING_DOT.sub("", text)
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def cjk_ratio(text: str) -> float:
    """Share of Chinese characters among the non-whitespace characters of `text` (0 for empty text)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    visible = len(codes) - int(np.count_nonzero((codes == 0x20) | (codes == 0x0A) | (codes == 0x09)))
    if not visible:
        return 0.0
    chinese = sum(int(np.count_nonzero((codes >= first) & (codes <= last))) for first, last in _CJK_CODE_RANGES)
    return chinese / visible


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


# Whitespace by code point (str.isspace, as regex \s; U+3000 is the last one): a look-up table, so that texts lose
# their whitespace in one vector pass.
_IS_SPACE = np.array([chr(code).isspace() for code in range(0x3002)], dtype=bool)
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so the rolling hash keeps every character's bits


def visible_codes(text: str) -> np.ndarray:
    """The code points of `text` without its whitespace, as uint64 (the input of the n-gram hashes)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return codes[~_IS_SPACE[np.minimum(codes, len(_IS_SPACE) - 1)]].astype(np.uint64)


def ngram_hashes(text: str, size: int, whole_if_shorter: bool = False) -> np.ndarray:
    """64-bit hashes of every `size`-character window of `text` with its whitespace removed: the sum of code
    point * BASE^(size - 1 - k) over the window, modulo 2^64. Windows are built by doubling (1, 2, 4, 8 ...
    characters), about log2(size) vector passes over the text, not `size`. A text shorter than `size` has no
    window: empty, or with `whole_if_shorter` one hash of the whole text (an empty text hashes to 0)."""
    return window_hashes(visible_codes(text), size, whole_if_shorter)


def window_hashes(codes: np.ndarray, size: int, whole_if_shorter: bool = False) -> np.ndarray:
    """`ngram_hashes` of `visible_codes` output (computed once per document, for dedup and decontamination)."""
    if len(codes) < size:
        if not whole_if_shorter:
            return np.empty(0, dtype=np.uint64)
        if not len(codes):
            return np.zeros(1, dtype=np.uint64)
        size = len(codes)
    result, result_len, block, block_len = None, 0, codes, 1

    def join(left: np.ndarray, left_len: int, right: np.ndarray, right_len: int) -> np.ndarray:
        count = len(codes) - left_len - right_len + 1  # windows of left_len + right_len characters
        return left[:count] * np.uint64(pow(int(_HASH_BASE), right_len, 1 << 64)) + right[left_len:left_len + count]

    while size:
        if size & 1:
            result, result_len = ((block, block_len) if result is None
                                  else (join(result, result_len, block, block_len), result_len + block_len))
        size >>= 1
        if size:
            block, block_len = join(block, block_len, block, block_len), 2 * block_len
    return result


def strided_ngram_hashes(codes: np.ndarray, size: int, stride: int) -> np.ndarray:
    """`ngram_hashes` of the windows starting at 0, stride, 2 * stride ... of `visible_codes` output: `size`
    multiply-adds over 1/stride of the text (Horner's rule), the same values as the full set's."""
    count = (len(codes) - size) // stride + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    result = codes[0::stride][:count].copy()
    for offset in range(1, size):
        result *= _HASH_BASE
        result += codes[offset::stride][:count]
    return result


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
