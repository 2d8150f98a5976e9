"""One run on two machines, simulated on loopback: each machine is its own directory (its own copy of the
repository: every entry a link except data/ and the output), launched with docs/MULTI_NODE.md's commands
(`--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`, one process each). Plain DDP and DeepSpeed
ZeRO-2, with separate output directories and with one shared between the machines.

Each run is stopped by ctrl+c (SIGINT to both launchers' process groups) after its first checkpoint and
resumed by the same commands; it must end bit-identical to the uninterrupted run of one machine with 2
processes (the same arithmetic: the same gloo all-reduce of 2 ranks, the same data order), and every machine
must hold the same complete checkpoints and final model. Machines whose latest checkpoints differ are refused
on both, naming each machine's step, instead of hanging or training on from two steps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, digest
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")
PER_LAUNCH_S = 600  # a bound, not a timing: no launch may hang the suite


def documented_commands() -> dict[str, list[str]]:
    """The two-machine launch lines of docs/MULTI_NODE.md, by launcher: `ddp` and `zero2`."""
    text = (REPO / "docs" / "MULTI_NODE.md").read_text(encoding="utf-8")
    lines = [" ".join(part.strip().rstrip("\\") for part in match.split("\n"))
             for match in re.findall(r"^accelerate launch (?:[^\n]*\\\n)*[^\n]*", text, flags=re.M)]
    found = {}
    for line in lines:
        if "--num_machines 2" in line and "--machine_rank 0" in line and "pre_train.py" in line:
            found["zero2" if "--config_file accelerate.yaml" in line else "ddp"] = line.split()
    assert set(found) == {"ddp", "zero2"}, f"docs/MULTI_NODE.md lacks a two-machine command: {lines}"
    return found


def port() -> str:
    port.calls += 1
    return str(29500 + (os.getpid() * 7 + port.calls) % 3000)


port.calls = 0


def machine_copy(root: Path, data: dict[str, Path]) -> Path:
    """A machine's own copy of the repository: every entry a link, except data/ (its own copy of the corpus
    and tokenizer) and model_save/ (its own outputs)."""
    root.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in ("data", "model_save", ".git") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    for name, source in data.items():
        target = root / "data" / name
        shutil.copytree(source, target) if source.is_dir() else (target.parent.mkdir(exist_ok=True),
                                                                  shutil.copy2(source, target))
    return root


def command(kind: str, machines: int, rank: int, master_port: str) -> list[str]:
    """The documented command for machine `rank` of `machines` (one process each), on loopback."""
    line = documented_commands()[kind]
    args = line[2:line.index("pre_train.py")]  # after `accelerate launch`
    values = {"--num_machines": str(machines), "--num_processes": "2", "--machine_rank": str(rank),
              "--main_process_ip": "127.0.0.1", "--main_process_port": master_port}
    for flag, value in values.items():
        args[args.index(flag) + 1] = value
    if machines == 1:
        for flag in ("--machine_rank", "--main_process_ip"):
            del args[args.index(flag):args.index(flag) + 2]
    if kind == "ddp":
        args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # CPU: no GPU default to pick them
    return [*ACCELERATE, *args, "pre_train.py"]


TRAINING = ["--config", "none", "--model_config", "t5-tiny", "--tokenizer_name_or_path", "data/tokenizer",
            "--train_files", "data/corpus.jsonl", "--validation_files", "data/corpus.jsonl",
            "--output_dir", "model_save/run", "--block_size", "64", "--max_source_length", "64",
            "--per_device_train_batch_size", "2", "--max_steps", "40", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "5",
            "--save_total_limit", "2", "--report_to", "none", "--seed", "3", "--preprocessing_num_workers", "1"]


def launch(kind: str, directories: list[Path], stop_after_checkpoint: bool = False) -> list[tuple[int, str]]:
    """Start one launcher per directory (machine 0 first), optionally send SIGINT to every launcher's process
    group once machine 0 holds its first checkpoint, and wait for all: [(exit code, log)] by machine."""
    master = port()
    processes, logs = [], []
    for rank, directory in enumerate(directories):
        log = open(directory.parent / f"{directory.name}-{rank}-{len(list(directory.parent.glob('*.log')))}.log",
                   "w+")
        processes.append(subprocess.Popen([*command(kind, len(directories), rank, master), *TRAINING],
                                          cwd=directory, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + PER_LAUNCH_S
    if stop_after_checkpoint:
        output = directories[0] / "model_save" / "run"
        while time.monotonic() < deadline and all(p.poll() is None for p in processes) \
                and not list(output.glob("checkpoint-*")):
            time.sleep(0.05)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
    results = []
    for process, log in zip(processes, logs):
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            raise
        log.seek(0)
        results.append((process.returncode, log.read()))
        log.close()
    return results


def weights(directory: Path) -> dict:
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def data(tiny_corpus, tiny_tokenizer) -> dict[str, Path]:
    return {"corpus.jsonl": tiny_corpus, "tokenizer": tiny_tokenizer}


@pytest.fixture(scope="module")
def one_machine(data, tmp_path_factory):
    """The uninterrupted reference of a launcher: one machine with 2 processes (run once per module); returns
    its output directory."""
    runs: dict[str, Path] = {}

    def run(kind: str) -> Path:
        if kind not in runs:
            machine = machine_copy(tmp_path_factory.mktemp(f"one-{kind}") / "one", data)
            (code, log), = launch(kind, [machine])
            assert code == 0, log[-4000:]
            runs[kind] = machine / "model_save" / "run"
        return runs[kind]
    return run


def assert_equal_runs(output: Path, reference: Path) -> None:
    got, want = weights(output), weights(reference)
    assert got.keys() == want.keys()
    assert all(got[name].equal(want[name]) for name in want), "the resumed run differs from the uninterrupted one"


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_two_machines_without_shared_storage_resume_bit_identical(kind, data, one_machine, tmp_path):
    reference = one_machine(kind)
    machines = [machine_copy(tmp_path / f"machine{rank}", data) for rank in range(2)]
    outputs = [machine / "model_save" / "run" for machine in machines]

    stopped = launch(kind, machines, stop_after_checkpoint=True)
    for code, log in stopped:  # every worker saved and exited 0; the launcher re-raises the signal it passed on
        assert code == 130 and "KeyboardInterrupt" not in log, log[-4000:]
    assert stopped[0][1].count("stopped at step") == 1, stopped[0][1][-4000:]
    assert "do not share model_save/run: each keeps a complete copy" in stopped[0][1]
    saved = [sorted(p.name for p in output.glob("checkpoint-*")) for output in outputs]
    assert saved[0] and saved[0] == saved[1], saved
    assert not any((output / ".staging").exists() or (output / "model.safetensors").exists() for output in outputs)
    # every machine holds the whole checkpoint, the same bytes: DeepSpeed's `latest` and model states, every
    # rank's RNG state and ZeRO shard, the run record
    latest = outputs[0] / saved[0][-1]
    assert digest(latest) == digest(outputs[1] / saved[0][-1])
    assert {"run.json", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in latest.iterdir()}
    if kind == "zero2":
        names = {p.name for p in latest.rglob("*")}
        assert {"latest", "mp_rank_00_model_states.pt"} <= names
        assert sum("optim_states" in name for name in names) == 2

    # machine 1 lost its checkpoints (a wiped disk): both machines refuse, naming each one's step; nothing hangs
    # and nothing is written
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in saved[1]:
        shutil.move(outputs[1] / name, aside / name)
    before = [digest(output) for output in outputs]
    refused = launch(kind, machines)
    for code, log in refused:
        assert code != 0 and "the machines disagree on the step to resume from: machine 0 (" in log, log[-4000:]
        assert f"): {saved[0][-1]}; machine 1 (" in log and "): none (step 0)" in log
    assert [digest(output) for output in outputs] == before
    for name in saved[1]:
        shutil.move(aside / name, outputs[1] / name)

    finished = launch(kind, machines)
    for code, log in finished:
        assert code == 0, log[-4000:]
    assert f"resuming from model_save/run/{saved[0][-1]}" in finished[0][1]
    assert_equal_runs(outputs[0], reference)
    assert _same_but_data_cache(outputs)

    # run again on both: finished already, on both, and nothing written
    before = [digest(output) for output in outputs]
    again = launch(kind, machines)
    assert all(code == 0 and "this run has finished already" in log for code, log in again[:1])
    assert all(code == 0 for code, _ in again)
    assert [digest(output) for output in outputs] == before


def _same_but_data_cache(outputs: list[Path]) -> bool:
    """The machines' output directories hold the same files, tokenised-data caches aside (each machine
    tokenises its own copy of the corpus)."""
    kept = [{k: v for k, v in digest(output).items() if not k.startswith("data_cache/")} for output in outputs]
    return kept[0] == kept[1]


def test_two_machines_sharing_one_output_directory_save_once_and_resume(data, one_machine, tmp_path):
    """Both machines run in the same directory (a shared filesystem): one copy is written, by machine 0, and
    the resumed run equals the one-machine run."""
    reference = one_machine("ddp")
    shared = machine_copy(tmp_path / "shared", data)
    stopped = launch("ddp", [shared, shared], stop_after_checkpoint=True)
    assert all(code == 130 for code, _ in stopped), stopped[0][1][-4000:]
    assert "do not share" not in stopped[0][1]
    output = shared / "model_save" / "run"
    assert not (output / ".staging").exists() and list(output.glob("checkpoint-*"))
    finished = launch("ddp", [shared, shared])
    assert all(code == 0 for code, _ in finished), finished[1][1][-4000:]
    assert_equal_runs(output, reference)
