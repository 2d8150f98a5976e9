"""GGUF export benchmark (issue 15): does llama.cpp run the exported model as transformers does, and what did
making the tokenizer llama.cpp's cost?

    .venv/bin/python -m bench.bench_gguf                 # demo-size T5 and Llama, ~15-30 min on 2 cores
    .venv/bin/python -m bench.bench_gguf --steps 60      # shorter pretraining (the command is recorded)

1. Pre-tokeniser: the `bpe` option (text split into Han / letter / digit / punctuation runs by a
   regex llama.cpp does not implement) and `gguf_bpe` (llama.cpp's `sarvam-moe`: spaces as ▁, split at
   newlines only), trained on the same real text at two vocabulary sizes; characters per token on the
   held-out wiki articles of bench_tokenizer.py.
2. Export: the demo pipeline's corpus and tokenizer (config/demo/, as gguf_bpe), t5-demo and llama-demo pretrained on it
   with config/demo/pretrain.yaml (cached in bench/_work/gguf/), exported with export.py as f16 and q8_0.
3. Round trip (needs `make llama-cpp-python`): a fixed Chinese chat prompt tokenised by llama.cpp and by
   transformers, and its greedy continuation (48 tokens, no repetition penalty) in both.
"""

from __future__ import annotations

import argparse

import export
import utils.tokenization.tokenizer as tokenization
from bench.bench_tokenizer import split_real_texts
from bench.harness import REPO, WORK, log, markdown_table, run_command, timed, utc_now, write_section
from model.gguf import round_trip

PROMPT = [{"role": "user", "content": "请简单介绍一下中国的首都北京。"}]
REPLY = "北京是中华人民共和国的首都，是全国的政治中心和文化中心，也是一座有三千多年历史的古都。<|end|>"
NEW_TOKENS = 48
VOCAB_SIZES = (8000, 32000)


def compare_pre_tokenizers() -> str:
    train, held_out = split_real_texts()
    held = [record["text"] for record in held_out]
    chars = sum(map(len, held))
    rows = []
    for vocab_size in VOCAB_SIZES:
        for name, model_type in (("bpe: regex", "bpe"), ("gguf_bpe (default): llama.cpp sarvam-moe", "gguf_bpe")):
            with timed() as training:
                tokenizer = tokenization.train_bpe(train, model_type, vocab_size, 100, 2, 0.9995, 16)
            tokens = sum(len(tokenizer.encode(text).ids) for text in held)
            lossless = all(tokenizer.decode(tokenizer.encode(text).ids) == text for text in held)
            rows.append([f"{vocab_size:,}", name, f"{chars / tokens:.3f}", f"{tokens:,}", f"{training.wall_s:.0f}",
                         "yes" if lossless else "no"])
            log(f"vocab {vocab_size}: {name}: {chars / tokens:.3f} chars/token")
    return (f"Trained on {sum(map(len, train)):,} characters of real text, scored on {len(held)} held-out wiki "
            f"articles ({chars:,} characters). llama.cpp's pre-tokeniser lets merges cross from Han characters "
            "into punctuation and across words, which the regex forbids; on Chinese it takes fewer tokens for "
            "the same text, so making it the default costs nothing in compression:\n\n"
            + markdown_table(["vocab", "pre-tokeniser", "chars/token", "tokens", "train s", "lossless"], rows))


def demo_models(steps: int) -> dict[str, object]:
    """{preset: model directory}: the demo corpus and tokenizer, and each demo preset pretrained `steps` steps."""
    root = WORK / "gguf"
    corpus, tokenizer = root / "corpus", root / "tokenizer"
    python = str(REPO / ".venv/bin/python")
    if not (tokenizer / "tokenizer.json").is_file():
        run_command([python, "prepare_data.py", "--config", "config/demo/prepare_data.yaml",
                     "--output_dir", str(corpus)], root / "prepare_data.log")
        run_command([python, "train_tokenizer.py", "--config", "config/demo/tokenizer.yaml", "--input", str(corpus),
                     "--output_dir", str(tokenizer), "--model_type", "gguf_bpe"], root / "tokenizer.log")
    models = {}
    for preset in ("t5-demo", "llama-demo"):
        output = root / f"{preset}-{steps}"
        if not (output / "model.safetensors").is_file():
            log(f"pretraining {preset} for {steps} steps")
            run_command([python, "pre_train.py", "--config", "config/demo/pretrain.yaml", "--model_config", preset,
                         "--tokenizer_name_or_path", str(tokenizer), "--train_files", str(corpus),
                         "--output_dir", str(output), "--max_steps", str(steps), "--eval_strategy", "no",
                         "--save_strategy", "no", "--report_to", "none"], root / f"{preset}.log")
        models[preset] = output
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Pretraining steps of each demo model "
                        "(150 = config/demo/pretrain.yaml).")
    parser.add_argument("--skip_tokenizers", action="store_true", help="Leave out part 1 (no docs update).")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        log("llama_cpp is not installed (make llama-cpp-python): no round trip")

    exports, trips = [], []
    for preset, model_dir in demo_models(args.steps).items():
        for outtype in ("f16", "q8_0"):
            path = WORK / "gguf" / "export" / f"{preset}-{outtype}.gguf"
            with timed() as exporting:
                export.main(["--model_name_or_path", str(model_dir), "--outtype", outtype, "--output", str(path)])
            exports.append([preset, outtype, f"{path.stat().st_size / 1e6:.1f}", f"{exporting.wall_s:.1f}"])
            if llama_cpp is not None:
                result = round_trip(model_dir, path, PROMPT, REPLY, NEW_TOKENS)
                trips.append([preset, outtype, "yes" if result.same_prompt else "no",
                              f"{result.matching_tokens} / {len(result.transformers_ids)}",
                              "yes" if result.identical else "no",
                              f"{result.forced_same_argmax} / {result.forced_tokens}",
                              f"{result.max_logit_difference:.3g}"])
                log(f"{preset} {outtype}: {result}")
    body = [f"Demo models: config/demo/ corpus and tokenizer (`--model_type gguf_bpe`), each preset pretrained "
            f"{args.steps} steps.", "",
            markdown_table(["model", "outtype", "GGUF MB", "export s"], exports), ""]
    if trips:
        body += [f"Round trip in llama.cpp (llama-cpp-python {llama_cpp.__version__}, CPU build) against "
                 f"transformers (fp32): the prompt {PROMPT[0]['content']!r} in the chat template, greedy (argmax, no "
                 f"repetition penalty) for up to {NEW_TOKENS} new tokens; then the reply {REPLY!r} teacher-forced "
                 "after the prompt: positions where both predict the same next token, and the largest difference "
                 "of any logit. f16 must equal transformers token for token; q8_0 is reported.", "",
                 markdown_table(["model", "outtype", "same prompt ids", "same greedy tokens", "identical",
                                 "same argmax (forced)", "max logit diff"], trips), "",
                 "Short pretraining leaves the demo models' greedy replies repetitive, so the teacher-forced "
                 "columns are the stronger check: every position's prediction and every logit agree to f16 / "
                 "q8_0 rounding. The tokenizer mapping is checked by the prompt ids (chat tokens included).", ""]
    if not args.skip_tokenizers:
        body += ["### Pre-tokeniser: bpe and the default gguf_bpe", "", compare_pre_tokenizers()]
        write_section("bench_gguf.py", "GGUF export: llama.cpp round trip, and the tokenizer it needed",
                      ["transformers", "tokenizers", "llama_cpp_python"], "\n".join(body))
    print("\n".join(body))
    log(f"done {utc_now()}")


if __name__ == "__main__":
    main()
