"""A run's output directory is its own: another run's model or checkpoints are neither overwritten nor
resumed unless the user says so, resuming with settings that change the data order or the optimizer is
refused with the differences named, and continued training refuses a tokenizer that renumbers the model's
tokens. Plus the dataset contract that kept evaluation from hanging."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import digest, run_script
from transformers import AutoTokenizer

import pre_train
import sft_train
from model.training.outputs import RUN_FILE
from utils.errors import UserError
from utils.examples.pretrain_data import PackedBlocks, SpanCorruptionBlocks, TokenStream

pytestmark = pytest.mark.slow


def pretrain_args(corpus, tokenizer, output, preset="llama-tiny", *extra):
    return ["--config", "none", "--model_config", preset, "--tokenizer_name_or_path", str(tokenizer),
            "--train_files", str(corpus), "--validation_files", str(corpus), "--output_dir", str(output),
            "--block_size", "64", "--max_source_length", "64", "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--save_steps", "1", "--eval_strategy", "no", "--report_to", "none",
            "--preprocessing_num_workers", "1", "--seed", "3", *map(str, extra)]


@pytest.fixture(scope="module")
def llama_run(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "llama"
    pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, output))
    return output


def test_another_run_is_refused_and_left_as_it_was(llama_run, tiny_corpus, tiny_tokenizer, tiny_llama,
                                                  tmp_path):
    before = digest(llama_run)
    record = json.loads((llama_run / RUN_FILE).read_text())
    assert record["model"]["architecture"] == "LlamaForCausalLM" and record["training"]["global_batch"] == 4
    assert json.loads((llama_run / "checkpoint-2" / RUN_FILE).read_text()) == record  # checkpoints carry it
    cases = {  # what changes -> a line the error must show
        ("--model_config", "t5-tiny"): "model.architecture: LlamaForCausalLM -> T5ForConditionalGeneration",
        ("--per_device_train_batch_size", "2"): "training.global_batch: 4 -> 2",
        ("--learning_rate", "1e-3"): "training.learning_rate: 5e-05 -> 0.001",
        ("--seed", "4"): "training.seed: 3 -> 4",
        ("--block_size", "32"): "settings.block_size: 64 -> 32",
    }
    for (flag, value), line in cases.items():
        args = [*pretrain_args(tiny_corpus, tiny_tokenizer, llama_run), flag, value]  # the last flag wins
        with pytest.raises(UserError, match="holds another run") as error:
            pre_train.main(args)
        assert line in str(error.value) and "--overwrite_output_dir" in error.value.fix
    sft_data = tmp_path / "sft.jsonl"  # outside the run's directory, whose files are compared below
    sft_data.write_text(json.dumps({"prompt": "你好", "response": "你好！"}, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    with pytest.raises(UserError, match="holds another run") as error:  # another stage
        sft_train.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--train_files",
                        str(sft_data), "--validation_ratio", "0", "--output_dir", str(llama_run), "--report_to",
                        "none"])
    assert "stage: pretrain -> sft" in str(error.value)
    assert digest(llama_run) == before  # nothing written


def test_resume_accepts_another_split_of_the_same_global_batch(llama_run, tiny_corpus, tiny_tokenizer, capfd):
    run = pretrain_args(tiny_corpus, tiny_tokenizer, llama_run, "llama-tiny", "--per_device_train_batch_size", "2",
                        "--gradient_accumulation_steps", "2", "--max_steps", "3")
    pre_train.main(run)
    log = capfd.readouterr().err
    assert "split differently" in log and "resuming from" in log


def test_a_run_is_the_same_wherever_its_data_is(llama_run, tiny_corpus, tiny_tokenizer, tmp_path, capfd):
    """Data counts in a run's identity by name, size and content, not by where it is: a second machine's copy in
    another place (or the run moved with its data) resumes; other data of the same name and size is refused."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(llama_run, moved / "run")
    corpus = moved / "data" / tiny_corpus.name
    corpus.parent.mkdir()
    shutil.copy2(tiny_corpus, corpus)
    pre_train.main(pretrain_args(corpus, tiny_tokenizer, moved / "run", "llama-tiny", "--max_steps", "5"))
    assert "resuming from" in capfd.readouterr().err  # (past the steps the other tests of this run trained)
    text = tiny_corpus.read_text(encoding="utf-8")
    corpus.write_text(text.replace("春天", "秋天", 1), encoding="utf-8")  # as many bytes, other text
    assert corpus.stat().st_size == tiny_corpus.stat().st_size
    with pytest.raises(UserError, match="settings.train_files") as error:
        pre_train.main(pretrain_args(corpus, tiny_tokenizer, moved / "run", "llama-tiny", "--max_steps", "6"))
    assert error.value.field == "output_dir"


def test_unrecorded_outputs_and_foreign_checkpoints_are_refused(llama_run, tiny_corpus, tiny_tokenizer, tiny_t5,
                                                                tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(UserError, match="no record of the run"):
        pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, legacy))
    foreign = tmp_path / "foreign"  # a model another tool saved (no run.json)
    shutil.copytree(tiny_t5, foreign)
    (foreign / RUN_FILE).unlink()
    with pytest.raises(UserError, match="no record of the run"):
        pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, foreign))
    with pytest.raises(UserError, match="checkpoint belongs to another run") as error:
        pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, tmp_path / "new", "t5-tiny",
                                     "--resume_from_checkpoint", llama_run / "checkpoint-2"))
    assert error.value.field == "resume_from_checkpoint"


