"""GGUF export (export.py): llama.cpp's converter on the tiny T5 and Llama, read back with gguf's reader.

The converter comes from `make llama-cpp` (model.gguf.DEFAULT_LLAMA_CPP_DIR). The llama.cpp round trip
(same prompt ids, same greedy continuation as transformers) runs where `llama_cpp` is importable (`make
llama-cpp-python`); bench/bench_gguf.py runs it on the demo models and records the result.
"""

from __future__ import annotations

import json
import math
import shutil

import jinja2
import pytest
from conftest import run_script
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

import export
from model.gguf import DEFAULT_LLAMA_CPP_DIR, load_converter, round_trip
from model.inference.generation import context_length
from utils.errors import UserError
from utils.tokenization.chat_format import END_OF_TURN
from utils.tokenization.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "图书馆里很安静，学生们在做什么？"}]
REPLY = "学生们在认真地阅读和做笔记。<|end|>"


@pytest.fixture(scope="module")
def exported(tiny_t5, tiny_llama, tmp_path_factory):
    """{name: (model directory, its f16 GGUF)} for the tiny T5 and Llama (default tokenizer), exported once."""
    out = tmp_path_factory.mktemp("gguf")
    return {name: (model, export.main(["--model_name_or_path", str(model), "--output", str(out / f"{name}.gguf")]))
            for name, model in (("t5", tiny_t5), ("llama", tiny_llama))}


def read(path):
    gguf = load_converter(DEFAULT_LLAMA_CPP_DIR).gguf
    reader = gguf.GGUFReader(path)
    return gguf, reader, {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_gguf_holds_the_model_tokenizer_and_chat_format(exported, name):
    model_dir, path = exported[name]
    gguf, reader, meta = read(path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert meta["general.architecture"] == name
    # the context the model takes (T5: its tokenizer's 1024; the converter alone writes 512), what chat.py allows
    assert meta[f"{name}.context_length"] == context_length(AutoConfig.from_pretrained(model_dir), tokenizer) \
        == (1024 if name == "t5" else 256)
    # every weight of the checkpoint, same number of values (T5: plus the scaled LM head of its tied embeddings)
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118 (safe_open)
    hf_values = sum(math.prod(shape) for shape in shapes.values())
    gguf_values = sum(int(t.n_elements) for t in reader.tensors)
    embedding = [t for t in reader.tensors if t.name == "token_embd.weight"][0]
    d_model = min(int(n) for n in embedding.shape)
    assert gguf_values == hf_values + (len(tokenizer) * d_model if name == "t5" else 0)
    assert sorted(int(n) for n in embedding.shape) == sorted([len(tokenizer), d_model])
    # the tokenizer: our tokens and merges, as llama.cpp's BPE tokenizer that splits text as ours does
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "sarvam-moe")
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0xE4>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids(END_OF_TURN)] == gguf.TokenType.CONTROL
    # generation stops at the end of a turn; prompts get no bos / eos
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    # the chat template renders, in plain Jinja, exactly what transformers renders
    template = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    assert template.render(messages=PROMPT, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)


def test_modelfile_beside_the_gguf(exported):
    _, path = exported["llama"]
    modelfile = path.with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./{path.name}\n")
    assert 'PARAMETER stop "<|end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "{{ .Content }}<|end|>" in modelfile and "PARAMETER temperature 0" in modelfile  # greedy model


def test_q8_0_export(tiny_llama, tmp_path, capsys):
    path = export.main(["--model_name_or_path", str(tiny_llama), "--outtype", "q8_0", "--output",
                        str(tmp_path / "q8.gguf")])
    # the converter's line per tensor and setting goes to a log beside the file, not to the console
    console, log = capsys.readouterr(), (tmp_path / "q8.convert.log").read_text(encoding="utf-8")
    assert "hf-to-gguf" not in console.out + console.err and "gguf:" not in console.err.replace("model.gguf:", ""), \
        console
    assert "hf-to-gguf: token_embd.weight" in log and str(tmp_path / "q8.convert.log") in console.err
    gguf, reader, meta = read(path)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tiny_llama, tmp_path):
    """A tokenizer whose pre-tokeniser llama.cpp does not implement (here the `--model_type bpe` option's
    regex) would give other ids there: one clear error, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer_json = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    regex_bpe = json.loads(build_tokenizer("bpe").to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        tokenizer_json[part] = regex_bpe[part]
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    with pytest.raises(UserError, match="llama.cpp has no tokenizer") as err:
        export.main(["--model_name_or_path", str(model), "--output", str(tmp_path / "out" / "m.gguf")])
    assert err.value.field == "pre_tokenizer" and "--model_type gguf_bpe" in err.value.fix
    with pytest.raises(UserError, match="converter") as err:
        export.main(["--model_name_or_path", str(tiny_llama), "--output", str(tmp_path / "out" / "m.gguf"),
                     "--llama_cpp_dir", str(tmp_path / "nowhere")])
    assert "make llama-cpp" in err.value.fix
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cut_weights_and_taken_outputs_are_refused_before_converting(tiny_llama, tmp_path):
    """A model whose weights file was cut short is named (export and chat alike); an --output that is a folder,
    or an existing GGUF without --overwrite, is refused before converting, and nothing is written; with
    --overwrite the file is replaced whole."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_llama, cut)
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    for args in (["export.py", "--output", str(tmp_path / "out" / "m.gguf")], ["chat.py", "--message", "你好"]):
        result = run_script(*args, "--model_name_or_path", str(cut), check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"error: {weights}, field 'model_name_or_path': the weights file is cut short" in result.stderr
    assert not (tmp_path / "out").exists()
    weights.unlink()  # a sharded checkpoint missing a shard
    index = cut / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="lists 1 shard.* not there: model-00002-of-00002.safetensors") as err:
        export.main(["--model_name_or_path", str(cut), "--output", str(tmp_path / "out" / "m.gguf")])
    assert err.value.path == str(index) and not (tmp_path / "out").exists()

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's")
    result = run_script("export.py", "--model_name_or_path", str(tiny_llama), "--output", str(folder), check=False)
    assert result.returncode == 2 and f"error: {folder}, field 'output': is a folder" in result.stderr
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    old = tmp_path / "old.gguf"
    old.write_text("an earlier export")
    with pytest.raises(UserError, match="already exists") as err:
        export.main(["--model_name_or_path", str(tiny_llama), "--output", str(old)])
    assert err.value.field == "output" and "--overwrite" in err.value.fix
    assert old.read_text() == "an earlier export" and not old.with_suffix(".Modelfile").exists()
    export.main(["--model_name_or_path", str(tiny_llama), "--output", str(old), "--overwrite"])
    assert read(old)[2]["general.architecture"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_llama_cpp_continues_as_transformers_does(exported, name):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp-python)")
    model_dir, path = exported[name]
    result = round_trip(model_dir, path, PROMPT, REPLY, max_new_tokens=24)
    assert result.same_prompt and result.identical, result
    assert result.forced_same_argmax == result.forced_tokens and result.max_logit_difference < 0.05, result
