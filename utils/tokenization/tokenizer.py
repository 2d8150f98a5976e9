"""Tokenizer training, extension and evaluation (the chat format it saves lives in `chat_format`).

The default tokenizer is a character-level BPE with byte fallback (the Llama / sentencepiece recipe,
built with HF `tokenizers`): merges start from Unicode characters, so Chinese words become tokens,
and any character outside the vocabulary is spelled as its UTF-8 bytes `<0x..>`, so every input
encodes with zero unknown tokens and `decode(encode(x)) == x`. It is pre-tokenised exactly as one of
llama.cpp's tokenizers does (`gguf_bpe`, `LLAMA_CPP_PRE`), so a model exports to GGUF with the same token
ids in llama.cpp / ollama as here; the sentencepiece option (converted to the same HF format) too.
Options that llama.cpp cannot reproduce: the same BPE split by a regex into Han / letter / digit /
punctuation runs (`bpe`) and byte-level BPE (GPT-2 style).

The output directory loads with `AutoTokenizer.from_pretrained` (no remote code) and carries the special
tokens (pad/eos/bos/unk, chat roles, T5 sentinels) and the chat template used by every later stage.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.data.sources import Document, read_records
from utils.errors import UserError
from utils.hub import local_dir
from utils.tokenization.chat_format import CHAT_TEMPLATE, CHAT_TOKENS

logger = logging.getLogger(__name__)

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
ModelType = Literal["bpe", "gguf_bpe", "byte_bpe", "sentencepiece"]
MODEL_TYPES = get_args(ModelType)
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

# Pre-tokenisation of the bpe and byte_bpe options: runs of Han characters, runs of other letters
# (with one leading space, as in GPT-2), single digits, punctuation runs, and whitespace. Merges never
# cross these boundaries, which keeps the trainer's word table small on Chinese text.
PRETOKENIZE_PATTERN = (r" ?\p{Han}+| ?[^\s\p{Han}\p{N}\p{P}\p{S}]+| ?\p{N}| ?[\p{P}\p{S}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Pre-tokenisation of the default (gguf_bpe) and sentencepiece options, as llama.cpp's "sarvam-moe" BPE
# tokenizer does it (src/llama-vocab.cpp): spaces become "▁", the text is cut only at newlines, BPE merges (by
# rank) run over raw UTF-8 characters, and a character outside the vocabulary becomes its <0x..> bytes.
# llama.cpp implements a fixed set of pre-tokenisers; of those that keep characters (not GPT-2 bytes) only
# this one keeps every character, so a tokenizer built this way tokenises identically there. Merging across
# character classes also compresses better on Chinese than splitting Han / letters / punctuation apart
# (docs/BENCHMARKS.md, bench/bench_gguf.py).
LLAMA_CPP_PRE = "sarvam-moe"
SPACE = "▁"
LINE_SPLIT = r"[^\n]+|[\n]+"
# a directory holding any of these is a tokenizer directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def llama_cpp_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Give `tokenizer` the normaliser, pre-tokeniser and decoder of `LLAMA_CPP_PRE`."""
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(LINE_SPLIT), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def llama_cpp_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that tokenises as this `tokenizer.json` does, or
    None when llama.cpp has none (a byte-level BPE here, or a tokenizer from elsewhere)."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("ignore_merges"):
        return None
    reference = json.loads(llama_cpp_pipeline(Tokenizer(models.BPE())).to_str())
    same = all(tokenizer_json.get(part) == reference[part] for part in ("normalizer", "pre_tokenizer", "decoder"))
    return LLAMA_CPP_PRE if same else None


def special_tokens(num_sentinels: int) -> list[str]:
    """All special tokens in id order: pad=0, eos=1, unk=2, bos=3, chat tokens, T5 sentinels."""
    return [PAD, EOS, UNK, BOS, *CHAT_TOKENS, *sentinel_tokens(num_sentinels)]


def sentinel_tokens(num_sentinels: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(num_sentinels)]


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
    return math.ceil(vocab_size / multiple) * multiple


@dataclass
class CorpusSample:
    """The training texts chosen within the memory budget, and what was chosen."""

    texts: list[str]
    docs_total: int
    chars_total: int
    docs_sampled: int
    chars_sampled: int

    def describe(self) -> str:
        share = self.chars_sampled / max(self.chars_total, 1)
        return (f"sampled {self.docs_sampled:,} of {self.docs_total:,} documents, "
                f"{self.chars_sampled:,} of {self.chars_total:,} characters ({share:.1%})")


def iter_documents(files: Iterable[Path], text_column: str = "text") -> Iterator[str]:
    for path in files:
        for record, _ in read_records(path, text_column):
            if not isinstance(record, Document):
                raise UserError("a raw Wikipedia dump cannot train a tokenizer directly", path=str(path),
                                field="input", fix="run prepare_data.py on it first and pass its output")
            yield record.text


