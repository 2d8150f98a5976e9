"""Export a trained model for llama.cpp / ollama: one GGUF file and an ollama Modelfile beside it.

    python export.py                                             # config/export.yaml: model_save -> gguf/
    python export.py --model_name_or_path model_save --format gguf --outtype q8_0 --output gguf/model-q8_0.gguf
    ollama create zhlm -f gguf/model-f16.Modelfile && ollama run zhlm   # or: llama-cli -m gguf/model-f16.gguf -cnv

Works with any toolkit output directory (T5 or Llama) whose tokenizer was trained with the default
`--model_type gguf_bpe` or with `sentencepiece` (pre-tokenised as llama.cpp does; the `bpe` option's regex
is refused with that fix). The conversion is llama.cpp's own converter, fetched once by `make llama-cpp`
(see docs/EXPORT.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.gguf import DEFAULT_LLAMA_CPP_DIR, OUTTYPES, export_gguf, ollama_modelfile
from model.inference.generation import is_adapter_dir
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.errors import UserError
from utils.hub import local_dir
from utils.io import check_output_file, write_text_atomic
from utils.logging import setup_logging

logger = logging.getLogger("export")


@dataclass
class ExportArguments:
    model_name_or_path: str = field(default="model_save", metadata={
        "help": "Model directory: any toolkit output (T5 or Llama)."})
    format: str = field(default="gguf", metadata={"help": "Output format: gguf (llama.cpp, ollama).",
                                                  "choices": ["gguf"]})
    outtype: str = field(default="f16", metadata={
        "help": "Tensor type: f16, bf16, f32 or q8_0 (8-bit, half the size of f16).", "choices": list(OUTTYPES)})
    output: str = field(default="gguf/model-f16.gguf", metadata={
        "help": "The GGUF file to write (an existing one is refused unless --overwrite); the Modelfile goes beside "
                "it as <name>.Modelfile."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing --output file and its Modelfile (each written whole or not at all)."})
    llama_cpp_dir: str = field(default=DEFAULT_LLAMA_CPP_DIR, metadata={
        "help": "Where llama.cpp's converter is: convert_hf_to_gguf.py's conversion/ and gguf-py/ "
                "(`make llama-cpp` puts them at the default), or a llama.cpp checkout."})


def main(argv: Sequence[str] | None = None) -> Path:
    setup_logging()
    (args,) = parse_config([ExportArguments], argv, default_recipe=recipe_path("export"), description=__doc__)
    output = Path(args.output)
    for path in (output, output.with_suffix(".Modelfile")):  # before converting
        check_output_file(path, "output", args.overwrite)
    if is_adapter_dir(args.model_name_or_path):
        raise UserError("this is a prefix / P-tuning / prompt-tuning adapter (adapter_config.json, no model): its "
                        "virtual tokens cannot be merged into the weights, and llama.cpp has no place for them",
                        path=args.model_name_or_path, field="model_name_or_path",
                        fix="export a merged model: train with --peft lora or ia3 (merged into --output_dir), or "
                            "use the adapter with chat.py / serve.py")
    model_dir = local_dir(args.model_name_or_path, "model_name_or_path")
    logger.info(f"converting {args.model_name_or_path} to {output} ({args.outtype}) with llama.cpp's converter")
    export_gguf(model_dir, output, args.outtype, args.llama_cpp_dir)
    modelfile = output.with_suffix(".Modelfile")
    write_text_atomic(modelfile, ollama_modelfile(output, model_dir))
    logger.info(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and {modelfile}: "
                f"`ollama create NAME -f {modelfile}`, or `llama-cli -m {output} -cnv`")
    return output


if __name__ == "__main__":
    run_main(main)
