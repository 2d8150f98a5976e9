"""Names on the command line are local paths unless they look like a hub id and the user allowed the hub
(utils/hub.py): a missing model, tokenizer or data path is one error at once, exit status 2, naming the path
and the flag, never a minute of network retries."""

from __future__ import annotations

import pytest
from conftest import run_script

from utils.hub import HUB_SWITCH, from_hub, looks_like_hub_id


@pytest.mark.parametrize("name, hub_id", [
    ("models/base", True), ("Qwen/Qwen2.5-0.5B", True), ("haonan-li/cmmlu", True),
    ("./models/base", False), ("../models/base", False), ("/models/base", False), ("~/base", False),
    ("data/sft.jsonl", False), ("gguf/model.gguf", False), ("a/b/c", False), ("base", False), ("tests", False)])
def test_what_looks_like_a_hub_id(name, hub_id):
    assert looks_like_hub_id(name) is hub_id


@pytest.mark.parametrize("switch, allowed", [(None, False), ("1", False), ("0", True), ("false", True)])
def test_the_hub_is_used_only_when_allowed(monkeypatch, switch, allowed):
    if switch is None:
        monkeypatch.delenv(HUB_SWITCH, raising=False)
    else:
        monkeypatch.setenv(HUB_SWITCH, switch)
    assert from_hub("models/base") is allowed
    assert not from_hub("./models/base")  # a path is never looked up


def refused_at_once(result, name: str, field: str | None):
    assert result.returncode == 2, result.stderr
    error = result.stderr[result.stderr.index("error: "):]
    assert error.startswith(f"error: {name}") and "Traceback" not in result.stderr
    if field:
        assert f"field '{field}'" in error
    assert f"{HUB_SWITCH}=0" in error  # how to reach the hub, since the name looks like a hub id
    return error


@pytest.mark.slow  # runs a script in a process of its own
@pytest.mark.parametrize("script, output_flag", [
    ("sft_train.py", "--output_dir"), ("grpo_train.py", "--output_dir"), ("chat.py", None),
    ("serve.py", None), ("export.py", "--output"), ("generate_rejected.py", "--output")])
def test_a_missing_model_is_refused_by_every_stage(monkeypatch, tmp_path, tiny_tokenizer, script, output_flag):
    monkeypatch.delenv(HUB_SWITCH, raising=False)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "你好", "response": "你好！"}\n' * 10, encoding="utf-8")
    args = [script, "--model_name_or_path", "models/base"]
    args += [output_flag, str(tmp_path / "out")] if output_flag else []
    args += ["--input", str(data)] if script == "generate_rejected.py" else []
    args += ["--train_files", str(data)] if script == "sft_train.py" else []  # the data is read first
    args += ["--message", "你好"] if script == "chat.py" else []
    refused_at_once(run_script(*args, check=False), "models/base", "model_name_or_path")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # runs a script in a process of its own
def test_chinese_llama_recipe_without_its_base_is_refused_at_once(monkeypatch, tmp_path, tiny_corpus, tiny_tokenizer):
    monkeypatch.delenv(HUB_SWITCH, raising=False)
    out = tmp_path / "pretrain"
    result = run_script("pre_train.py", "--config", "config/chinese_llama/pretrain.yaml", "--tokenizer_name_or_path",
                        str(tiny_tokenizer), "--train_files", str(tiny_corpus), "--output_dir", str(out), check=False)
    refused_at_once(result, "models/base", "model_name_or_path")
    assert not out.exists()


@pytest.mark.slow  # runs a script in a process of its own
def test_evaluate_defaults_do_not_reach_the_hub(monkeypatch, tmp_path):
    monkeypatch.delenv(HUB_SWITCH, raising=False)
    result = run_script("eval_model.py", "--output_dir", str(tmp_path / "eval"), check=False)
    refused_at_once(result, "ceval/ceval-exam", "ceval_data")
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow  # runs a script in a process of its own
def test_missing_data_that_looks_like_a_hub_dataset(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.delenv(HUB_SWITCH, raising=False)
    result = run_script("dpo_train.py", "--model_name_or_path", str(tiny_llama), "--train_files", "nowhere/pairs",
                        "--output_dir", str(tmp_path / "out"), check=False)
    refused_at_once(result, "nowhere/pairs", None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # runs a script in a process of its own
def test_with_the_hub_allowed_a_hub_id_that_cannot_be_fetched_is_one_error(monkeypatch, tmp_path):
    """Offline (as here) or a repository that does not exist: either way one error naming the id and the flag."""
    monkeypatch.setenv(HUB_SWITCH, "0")
    result = run_script("chat.py", "--model_name_or_path", "zhlm-tests-no-such-org/no-such-model", "--message", "你好",
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("error: zhlm-tests-no-such-org/no-such-model, field 'model_name_or_path': cannot download it from the hub"
            in result.stderr)
