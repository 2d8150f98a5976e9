"""GGUF export: a toolkit model directory (T5 or Llama) as one `.gguf` file for llama.cpp / ollama.

llama.cpp's own converter (the `conversion` package of `convert_hf_to_gguf.py`, with its `gguf-py`) maps
the tensors and hyper-parameters; this module adds only what the toolkit alone knows:

- its tokenizer is llama.cpp's `LLAMA_CPP_PRE` BPE tokenizer (`utils.tokenization.tokenizer`), written with
  gguf's own reader of HF byte-fallback vocabularies, so llama.cpp tokenises to the same ids;
- the chat template in the form llama.cpp renders, and `<|end|>` as the end-of-turn token that stops
  generation (`utils.tokenization.chat_format`);
- a T5 with tied embeddings scales the decoder output by d_model^-0.5 before the LM head in transformers
  and not in llama.cpp, so the scale is folded into an explicit output matrix.

The converter is llama.cpp's, taken from the `llama-cpp-python` source distribution (`make llama-cpp`
fetches it into DEFAULT_LLAMA_CPP_DIR); any llama.cpp checkout works as `llama_cpp_dir`.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from model.inference.generation import context_length, load_for_inference
from utils.errors import UserError
from utils.hub import local_dir
from utils.io import atomic_output_file
from utils.logging import FORMAT
from utils.tokenization.chat_format import END_OF_TURN, gguf_chat_template, ollama_template, prompt_text, render_prompt
from utils.tokenization.tokenizer import llama_cpp_pre_tokenizer

logger = logging.getLogger(__name__)

# The llama.cpp the converter comes from: the one vendored in this llama-cpp-python release (the same
# release is the llama.cpp that bench/bench_gguf.py runs the exported files with).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_LLAMA_CPP_DIR = f"~/.cache/zhlm/llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
CONVERTER_LOGGERS = ("hf-to-gguf", "gguf")  # convert_hf_to_gguf.py's and gguf-py's


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter package and the gguf library beside it."""

    conversion: ModuleType
    gguf: ModuleType


def load_converter(llama_cpp_dir: str | Path) -> Converter:
    """Import llama.cpp's `conversion` package and its own `gguf-py` (PyPI's `gguf` lags behind the
    converter: the same version number, older constants) from `llama_cpp_dir`."""
    root = Path(llama_cpp_dir).expanduser()
    if not (root / "conversion" / "__init__.py").is_file() or not (root / "gguf-py" / "gguf").is_dir():
        raise UserError("llama.cpp's GGUF converter (conversion/ and gguf-py/ of convert_hf_to_gguf.py) is "
                        "not there", path=str(root), field="llama_cpp_dir",
                        fix=f"run `make llama-cpp` (it fetches the converter of llama-cpp-python=="
                            f"{LLAMA_CPP_PYTHON_VERSION} into {DEFAULT_LLAMA_CPP_DIR}), or pass "
                            "--llama_cpp_dir with a llama.cpp checkout")
    for path in (root / "gguf-py", root):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return Converter(importlib.import_module("conversion"), importlib.import_module("gguf"))


def check_exportable(model_dir: Path) -> str:
    """The llama.cpp pre-tokenizer of `model_dir`'s tokenizer; a UserError when llama.cpp has none."""
    path = model_dir / "tokenizer.json"
    try:
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("the model directory has no tokenizer.json", path=str(path), field="model_name_or_path",
                        fix="pass an output directory of pre_train.py / sft_train.py / dpo_train.py") from None
    pre = llama_cpp_pre_tokenizer(tokenizer_json)
    if pre is None:
        raise UserError("llama.cpp has no tokenizer that splits text as this one does (the bpe option's regex, "
                        "a byte-level BPE, or a tokenizer from elsewhere), so its ids would differ there",
                        path=str(path), field="pre_tokenizer", fix="train the tokenizer with train_tokenizer.py "
                        "--model_type gguf_bpe (the default) or sentencepiece, then the model on it")
    return pre


def export_gguf(model_dir: str | Path, output: str | Path, outtype: str = "f16",
                llama_cpp_dir: str | Path = DEFAULT_LLAMA_CPP_DIR) -> Path:
    """Convert `model_dir` into the GGUF file `output` (written whole or not at all); returns `output`. The
    converter's log goes to `converter_log_path(output)` beside it."""
    model_dir, output = Path(local_dir(str(model_dir), "model_name_or_path")), Path(output)
    pre = check_exportable(model_dir)
    converter = load_converter(llama_cpp_dir)
    conversion, gguf = converter.conversion, converter.gguf
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        base = conversion.get_model_class(architecture)
    except NotImplementedError:
        raise UserError(f"llama.cpp's converter does not know the architecture {architecture}",
                        path=str(model_dir / "config.json"), field="architectures",
                        fix="export a T5 or Llama model of the toolkit") from None
    model_class = type(f"Toolkit{base.__name__}", (ToolkitVocab, base),
                       {"llama_cpp_pre": pre, "gguf": gguf, "model_arch": base.model_arch})
    ftype = getattr(gguf.LlamaFileType, {"f32": "ALL_F32"}.get(outtype, f"MOSTLY_{outtype.upper()}"))
    log = converter_log_path(output)
    with atomic_output_file(output, field="output") as tmp, torch.inference_mode(), converter_log(log):
        model = model_class(model_dir, ftype, tmp, model_name=model_dir.resolve().name)
        model.write()
    logger.info("llama.cpp's converter logged to %s", log)
    return output