def test_a_record_without_work_is_no_run_to_protect(llama_run, tiny_corpus, tiny_tokenizer, tmp_path):
    """A run.json alone (left by a run refused before its first step, say for data the user then fixed) holds no
    work: another run may start there."""
    output = tmp_path / "run"
    output.mkdir()
    shutil.copy(llama_run / RUN_FILE, output / RUN_FILE)
    trainer = pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, output, "t5-tiny"))
    assert trainer.state.global_step == 2 and json.loads((output / RUN_FILE).read_text())["stage"] == "pretrain"
    assert json.loads((output / RUN_FILE).read_text())["model"]["architecture"] == "T5ForConditionalGeneration"


def test_overwrite_and_no_resume_start_over(tiny_corpus, tiny_tokenizer, tmp_path):
    output = tmp_path / "run"
    pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, output, "llama-tiny", "--max_steps", "3"))
    assert (output / "checkpoint-3").is_dir()
    # the same run again with --no_resume: its old checkpoints go, so a later resume cannot pick checkpoint-3
    pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, output, "llama-tiny", "--no_resume"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    trainer = pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, output, "t5-tiny", "--overwrite_output_dir"))
    assert trainer.state.global_step == 2 and type(trainer.model).__name__ == "T5ForConditionalGeneration"
    assert json.loads((output / RUN_FILE).read_text())["model"]["architecture"] == "T5ForConditionalGeneration"
    assert json.loads((output / "config.json").read_text())["model_type"] == "t5"


def test_continued_training_refuses_a_tokenizer_that_renumbers_the_model(tiny_t5, tiny_corpus, tmp_path):
    import train_tokenizer

    other_text = tmp_path / "other.txt"  # another corpus: another vocabulary in another order
    other_text.write_text("\n\n".join("".join(reversed(line)) for line in tiny_corpus.read_text().splitlines()[:80]),
                          encoding="utf-8")
    train_tokenizer.main(["--config", "none", "--input", str(other_text), "--vocab_size", "1024",
                          "--output_dir", str(tmp_path / "unrelated"), "--num_sentinels", "8", "--min_frequency", "1"])
    train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--vocab_size", "320",
                          "--output_dir", str(tmp_path / "smaller"), "--num_sentinels", "8", "--min_frequency", "1"])
    base = len(AutoTokenizer.from_pretrained(tiny_t5))
    for name in ("unrelated", "smaller"):
        with pytest.raises(UserError, match="does not keep the model's token ids") as error:
            pre_train.main(pretrain_args(tiny_corpus, tmp_path / name, tmp_path / f"out_{name}", "t5-tiny",
                                         "--model_name_or_path", tiny_t5))
        assert "ids differ" in str(error.value) and f"of {base:,} ids" in str(error.value)
        assert error.value.field == "tokenizer_name_or_path" and "--extend" in error.value.fix
        assert not (tmp_path / f"out_{name}").exists()
    result = run_script("pre_train.py", *pretrain_args(tiny_corpus, tmp_path / "smaller", tmp_path / "cli", "t5-tiny",
                                                       "--model_name_or_path", tiny_t5), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_pretraining_datasets_end_where_their_length_says(tiny_corpus, tiny_tokenizer, tmp_path):
    """Iterating a dataset (HF's length-grouped sampler measures examples this way) stops at its end."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    stream = TokenStream.build([str(tiny_corpus)], "train", tokenizer, tmp_path, 1)
    for dataset in (PackedBlocks(stream, 64), SpanCorruptionBlocks(stream, tokenizer, 64, 0.15, 3.0, seed=1)):
        items = [x for x in dataset]  # noqa: C416 (Python's sequence protocol: __getitem__ until IndexError)
        assert len(items) == len(dataset)
        assert torch.equal(torch.as_tensor(dataset[-1]["input_ids"]), torch.as_tensor(items[-1]["input_ids"]))
        with pytest.raises(IndexError):
            dataset[len(dataset)]


def test_options_added_later_count_only_when_set(tiny_llama):
    """A LoRA run recorded before DoRA, rsLoRA and the PEFT methods existed has none of their fields in run.json:
    left at their defaults they are not part of the identity (the run still resumes), set they are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.training.arguments import TrainArguments
    from model.training.lora import PeftArguments
    from model.training.runs import run_identity

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    args = TrainArguments(output_dir="unused", report_to="none")
    plain = run_identity("sft", model, tokenizer, [PeftArguments(peft="lora")], args)["settings"]
    assert {"lora_r", "peft"} <= set(plain) and not {"use_dora", "num_virtual_tokens", "lora_init"} & set(plain)
    dora = run_identity("sft", model, tokenizer, [PeftArguments(peft="lora", use_dora=True)], args)["settings"]
    assert dora == {**plain, "use_dora": True}