def sample_corpus(files: list[Path], max_chars: int, seed: int, text_column: str = "text") -> CorpusSample:
    """Keep each document with probability max_chars / total characters (two streaming passes).

    The second pass holds only the sample, so memory is bounded by `max_chars` whatever the corpus size.
    """
    docs_total = chars_total = 0
    for text in tqdm(iter_documents(files, text_column), desc="count corpus", unit=" docs"):
        docs_total += 1
        chars_total += len(text)
    if docs_total == 0:
        raise UserError("the tokenizer corpus is empty", path=", ".join(map(str, files)), field="input",
                        fix="pass the output directory of prepare_data.py or files with text")
    keep = 1.0 if max_chars <= 0 else min(1.0, max_chars / chars_total)
    rng = random.Random(seed)
    documents = tqdm(iter_documents(files, text_column), desc="sample corpus", unit=" docs", total=docs_total)
    texts = [t for t in documents if keep >= 1.0 or rng.random() < keep]
    return CorpusSample(texts, docs_total, chars_total, len(texts), sum(map(len, texts)))


def alphabet_for_coverage(texts: Iterable[str], coverage: float) -> list[str]:
    """The most frequent characters (ties by code point) that together cover `coverage` of all characters
    (sentencepiece's character_coverage); the rest are left to byte fallback instead of taking vocabulary
    slots."""
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    total, running = sum(counts.values()), 0
    for rank, char in enumerate(ranked, start=1):
        running += counts[char]
        if running >= coverage * total:
            return ranked[:rank]
    return ranked


def build_tokenizer(model_type: str) -> Tokenizer:
    """An untrained tokenizer with the pre-tokeniser and decoder of `model_type`."""
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    if model_type == "byte_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    if model_type == "gguf_bpe":
        return llama_cpp_pipeline(tokenizer)
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def train_bpe(texts: list[str], model_type: str, vocab_size: int, num_sentinels: int, min_frequency: int,
              character_coverage: float, max_token_length: int) -> Tokenizer:
    """Train a `bpe` / `gguf_bpe` (character level + byte fallback) or `byte_bpe` tokenizer of exactly `vocab_size`
    entries when the corpus allows it (fewer when it runs out of merges)."""
    tokenizer = build_tokenizer(model_type)
    specials = special_tokens(num_sentinels)
    if model_type == "byte_bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, max_token_length=max_token_length,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
        return tokenizer
    budget = vocab_size - len(BYTE_TOKENS)
    if budget <= len(specials) + 16:
        raise UserError(f"vocab_size {vocab_size} leaves no room for merges after {len(specials)} special "
                        f"and 256 byte tokens", field="vocab_size", fix="pass a larger --vocab_size")
    # Single characters may take at most half of what is left, so merges (words) always get room. The
    # alphabet is chosen here and handed over whole: `limit_alphabet` alone cuts among characters of equal
    # count in hash-map order, so the same corpus would give a different tokenizer on every run.
    # the characters the trainer sees (gguf_bpe normalises spaces to ▁)
    texts_seen = (text.replace(" ", SPACE) for text in texts) if model_type == "gguf_bpe" else texts
    alphabet = alphabet_for_coverage(texts_seen, character_coverage)[:(budget - len(specials)) // 2]
    trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  max_token_length=max_token_length, show_progress=True)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return add_byte_tokens(tokenizer)


def add_byte_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Append `<0x00>`..`<0xFF>` to the BPE vocabulary (as normal tokens) for byte fallback."""
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in data["added_tokens"])]) + 1
    for token in BYTE_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(data))


def train_sentencepiece(texts: list[str], vocab_size: int, num_sentinels: int, character_coverage: float,
                        max_token_length: int) -> Tokenizer:
    """Train with sentencepiece (BPE, byte fallback, digits split) and convert to an HF tokenizer."""
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    specials = special_tokens(num_sentinels)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "spm")
        lines = (line for text in texts for line in text.split("\n") if line.strip())
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            max_sentencepiece_length=max_token_length, add_dummy_prefix=False,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
            pad_piece=PAD, eos_piece=EOS, unk_piece=UNK, bos_piece=BOS,
            user_defined_symbols=specials[4:], train_extremely_large_corpus=False,
            minloglevel=2)
        extracted = SentencePieceExtractor(prefix + ".model").extract(models.BPE)
        vocab, merges = extracted["vocab"], extracted["merges"]
    tokenizer = llama_cpp_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK,
                                                         byte_fallback=True, fuse_unk=True)))
    tokenizer.add_special_tokens(specials)
    return tokenizer


def to_transformers(tokenizer: Tokenizer, num_sentinels: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with the toolkit's special tokens and chat template."""
    tokenizer.add_special_tokens(special_tokens(num_sentinels))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[*CHAT_TOKENS, *sentinel_tokens(num_sentinels)],
        clean_up_tokenization_spaces=False, model_max_length=model_max_length, chat_template=CHAT_TEMPLATE)