def converter_log_path(output: str | Path) -> Path:
    """`gguf/model-f16.convert.log` for `gguf/model-f16.gguf`."""
    return Path(output).with_suffix(".convert.log")


@contextmanager
def converter_log(path: Path) -> Iterator[None]:
    """Send the converter's output to `path` instead of the console: its log (a line per tensor and per setting,
    dozens for a tiny model, hundreds for a 7B, which would bury the export's own two lines) and what it writes
    to stdout / stderr itself (its progress bar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "w", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    loggers = [logging.getLogger(name) for name in CONVERTER_LOGGERS]
    saved = [(log.propagate, log.level) for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
    try:
        with redirect_stdout(stream), redirect_stderr(stream):
            yield
    finally:
        for log, (propagate, level) in zip(loggers, saved):
            log.removeHandler(handler)
            log.propagate, log.level = propagate, level
        stream.close()


def ollama_modelfile(gguf_file: str | Path, model_dir: str | Path) -> str:
    """An ollama Modelfile for `gguf_file` (named relative to the Modelfile beside it): the chat template,
    the stop tokens, and the decoding settings of `model_dir`'s generation_config.json."""
    config = GenerationConfig.from_pretrained(model_dir)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stop_ids = [i for i in eos if i is not None]
    stops = dict.fromkeys([END_OF_TURN, *AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(stop_ids)])
    parameters = {"temperature": config.temperature if config.do_sample else 0,  # 0 = greedy in ollama
                  "repeat_penalty": config.repetition_penalty, "num_predict": config.max_new_tokens}
    if config.do_sample:
        parameters.update(top_p=config.top_p, top_k=config.top_k)
    lines = [f"FROM ./{Path(gguf_file).name}", f'TEMPLATE """{ollama_template()}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER {name} {value}" for name, value in parameters.items() if value is not None]
    return "\n".join(lines) + "\n"


class ToolkitVocab:
    """Mixed in before the converter's model class: the toolkit's vocabulary, chat template and stop
    tokens instead of the class's own (which expects a sentencepiece model for T5, and recognises a BPE
    pre-tokenizer only by a hash of a known model's token ids)."""

    llama_cpp_pre: str
    gguf: ModuleType

    def set_vocab(self) -> None:
        gguf, writer = self.gguf, self.gguf_writer
        vocab = gguf.LlamaHfVocab(self.dir_model)  # byte tokens typed BYTE, special tokens CONTROL
        tokens, types = [], []
        for text, _, token_type in vocab.all_tokens():
            tokens.append(text)
            types.append(token_type)
        # the embedding matrix may have more rows than the tokenizer has tokens (rounded up)
        for index in range(len(tokens), self.hparams["vocab_size"]):
            tokens.append(f"[PAD{index}]".encode())
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")  # llama.cpp's BPE tokenizer, with the pre-tokenizer below
        writer.add_tokenizer_pre(self.llama_cpp_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(self.dir_model, load_merges=True, n_vocab=len(tokens))
        tokenizer = vocab.tokenizer
        special.special_token_ids.update(eos=tokenizer.eos_token_id, eot=tokenizer.convert_tokens_to_ids(END_OF_TURN))
        # prompts carry no bos / eos: the toolkit's chat template and tokenizer add none
        special.add_special_token.update(bos=False, eos=False)
        special.chat_template = gguf_chat_template(tokenizer.chat_template)
        special.add_to_gguf(writer)

    def set_gguf_parameters(self) -> None:
        if not any(key in self.hparams for key in ("n_positions", "max_position_embeddings", "n_ctx")):
            # T5's relative positions leave config.json without a length, and the converter then records 512;
            # the model takes what `context_length` says (its tokenizer's model_max_length)
            self.hparams["n_positions"] = context_length(AutoConfig.from_pretrained(self.dir_model),
                                                         AutoTokenizer.from_pretrained(self.dir_model))
        super().set_gguf_parameters()

    def index_tensors(self, *args, **kwargs):
        tensors = super().index_tensors(*args, **kwargs)
        if self.hparams.get("model_type") == "t5" and self.hparams.get("tie_word_embeddings", True) is not False:
            # transformers' T5 multiplies the decoder output by d_model^-0.5 before a tied LM head
            # (T5Config.scale_decoder_outputs); llama.cpp's T5 graph does not, so the LM head it reads
            # is the embedding matrix times that scale (the same logits, whatever the sampler).
            embeddings = tensors[next(name for name in T5_EMBEDDINGS if name in tensors)]
            scale = self.hparams["d_model"] ** -0.5
            tensors["lm_head.weight"] = lambda: embeddings() * scale
        return tensors


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp through `llama-cpp-python`'s low-level bindings, one sequence at a
    time: the check that an export behaves as the model it came from. T5 encodes the prompt, then decodes
    from its decoder start token; a decoder-only model decodes the prompt."""

    def __init__(self, gguf_file: str | Path):
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load report goes there
        self.lib = lib = llama_cpp
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(gguf_file).encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 512
        self.context = lib.llama_init_from_model(self.model, params)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        self.lib.llama_free(self.context)
        self.lib.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids of `text`: no bos / eos added, special tokens (chat tokens) recognised."""
        data = text.encode()
        buffer = (self.lib.llama_token * (len(data) + 8))()
        return list(buffer[:self.lib.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, True)])

    def begin(self, prompt_ids: list[int]) -> np.ndarray:
        """Logits of the first token after `prompt_ids` (a new sequence)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        if self.lib.llama_model_has_encoder(self.model):
            self._batch(self.lib.llama_encode, prompt_ids)
            return self.feed(self.lib.llama_model_decoder_start_token(self.model))
        self._batch(self.lib.llama_decode, prompt_ids)
        return self._last_logits()

    def feed(self, token: int) -> np.ndarray:
        """Logits of the token after `token`, appended to the sequence."""
        self._batch(self.lib.llama_decode, [token])
        return self._last_logits()

    def ends_generation(self, token: int) -> bool:
        """Whether llama.cpp stops at `token` (eos, end of turn: the GGUF's metadata)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def _batch(self, function, ids: list[int]) -> None:
        batch_ids = (self.lib.llama_token * len(ids))(*ids)
        assert function(self.context, self.lib.llama_batch_get_one(batch_ids, len(ids))) == 0

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, -1), shape=(self.n_vocab,)).copy()


