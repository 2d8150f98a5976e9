"""Tokenizer: lossless round trip with no unknown tokens, HF loading, chat template, extension."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_script, shared_path
from transformers import AutoTokenizer

import train_tokenizer
from utils.errors import UserError
from utils.tokenization.chat_format import CHAT_TOKENS, END_OF_TURN
from utils.tokenization.tokenizer import (
    LLAMA_CPP_PRE,
    llama_cpp_pre_tokenizer,
    round_vocab,
    sample_corpus,
    score_tokenizer,
)

MIXED = ("数学是研究數量的学科 English words, digits 3.14159 and 2026年，emoji 😀🚀👍🏽，全角标点：“引号”！？"
         "ＡＢＣ\n\n  two spaces\tand a tab\r\nend 𠀀𪚥 ĉu ñ Привет こんにちは 안녕 \u200b<0x41> <s> ")


def train(tmp_path, corpus, *args):
    out = tmp_path / "tok"
    report = train_tokenizer.main(["--config", "none", "--input", str(corpus), "--output_dir", str(out),
                                   "--num_sentinels", "8", "--min_frequency", "1", *map(str, args)])
    return out, report


def assert_lossless(tokenizer, text=MIXED):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_default_bpe_round_trips_any_text_without_unknowns(tiny_tokenizer):
    """The default (gguf_bpe): lossless, and split as llama.cpp's sarvam-moe tokenizer does (GGUF export)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert_lossless(tokenizer)
    assert len(tokenizer) <= 1024  # the tiny corpus runs out of merges before 1024
    # merges learnt from the corpus: a sentence of it takes far fewer tokens than characters
    sentence = "图书馆里很安静，学生们在认真地阅读和做笔记。"
    assert len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) < len(sentence) / 2
    # spaces are stored as ▁ and only newlines cut the text, as in llama.cpp's sarvam-moe tokenizer
    backend = tokenizer.backend_tokenizer
    assert backend.normalizer.normalize_str("你 好") == "你▁好"
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("你▁好。\n\n再见")]
    assert pieces == ["你▁好。", "\n\n", "再见"]
    assert llama_cpp_pre_tokenizer(json.loads((tiny_tokenizer / "tokenizer.json").read_text())) == LLAMA_CPP_PRE


def test_special_tokens_and_ids(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) \
        == (0, 1, 2, 3)
    for token in [*CHAT_TOKENS, "<extra_id_0>", "<extra_id_7>"]:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    assert "auto_map" not in config  # loads without remote code


def test_saved_files_have_the_modes_of_a_plain_write(tiny_tokenizer):
    mask = os.umask(0)
    os.umask(mask)
    paths = [tiny_tokenizer, *tiny_tokenizer.rglob("*")]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == \
        {p.name: oct((0o777 if p.is_dir() else 0o666) & ~mask) for p in paths}


def test_chat_template_renders_roles_and_marks_assistant_tokens(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<|system|>\n你是助手。<|end|>\n<|user|>\n你好<|end|>\n"
                    "<|assistant|>\n你好！有什么可以帮你？<|end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\n你好<|end|>\n<|assistant|>\n")
    encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    answer = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(answer) == "你好！有什么可以帮你？" + END_OF_TURN
    with pytest.raises(Exception, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("model_type", ["bpe", "byte_bpe", "sentencepiece"])
def test_other_model_types_round_trip(model_type, tiny_corpus, tmp_path):
    out, report = train(tmp_path, tiny_corpus, "--model_type", model_type, "--vocab_size", "600")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_lossless(tokenizer, MIXED if model_type == "byte_bpe" else MIXED.replace("\r", ""))
    assert report["vocab_size"] <= 640 and tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False) == "<|user|>\n你好<|end|>\n"
    # sentencepiece splits text as llama.cpp's sarvam-moe tokenizer does (GGUF export); bpe's regex and
    # byte_bpe as none of llama.cpp's
    expected = LLAMA_CPP_PRE if model_type == "sentencepiece" else None
    assert llama_cpp_pre_tokenizer(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))) == expected


