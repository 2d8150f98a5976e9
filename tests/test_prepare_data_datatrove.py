"""The corpus stage as a datatrove pipeline (`prepare_data.py --executor local|slurm|ray`) writes what the builtin
path writes, on real zhwiki data with planted duplicates: the same documents, splits and shards, traditional and
simplified copies of one article removed after OpenCC, evaluation questions removed; its output feeds the next
stage; bad executor settings are one error. Ray runs on a local instance (2 CPUs), Slurm on a real single-node
cluster the tests start on this machine's loopback (tests/local_slurm.py)."""

from __future__ import annotations

import csv
import json
import os

import pytest
from conftest import digest, run_script, shared_path
from local_slurm import local_slurm, missing_programs
from test_prepare_data import prepare, read_corpus, to_traditional

import prepare_data
from utils.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def documented(*args, output):
    """prepare_data.py as docs/CORPUS_AT_SCALE.md runs it: the default recipe, the executor's flags, --input and
    --output_dir (the builtin reference's settings are the recipe's)."""
    return prepare_data.main([*map(str, args), "--output_dir", str(output)])


def corpus_rows(directory):
    """Every shard's rows with its file name, in file order: equal lists mean the same documents, splits, shards
    and order."""
    return [(path.name, row) for path in sorted(directory.glob("*-of-*.parquet")) for row in read_corpus_file(path)]


