"""Train the toolkit's tokenizer (or extend an existing one) on the prepared corpus.

    python train_tokenizer.py --input data/corpus --vocab_size 32000 --output_dir data/tokenizer
    python train_tokenizer.py --model_type sentencepiece ...        # sentencepiece BPE instead (or bpe, byte_bpe)
    python train_tokenizer.py --extend path/to/base_tokenizer ...   # add Chinese tokens, keep base ids

The corpus is sampled to fit `--memory_budget_gb` (say what was sampled), the vocabulary is rounded up
to a multiple of 64, and the result is scored (characters per token, unknown-token rate) on held-out
text beside any `--reference_tokenizers`. Output: an `AutoTokenizer` directory with the chat template,
plus `tokenizer_report.json` and `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import run_main
from utils.config import already_made, parse_config, recipe_path, save_config
from utils.data.sources import split_files
from utils.errors import UserError
from utils.hub import local_dir
from utils.io import atomic_output_dir, check_output_dir, write_json_atomic
from utils.logging import setup_logging
from utils.tokenization.tokenizer import (
    TOKENIZER_FILES,
    ModelType,
    extend_tokenizer,
    format_scores,
    iter_documents,
    round_vocab,
    sample_corpus,
    score_tokenizer,
    to_transformers,
    train_bpe,
    train_sentencepiece,
)

logger = logging.getLogger("train_tokenizer")

# Peak resident memory of this script, measured by bench/bench_tokenizer.py (docs/BENCHMARKS.md): about
# 0.9 GB fixed (Python, tokenizers, transformers) plus 58 bytes per character of training text (the BPE
# trainer's word and pair tables; Chinese pre-tokens are whole clauses, nearly all distinct). The memory
# budget becomes a sample size through these two figures, each with a margin.
FIXED_BYTES = 1.0e9
BYTES_PER_TRAIN_CHAR = 64
MIN_BUDGET_GB = 1.5


def chars_for_budget(budget_gb: float) -> int:
    """Characters of training text that fit in a peak-memory budget of `budget_gb` GB."""
    return max(int((budget_gb * 1e9 - FIXED_BYTES) / BYTES_PER_TRAIN_CHAR), 0)


@dataclass
class TokenizerArguments:
    input: list[str] = field(default_factory=lambda: ["data/corpus"], metadata={
        "help": "Training text: prepare_data.py output directories (their train-*.parquet) or "
                ".parquet/.jsonl/.json/.txt files."})
    output_dir: str = field(default="data/tokenizer", metadata={"help": "Where the tokenizer is written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    model_type: ModelType = field(default="gguf_bpe", metadata={
        "help": "gguf_bpe (character-level BPE with byte fallback, pre-tokenised as llama.cpp does: exports to "
                "GGUF, see export.py), bpe (the same BPE split into Han / letter / digit / punctuation runs by a "
                "regex llama.cpp lacks: not exportable), byte_bpe (byte-level BPE) or sentencepiece."})
    vocab_size: int = field(default=32000, metadata={
        "help": "Vocabulary size including special and byte tokens, rounded up to a multiple of 64. With "
                "--extend: size of the tokenizer learnt on the corpus, whose new tokens are added."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum count of a pair to be merged."})
    character_coverage: float = field(default=0.9995, metadata={
        "help": "Share of characters covered by single-character tokens; rarer characters use byte fallback."})
    max_token_length: int = field(default=16, metadata={"help": "Longest token, in characters."})
    num_sentinels: int = field(default=100, metadata={"help": "T5 sentinel tokens <extra_id_N> for span corruption."})
    model_max_length: int = field(default=1024, metadata={"help": "Context length recorded in the tokenizer."})
    memory_budget_gb: float = field(default=4.0, metadata={
        "help": f"Peak memory allowed for training (GB, at least {MIN_BUDGET_GB}); the corpus is sampled to fit. "
                "0 = use all text."})
    max_train_chars: int = field(default=-1, metadata={
        "help": "Sample at most this many characters (overrides --memory_budget_gb); -1 = from the budget."})
    text_column: str = field(default="text", metadata={"help": "Text column in .parquet/.jsonl/.json input."})
    eval_files: list[str] = field(default_factory=list, metadata={
        "help": "Held-out text for the report; default: the validation-*.parquet shards of --input."})
    reference_tokenizers: list[str] = field(default_factory=list, metadata={
        "help": "Tokenizers to compare with: HF tokenizer directories or sentencepiece .model files."})
    extend: str | None = field(default=None, metadata={
        "help": "Base HF tokenizer directory to extend with new tokens instead of training from scratch."})
    seed: int = field(default=42, metadata={"help": "Seed of the corpus sample."})

    def __post_init__(self):
        if self.vocab_size < 64:
            raise ValueError(f"--vocab_size must be at least 64, not {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise ValueError(f"--character_coverage must be in (0, 1], not {self.character_coverage}")
        if 0 < self.memory_budget_gb < MIN_BUDGET_GB and self.max_train_chars <= 0:
            raise ValueError(f"--memory_budget_gb must be 0 (no limit) or at least {MIN_BUDGET_GB} (about "
                             f"{FIXED_BYTES / 1e9:.0f} GB is fixed: Python and the libraries), not "
                             f"{self.memory_budget_gb}; or cap the sample with --max_train_chars")

    @property
    def train_chars(self) -> int:
        if self.max_train_chars > 0:
            return self.max_train_chars
        return chars_for_budget(self.memory_budget_gb) if self.memory_budget_gb > 0 else 0


def check_inputs(args: TokenizerArguments) -> None:
    """Refuse, before the corpus is sampled and the tokenizer trained (minutes on a real corpus), an output
    directory that would be refused at the end, and a base or reference tokenizer that is not there."""
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    if args.extend:
        local_dir(args.extend, "extend", needs=TOKENIZER_FILES, what="tokenizer directory",
                  fix="pass a directory that AutoTokenizer.from_pretrained loads (with tokenizer.json)")
    for ref in args.reference_tokenizers:
        if ref.endswith(".model"):
            if not Path(ref).is_file():
                raise UserError("no such file", path=ref, field="reference_tokenizers",
                                fix="pass a sentencepiece .model file, or an HF tokenizer directory")
        else:
            local_dir(ref, "reference_tokenizers", needs=TOKENIZER_FILES, what="tokenizer directory",
                      fix="pass an HF tokenizer directory, or a sentencepiece .model file")


def main(argv: Sequence[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config([TokenizerArguments], argv, default_recipe=recipe_path("tokenizer"),
                           description=__doc__)
    if not args.overwrite_output_dir and already_made(args.output_dir, args, inputs=[*args.input, *args.eval_files]):
        return json.loads((Path(args.output_dir) / "tokenizer_report.json").read_text(encoding="utf-8"))
    vocab_size = round_vocab(args.vocab_size)
    check_inputs(args)
    files = split_files(args.input, "train")
    sample = sample_corpus(files, args.train_chars, args.seed, args.text_column)
    logger.info("%s (budget %.1f GB)", sample.describe(), args.memory_budget_gb)

    with atomic_output_dir(args.output_dir, args.overwrite_output_dir) as workdir:
        if args.extend:
            tokenizer, added = extend_tokenizer(args.extend, sample.texts, vocab_size, args.min_frequency,
                                                args.max_token_length)
            logger.info("extended %s with %d new tokens", args.extend, added)
        else:
            if args.model_type == "sentencepiece":
                trained = train_sentencepiece(sample.texts, vocab_size, args.num_sentinels,
                                              args.character_coverage, args.max_token_length)
            else:
                trained = train_bpe(sample.texts, args.model_type, vocab_size, args.num_sentinels,
                                    args.min_frequency, args.character_coverage, args.max_token_length)
            tokenizer = to_transformers(trained, args.num_sentinels, args.model_max_length)
            if len(tokenizer) < vocab_size:
                logger.warning("the corpus supports only %d tokens (asked for %d); pass more text or a "
                               "smaller --vocab_size", len(tokenizer), vocab_size)
        del sample
        tokenizer.save_pretrained(workdir)
        report = {"vocab_size": len(tokenizer), "requested_vocab_size": vocab_size,
                  "model_type": "extended" if args.extend else args.model_type,
                  "scores": [dataclasses.asdict(s) for s in evaluate(args, workdir)]}
        write_json_atomic(workdir / "tokenizer_report.json", report)
        save_config(workdir, args)
    logger.info("saved tokenizer (%d tokens) to %s", len(tokenizer), args.output_dir)
    return report


def evaluate(args: TokenizerArguments, tokenizer_dir: Path) -> list:
    """Score the new tokenizer and the references on held-out text; log the table."""
    eval_files = split_files(args.eval_files, "validation") if args.eval_files else \
        [p for name in args.input if Path(name).is_dir() for p in sorted(Path(name).glob("validation-*.parquet"))]
    if not eval_files:
        logger.warning("no held-out text (no validation-*.parquet in --input and no --eval_files): "
                       "skipping the compression report")
        return []
    texts = list(iter_documents(eval_files, args.text_column))
    candidates = [(Path(args.output_dir).name or "new", str(tokenizer_dir))]
    for ref in args.reference_tokenizers:  # checked by check_inputs
        candidates.append((Path(ref).name if Path(ref).is_dir() else Path(ref).parent.name, ref))
    scores = [score_tokenizer(name, path, texts) for name, path in candidates]
    logger.info("compression on %d held-out documents (%s characters)\n%s", len(texts),
                f"{sum(map(len, texts)):,}", format_scores(scores))
    return scores


if __name__ == "__main__":
    run_main(main)