def test_sampling_within_budget_reports_what_it_took(tiny_corpus):
    from utils.data.sources import split_files

    files = split_files([str(tiny_corpus)], "train")
    full = sample_corpus(files, 0, seed=1)
    part = sample_corpus(files, full.chars_total // 4, seed=1)
    assert full.docs_sampled == full.docs_total == 200
    assert 0.1 < part.chars_sampled / full.chars_total < 0.45
    assert "of 200 documents" in part.describe()
    assert sample_corpus(files, full.chars_total // 4, seed=1).texts == part.texts  # deterministic


def test_training_twice_gives_the_same_tokenizer(tiny_corpus, tmp_path):
    # coverage < 1 cuts the alphabet among characters of equal count, where the BPE trainer's own
    # limit_alphabet would pick by hash-map order: a different vocabulary and merges on every run
    outputs = [train(tmp_path / str(run), tiny_corpus, "--vocab_size", "1024", "--character_coverage", "0.98")[0]
               for run in range(3)]
    first = (outputs[0] / "tokenizer.json").read_bytes()
    assert all((out / "tokenizer.json").read_bytes() == first for out in outputs[1:])
    vocab = json.loads(first)["model"]["vocab"]
    counts = {}
    for text in (json.loads(line)["text"] for line in tiny_corpus.read_text(encoding="utf-8").splitlines()):
        for char in text:
            counts[char] = counts.get(char, 0) + 1
    rarest = min(counts.values())
    assert any(c not in vocab for c, n in counts.items() if n == rarest)  # the cut really left some out


def test_extension_keeps_base_ids_and_adds_chinese_tokens(tiny_corpus, tmp_path):
    base_dir, _ = train(tmp_path / "base", tiny_corpus, "--model_type", "byte_bpe", "--vocab_size", "320")
    base = AutoTokenizer.from_pretrained(base_dir)
    out = tmp_path / "extended"
    report = train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--extend", str(base_dir),
                                   "--vocab_size", "640", "--min_frequency", "1", "--output_dir", str(out)])
    extended = AutoTokenizer.from_pretrained(out)
    assert report["model_type"] == "extended" and len(extended) > len(base)
    for token, token_id in base.get_vocab().items():
        assert extended.convert_tokens_to_ids(token) == token_id
    text = "图书馆里很安静，学生们在认真地阅读。"
    assert len(extended(text)["input_ids"]) < len(base(text)["input_ids"])
    assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text
    assert "<|assistant|>" in extended.get_vocab()


def test_extension_of_real_reference_tokenizer(tiny_corpus, tmp_path):
    anchor = shared_path("chatlm_mini_chinese_tokenizer", env="ZHLM_SHARED_ANCHORS")
    base = AutoTokenizer.from_pretrained(anchor)
    out = tmp_path / "extended"
    train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--extend", str(anchor),
                          "--vocab_size", "2048", "--output_dir", str(out)])
    extended = AutoTokenizer.from_pretrained(out)
    vocab = extended.get_vocab()
    assert all(vocab[token] == token_id for token, token_id in base.get_vocab().items())


def test_report_compares_with_reference_tokenizers(tmp_path):
    corpus = shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl")
    held_out = tmp_path / "held_out.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    held_out.write_text("\n".join(lines[-4:]) + "\n", encoding="utf-8")
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(lines[:-4]) + "\n", encoding="utf-8")
    anchors = shared_path("", env="ZHLM_SHARED_ANCHORS")
    out, report = train(tmp_path, train_file, "--vocab_size", "4000", "--eval_files", held_out,
                        "--reference_tokenizers", anchors / "chatlm_mini_chinese_tokenizer",
                        anchors / "chatglm2_tokenizer" / "tokenizer.model")
    assert report["vocab_size"] == report["requested_vocab_size"] == 4032  # 4000 rounded up to 64
    scores = {s["name"]: s for s in report["scores"]}
    assert set(scores) == {"tok", "chatlm_mini_chinese_tokenizer", "chatglm2_tokenizer"}
    assert scores["tok"]["unk_rate"] == 0.0 and scores["tok"]["chars_per_token"] > 1.0
    assert json.loads((out / "tokenizer_report.json").read_text())["scores"] == report["scores"]


def test_bad_tokenizer_input_is_refused(tmp_path, tiny_corpus):
    with pytest.raises(UserError, match="no such file"):
        train(tmp_path, tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="vocab_size"):
        train(tmp_path, tiny_corpus, "--vocab_size", "10")
    with pytest.raises(UserError, match="no such file or directory") as err:
        train(tmp_path, tiny_corpus, "--extend", tmp_path / "no_tokenizer_here")
    assert err.value.field == "extend"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tokenizer directory"):
        train(tmp_path, tiny_corpus, "--extend", tmp_path / "empty")


@pytest.mark.slow  # runs a script in a process of its own
def test_what_would_fail_after_training_is_refused_before_the_corpus_is_read(tmp_path, tiny_corpus):
    """A missing reference tokenizer was found only after training, and a taken output directory at the end."""
    out = tmp_path / "tok"
    for extra, message, field in ((["--reference_tokenizers", "refs/missing"], "hub is off", "reference_tokenizers"),
                                  (["--reference_tokenizers", "gone.model"], "no such file", "reference_tokenizers"),
                                  ([], "already exists and is not empty", "output_dir")):
        if field == "output_dir":
            out.mkdir()
            (out / "tokenizer.json").write_text("{}")
        result = run_script("train_tokenizer.py", "--config", "none", "--input", str(tiny_corpus), "--output_dir",
                            str(out), *extra, check=False)
        assert result.returncode == 2 and f"field '{field}': " in result.stderr and message in result.stderr
        assert "budget" not in result.stderr  # the corpus sample's log line: refused before it
        assert not out.exists() or [p.name for p in out.iterdir()] == ["tokenizer.json"]


def test_round_vocab():
    assert [round_vocab(v) for v in (64, 65, 32000, 29298)] == [64, 128, 32000, 29312]


def test_score_counts_unknown_tokens(tiny_tokenizer):
    score = score_tokenizer("t", str(tiny_tokenizer), ["图书馆", "abc"])
    assert score.unk_rate == 0.0 and score.tokens >= 2