def read_corpus_file(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def stats_without_seconds(directory):
    stats = json.loads((directory / "stats.json").read_text())
    for row in stats["steps"].values():
        row.pop("seconds")
    return stats


def recipe(directory):
    """The saved config.yaml less what differs between the runs compared (where, and --num_proc)."""
    import yaml

    saved = yaml.safe_load((directory / "config.yaml").read_text())
    return {key: value for key, value in saved.items() if key not in ("output_dir", "num_proc")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The real dump (23 articles, a fifth of their characters traditional), the two wikiextractor outputs (which
    hold 33 near-duplicate articles of each other), and planted documents: an article in simplified and then in
    traditional script, and an article quoting a C-Eval question. Four files."""
    folder = tmp_path_factory.mktemp("inputs")
    articles = [json.loads(line) for line in shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl")
                .read_text(encoding="utf-8").splitlines()]
    with open(shared_path("ceval") / "val" / "modern_chinese_history_val.csv", encoding="utf-8") as handle:
        question = next(row["question"] for row in csv.DictReader(handle) if len(row["question"]) > 30)
    planted = [{"id": "simplified", "text": articles[20]["text"][:900]},
               {"id": "traditional", "text": to_traditional(articles[20]["text"][:900])},
               {"id": "contaminated", "text": articles[21]["text"][:600] + question + articles[22]["text"][:300]}]
    (folder / "planted.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in planted),
                                          encoding="utf-8")
    return [str(shared_path("zhwiki_xml/zhwiki-test-pages.xml")), str(shared_path("zhwiki_text")),
            str(folder / "planted.jsonl"), "--decontaminate", str(shared_path("ceval"))]


@pytest.fixture(scope="module")
def builtin(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "corpus"
    report = prepare("--input", *inputs, "--num_proc", "1", output=out)
    return out, report


def test_builtin_reference_drops_the_planted_duplicates(builtin):
    out, report = builtin
    ids = {row["id"] for row in read_corpus(out)}
    assert "simplified" in ids and "traditional" not in ids  # one article, once OpenCC made them one script
    assert "contaminated" not in ids  # and one real article that shares a 13-gram with C-Eval
    assert report["decontaminated"] == {"ceval": 2} == {"ceval": report["dropped"]["contaminated"]}
    assert report["dropped"]["near_duplicate"] == 34  # the 33 articles in both wikiextractor files, + the copy


def test_local_executor_writes_the_builtin_corpus(inputs, builtin, tmp_path, capfd):
    """Five tasks for four input files: each task takes every fifth record of each file."""
    out = tmp_path / "corpus"
    report = documented("--executor", "local", "--tasks", "5", "--workers", "2", "--input", *inputs, output=out)
    assert corpus_rows(out) == corpus_rows(builtin[0])
    assert stats_without_seconds(out) == stats_without_seconds(builtin[0])
    assert recipe(out) == recipe(builtin[0])
    assert report["documents"] == builtin[1]["documents"]
    work = tmp_path / "corpus.datatrove"
    assert sorted(p.name for p in work.iterdir()) == ["errors", "logs"]  # intermediate files removed, logs kept
    made = digest(out)
    capfd.readouterr()
    assert documented("--executor", "local", "--tasks", "5", "--workers", "2", "--input", *inputs, output=out) == report
    assert "nothing to do" in capfd.readouterr().err and digest(out) == made


def test_the_output_feeds_the_tokenizer_stage(inputs, tmp_path):
    """train_tokenizer.py (and pre_train.py, through the same `split_files`) reads the shards: training on the
    train split, scoring on the validation split."""
    import train_tokenizer

    out = tmp_path / "corpus"
    prepare("--input", *inputs[:3], "--executor", "local", "--tasks", "2", "--validation_ratio", "0.1", output=out)
    tokenizer = tmp_path / "tokenizer"
    train_tokenizer.main(["--config", "none", "--input", str(out), "--vocab_size", "512", "--output_dir",
                          str(tokenizer), "--num_sentinels", "4", "--min_frequency", "1"])
    report = json.loads((tokenizer / "tokenizer_report.json").read_text())
    assert (tokenizer / "tokenizer.json").is_file() and json.dumps(report)


def test_ray_executor_writes_the_builtin_corpus(inputs, builtin, tmp_path):
    """A Ray instance started for the run (RAY_ADDRESS unset: this machine's 2 CPUs); with RAY_ADDRESS (or
    --ray_address) naming a cluster's head, the same command runs there."""
    out = tmp_path / "corpus"
    assert "RAY_ADDRESS" not in os.environ
    documented("--executor", "ray", "--tasks", "2", "--input", *inputs, output=out)
    assert corpus_rows(out) == corpus_rows(builtin[0])
    assert stats_without_seconds(out) == stats_without_seconds(builtin[0])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster (munged, slurmctld, slurmd) on this machine's loopback, partition `cpu`:
    tests/local_slurm.py. `make install` installs Slurm; without it this module's Slurm test is skipped, but not
    under `make test`, where a missing Slurm is a failure."""
    missing = missing_programs()
    if missing and not os.environ.get("ZHLM_MAKE_TEST"):
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): `make install` installs it")
    with local_slurm(tmp_path_factory.mktemp("slurm"), partition="cpu") as cluster:
        yield cluster


def test_slurm_executor_submits_jobs_that_write_the_builtin_corpus(inputs, builtin, tmp_path, slurm, monkeypatch):
    """The command submits one array job per step, each after the one before, and returns; Slurm runs them (the
    tasks through srun, one at a time for --workers 1) and the last one writes what the builtin path writes."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    out = tmp_path / "corpus"
    assert documented("--executor", "slurm", "--slurm_partition", slurm.partition, "--tasks", "2", "--workers", "1",
                      "--input", *inputs, output=out) is None  # submitted: sbatch returns at once
    slurm.wait_for_jobs(timeout=120)
    jobs = slurm.jobs()
    assert {state for _, _, state in jobs} == {"COMPLETED"}, f"{jobs}\n{slurm.logs()}"
    tasks = {"clean_and_sign": 2, "buckets": 2, "keep_first": 1, "write_pieces": 2, "gather_shards": 2, "finish": 1}
    # each step's array tasks, and the job datatrove submits after them to merge their stats
    assert sorted(name for _, name, _ in jobs) == sorted(f"prepare_data_{step}" for step, count in tasks.items()
                                                         for _ in range(count + 1))
    logs = tmp_path / "corpus.datatrove" / "logs"
    for step, count in tasks.items():
        script = (logs / step / "launch_script.slurm").read_text()
        assert "#SBATCH --partition=cpu" in script and f"#SBATCH --array=0-{count - 1}%1" in script
        assert "\nsrun " in script and " launch_pickled_pipeline " in script  # each task a job step
    assert corpus_rows(out) == corpus_rows(builtin[0])
    assert stats_without_seconds(out) == stats_without_seconds(builtin[0])


def test_bad_executor_settings_are_one_error(tmp_path):
    result = run_script("prepare_data.py", "--config", "none", "--input", str(tmp_path), "--executor", "spark",
                        "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--executor" in result.stderr and "invalid choice: 'spark'" in result.stderr
    with pytest.raises(UserError, match="--executor slurm needs --slurm_partition"):
        prepare("--input", str(tmp_path), "--executor", "slurm", output=tmp_path / "out")
    with pytest.raises(UserError, match="--max_docs is for quick trials") as err:
        prepare("--input", str(tmp_path), "--executor", "local", "--max_docs", "5", output=tmp_path / "out")
    assert err.value.field == "max_docs" and not (tmp_path / "out").exists()


def test_bad_input_in_a_task_is_the_reader_error(tmp_path):
    """A malformed row found by a task reaches the command as the builtin path reports it: file, line, field."""
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "好"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match="the text column holds a number") as err:
        prepare("--input", str(bad), "--executor", "local", "--tasks", "2", output=tmp_path / "out")
    assert (err.value.path, err.value.line, err.value.field) == (str(bad), 2, "text")
    assert not (tmp_path / "out").exists()