@dataclass(frozen=True)
class RoundTrip:
    """One prompt through transformers and through llama.cpp: the prompt ids, the greedy continuations, and
    the reference reply read teacher-forced (the argmax after each of its tokens, the largest logit gap)."""

    transformers_prompt: list[int]
    llama_cpp_prompt: list[int]
    transformers_ids: list[int]
    llama_cpp_ids: list[int]
    forced_tokens: int
    forced_same_argmax: int
    max_logit_difference: float

    @property
    def same_prompt(self) -> bool:
        return self.transformers_prompt == self.llama_cpp_prompt

    @property
    def matching_tokens(self) -> int:
        """Leading generated tokens the two agree on."""
        pairs = list(zip(self.transformers_ids, self.llama_cpp_ids))
        return next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))

    @property
    def identical(self) -> bool:
        return self.same_prompt and self.transformers_ids == self.llama_cpp_ids


def round_trip(model_dir: str | Path, gguf_file: str | Path, messages: list[dict], reply: str,
               max_new_tokens: int) -> RoundTrip:
    """The chat prompt of `messages`, tokenised and greedily continued (argmax, no repetition penalty, up
    to an end-of-generation token or `max_new_tokens`) by the model in transformers (fp32) and by its
    export in llama.cpp; and `reply` after the prompt, teacher-forced through both."""
    model, tokenizer = load_for_inference(str(model_dir), device="cpu", dtype="fp32")
    prompt = prompt_text(tokenizer, messages)
    prompt_ids = render_prompt(tokenizer, messages, max_prompt_tokens=sys.maxsize).ids
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    seq2seq = model.config.is_encoder_decoder
    config = GenerationConfig.from_dict({**model.generation_config.to_dict(), "do_sample": False, "num_beams": 1,
                                         "repetition_penalty": 1.0, "max_new_tokens": max_new_tokens})
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt_ids]), generation_config=config)[0].tolist()
        if seq2seq:
            start = [model.config.decoder_start_token_id]
            forced = model(input_ids=torch.tensor([prompt_ids]),
                           decoder_input_ids=torch.tensor([start + reply_ids[:-1]])).logits[0]
        else:
            forced = model(torch.tensor([prompt_ids + reply_ids])).logits[0, len(prompt_ids) - 1:-1]
    generated = output[1:] if seq2seq else output[len(prompt_ids):]  # T5's output starts with the start token

    llama = LlamaCppModel(gguf_file)
    try:
        llama_prompt = llama.tokenize(prompt)
        logits, llama_generated = llama.begin(llama_prompt), []
        while len(llama_generated) < max_new_tokens and not (llama_generated and
                                                              llama.ends_generation(llama_generated[-1])):
            llama_generated.append(int(logits.argmax()))
            logits = llama.feed(llama_generated[-1])
        llama_forced = [llama.begin(llama_prompt)] + [llama.feed(token) for token in reply_ids[:-1]]
    finally:
        llama.close()
    forced = forced.float().numpy()
    llama_forced = np.stack(llama_forced)
    return RoundTrip(prompt_ids, llama_prompt, generated, llama_generated, len(reply_ids),
                     int((forced.argmax(-1) == llama_forced.argmax(-1)).sum()),
                     float(np.abs(forced - llama_forced).max()))
