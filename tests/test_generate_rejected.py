"""Rejected-answer generation: valid {prompt, chosen, rejected} triples that the DPO loader reads, rows
where the model repeats the dataset's answer skipped (few pairs warned about, none an error with exit
status 2), and resume after kill -9 (torn and unrecorded lines dropped) giving the same file as an
uninterrupted run."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, SENTENCES, kill_after_first_batch, run_script

import generate_rejected
from model.inference.generation import generate_replies, load_for_inference
from utils.config import parse_config
from utils.data.conversations import load_answered_prompts, load_preferences
from utils.errors import UserError

pytestmark = pytest.mark.slow


def write_inputs(directory, answers=None, rows=6):
    """An instruction file and a preference file (whose own `rejected` is ignored), `rows` each."""
    answers, sentences = answers or {}, SENTENCES[:rows]
    sft = directory / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"请复述：{s}", "response": answers.get(i, s)}, ensure_ascii=False)
                           + "\n" for i, s in enumerate(sentences)), encoding="utf-8")
    dpo = directory / "dpo.jsonl"
    dpo.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"续写：{s[:6]}"}],
                                       "chosen": s, "rejected": "不知道。"}, ensure_ascii=False) + "\n"
                           for s in sentences), encoding="utf-8")
    return [str(sft), str(dpo)]


def command(model, inputs, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--input", *inputs, "--output", str(output),
            "--batch_size", "3", "--max_new_tokens", "8", "--device", "cpu", *map(str, extra)]


def test_writes_triples_and_skips_answers_equal_to_the_dataset(tiny_llama, tmp_path, capfd):
    inputs = write_inputs(tmp_path)
    items = load_answered_prompts(inputs)
    model, tokenizer = load_for_inference(str(tiny_llama), "cpu")
    config = model.generation_config
    config.max_new_tokens = 8
    max_prompt = model.config.max_position_embeddings - 8
    replies = [r for start in range(0, len(items), 3) for r in generate_replies(  # the script's batches
        model, tokenizer, [i["prompt"] for i in items[start:start + 3]], config, 3, max_prompt, progress=False)]
    assert replies[4].strip()
    inputs = write_inputs(tmp_path, answers={4: replies[4]})  # the model "knows" row 4's answer
    output = tmp_path / "out" / "rejected.jsonl"
    counts = generate_rejected.main(command(tiny_llama, inputs, output))
    empty = sum(not r.strip() for r in replies)
    assert counts == {"written": len(items) - 1 - empty, "equal_skipped": 1, "empty_skipped": empty}
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert 4 not in [r["id"] for r in rows]
    for row in rows:
        item = items[row["id"]]
        assert row["prompt"] == item["prompt"] and row["chosen"] == item["chosen"]
        assert row["rejected"] == replies[row["id"]] != row["chosen"]
    pairs = load_preferences([str(output)])  # what dpo_train.py reads
    assert len(pairs) == len(rows) and pairs[0]["prompt"][-1]["role"] == "user"
    progress = json.loads((tmp_path / "out" / "rejected.jsonl.progress.json").read_text())
    assert progress["next_index"] == len(items) and progress["config"]["batch_size"] == 3
    made = (output.read_bytes(), (tmp_path / "out" / "rejected.jsonl.progress.json").read_bytes())
    capfd.readouterr()
    assert generate_rejected.main(command(tiny_llama, inputs, output)) == counts  # done: nothing to add
    assert "nothing to do" in capfd.readouterr().err
    assert (output.read_bytes(), (tmp_path / "out" / "rejected.jsonl.progress.json").read_bytes()) == made

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "别的问题", "response": "别的答案"}, ensure_ascii=False) + "\n" * 2,
                     encoding="utf-8")
    before = output.read_bytes()
    with pytest.raises(UserError, match="begun by another run") as error:  # another run's output is not resumed
        generate_rejected.main(command(tiny_llama, [str(other)], output))
    assert "input: [" in str(error.value) and "--overwrite" in error.value.fix and output.read_bytes() == before
    assert generate_rejected.main(command(tiny_llama, [str(other)], output, "--overwrite"))["written"] <= 1


def test_no_pair_is_an_error_and_few_pairs_a_warning(tiny_llama, tmp_path, capsys):
    # the references are the model's own greedy answers of a first run, so greedy decoding repeats them
    first = tmp_path / "greedy.jsonl"
    (tmp_path / "first").mkdir()
    counts = generate_rejected.main(command(tiny_llama, write_inputs(tmp_path / "first")[:1], first))
    greedy = {row["id"]: row["rejected"] for row in map(json.loads, first.read_text(encoding="utf-8").splitlines())}
    assert counts["written"] == len(greedy) >= 2
    empty = counts["empty_skipped"]

    few = tmp_path / "few"
    few.mkdir()
    kept = min(greedy)  # every row but one gets the model's answer as its reference
    inputs = write_inputs(few, answers={i: a for i, a in greedy.items() if i != kept})[:1]
    capsys.readouterr()
    counts = generate_rejected.main(command(tiny_llama, inputs, few / "rejected.jsonl"))
    assert counts == {"written": 1, "equal_skipped": len(greedy) - 1, "empty_skipped": empty}
    assert f"only 1 of 6 rows (17%) gave a pair ({len(greedy) - 1} answers equalled" in capsys.readouterr().err

    none = tmp_path / "none"
    none.mkdir()
    inputs, output = write_inputs(none, answers=greedy)[:1], none / "rejected.jsonl"
    with pytest.raises(UserError) as err:
        generate_rejected.main(command(tiny_llama, inputs, output))
    assert (f"of the 6 rows read, the model's answer equalled the dataset's in {len(greedy)} and was empty in "
            f"{empty}") in err.value.problem
    assert "--do_sample" in err.value.fix and "--overwrite" in err.value.fix and err.value.path == str(output)
    progress = json.loads((none / "rejected.jsonl.progress.json").read_text())  # a consistent, finished record
    assert output.read_bytes() == b"" and progress["next_index"] == 6 and progress["written"] == 0
    result = run_script("generate_rejected.py", *command(tiny_llama, inputs, output), check=False)
    assert result.returncode == 2 and "error:" in result.stderr and "no preference pair" in result.stderr
    # the fix it names works: sampling, started over
    counts = generate_rejected.main(command(tiny_llama, inputs, output, "--overwrite", "--do_sample", "true",
                                            "--temperature", "1.5"))
    assert counts["written"] > 0


def test_an_output_that_is_a_folder_is_refused_before_the_model_loads(tiny_llama, tmp_path):
    """It ended in a traceback (IsADirectoryError), with --overwrite too; nothing in the folder is touched."""
    inputs, folder = write_inputs(tmp_path)[:1], tmp_path / "rejected"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's")
    for extra in ([], ["--overwrite"]):
        result = run_script("generate_rejected.py", *command(tiny_llama, inputs, folder, *extra), check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"error: {folder}, field 'output': is a folder" in result.stderr
        assert "Loading weights" not in result.stderr and [p.name for p in folder.iterdir()] == ["mine.txt"]


def test_resume_after_kill_equals_an_uninterrupted_run(tiny_t5, tmp_path):
    inputs = write_inputs(tmp_path, rows=8)[:1]
    reference = tmp_path / "reference.jsonl"
    generate_rejected.main(command(tiny_t5, inputs, reference, "--batch_size", "2", "--max_new_tokens", "24"))
    output = tmp_path / "killed.jsonl"
    progress = tmp_path / "killed.jsonl.progress.json"
    done = kill_after_first_batch("generate_rejected.py", command(tiny_t5, inputs, output, "--batch_size", "2",
                                                                   "--max_new_tokens", "24"), progress)
    assert 0 < done < 8
    with open(output, "ab") as handle:  # a batch written but not recorded, then a line cut by the crash
        handle.write(json.dumps({"id": done, "prompt": [], "chosen": "x", "rejected": "y"}).encode() + b"\n")
        handle.write(b'{"id": 99, "prompt": [{"ro')
    generate_rejected.main(command(tiny_t5, inputs, output, "--batch_size", "2", "--max_new_tokens", "24"))
    assert output.read_bytes() == reference.read_bytes()


def test_recipes_parse_and_script_answers_help(capsys):
    for recipe in ("config/generate_rejected.yaml", "config/demo/generate_rejected.yaml"):
        (args,) = parse_config([generate_rejected.GenerateArguments], ["--config", str(REPO / recipe)])
        assert args.input and args.output.endswith(".jsonl")
    with pytest.raises(SystemExit) as done:  # in-process: the script's own entry runs in the kill test
        generate_rejected.main(["--help"])
    assert done.value.code == 0 and "--max_new_tokens" in capsys.readouterr().out