def extend_tokenizer(base_dir: str, texts: list[str], vocab_size: int, min_frequency: int,
                     max_token_length: int) -> tuple[PreTrainedTokenizerFast, int]:
    """Add new (Chinese) tokens to an existing BPE tokenizer, keeping every existing id.

    A BPE is trained on `texts` with the base tokenizer's own normaliser and pre-tokeniser, so its
    tokens are spelled the way the base spells them (byte-level, metaspace ...). Its new characters and
    merges are appended after the base's highest id; base merges keep their priority. This is the
    Chinese-LLaMA recipe for HF BPE tokenizers; the model's embeddings are resized afterwards.
    """
    base = load_tokenizer(base_dir, "extend", fix="pass a directory that AutoTokenizer.from_pretrained loads "
                                                  "(with tokenizer.json)")
    backend = getattr(base, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    if data.get("model", {}).get("type") != "BPE":
        raise UserError("only BPE tokenizers (tokenizer.json with a BPE model) can be extended",
                        path=base_dir, field="extend", fix="pass a BPE-based HF tokenizer directory")
    learner = Tokenizer(models.BPE(unk_token=data["model"].get("unk_token")))
    learner.normalizer = backend.normalizer
    learner.pre_tokenizer = backend.pre_tokenizer
    initial = pre_tokenizers.ByteLevel.alphabet() if "ByteLevel" in json.dumps(data.get("pre_tokenizer")) else []
    learner.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, max_token_length=max_token_length,
        initial_alphabet=initial, show_progress=True), length=len(texts))
    learned = json.loads(learner.to_str())["model"]

    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    as_pair = (lambda m: tuple(m.split(" ", 1))) if merges and isinstance(merges[0], str) else tuple
    next_id = max([*vocab.values(), *(t["id"] for t in data["added_tokens"])]) + 1
    added = 0
    for token in sorted((t for t in learned["vocab"] if len(t) == 1), key=learned["vocab"].get):
        if token not in vocab:
            vocab[token], next_id, added = next_id, next_id + 1, added + 1
    for merge in learned["merges"]:
        left, right = as_pair(merge)
        if left + right not in vocab and left in vocab and right in vocab:
            vocab[left + right], next_id, added = next_id, next_id + 1, added + 1
            merges.append(merge)
    extended = Tokenizer.from_str(json.dumps(data))
    extra = [t for t in CHAT_TOKENS if t not in vocab and t not in {a["content"] for a in data["added_tokens"]}]
    hf = PreTrainedTokenizerFast(tokenizer_object=extended, **base.special_tokens_map,
                                 clean_up_tokenization_spaces=False,
                                 model_max_length=base.model_max_length, chat_template=CHAT_TEMPLATE)
    hf.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return hf, added


def load_tokenizer(name: str, field: str = "tokenizer_name_or_path",
                   fix: str = "pass a train_tokenizer.py output directory, or a model directory with its tokenizer"):
    """The tokenizer in a local directory, or of a hub id when the hub is allowed (`utils.hub.local_dir`):
    the one way every stage loads a tokenizer named on the command line."""
    path = local_dir(name, field, needs=TOKENIZER_FILES, what="tokenizer directory", fix=fix)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer ({err})", path=name, field=field, fix=fix) from None


@dataclass
class TokenizerScore:
    name: str
    vocab_size: int
    chars_per_token: float
    unk_rate: float
    tokens: int


def score_tokenizer(name: str, path_or_tokenizer, texts: list[str]) -> TokenizerScore:
    """Characters per token and share of unknown tokens on `texts`, for an HF tokenizer (object or
    directory) or a sentencepiece `.model` file (e.g. ChatGLM2's, which needs remote code in HF)."""
    chars = sum(map(len, texts))
    if isinstance(path_or_tokenizer, (str, Path)) and str(path_or_tokenizer).endswith(".model"):
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(path_or_tokenizer))
        ids = [i for text in texts for i in processor.encode(text)]
        unk, size = processor.unk_id(), processor.get_piece_size()
    else:
        tokenizer = (load_tokenizer(str(path_or_tokenizer), "reference_tokenizers")
                     if isinstance(path_or_tokenizer, (str, Path)) else path_or_tokenizer)
        ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        unk, size = tokenizer.unk_token_id, len(tokenizer)
    unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
    return TokenizerScore(name, size, chars / max(len(ids), 1), unknown / max(len(ids), 1), len(ids))


def format_scores(scores: list[TokenizerScore]) -> str:
    lines = [f"{'tokenizer':<36}{'vocab':>9}{'chars/token':>13}{'unk rate':>10}{'tokens':>11}"]
    lines.append("-" * len(lines[0]))
    for s in scores:
        lines.append(f"{s.name:<36}{s.vocab_size:>9,}{s.chars_per_token:>13.3f}{s.unk_rate:>10.2%}{s.tokens:>11,}")
    return "\n".join(lines)
