"""Shared fixtures: the real data in ../shared (through ZHLM_SHARED_DATA), a small original corpus,
and a tiny tokenizer trained once per session."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Bit-exact comparisons between processes (a resumed run against an uninterrupted one) need MKL's results
# independent of how each process happened to align its buffers; set before torch loads MKL, and inherited
# by the scripts the tests start. Without it the SFT resume test differed by 1 ulp at one step.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest
from safetensors.torch import load_file
from transformers import GenerationConfig

REPO = Path(__file__).resolve().parent.parent  # its modules import through pytest's `pythonpath` (pyproject.toml)
# One intra-op thread per process, the scripts the tests start included (they inherit it): the tiny models gain
# nothing from more, and `make test` runs two pytest workers (pytest-xdist) that share the machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Original sentences written for the tests (no third-party text), mixing scripts, digits and punctuation.
SENTENCES = [
    "春天的早晨，河边的柳树发出了嫩绿的新芽。",
    "小明每天骑自行车去学校，路上大约需要二十分钟。",
    "这座城市在1998年修建了第一条地铁线路，全长18公里。",
    "图书馆里很安静，学生们在认真地阅读和做笔记。",
    "研究人员发现，适量的运动可以帮助人们改善睡眠质量。",
    "老师说：“学习语言最重要的是坚持每天练习。”",
    "这家工厂主要生产竹制家具，产品销往东南亚各国。",
    "在山顶上可以看到远处的湖泊和连绵不断的群山。",
    "他用 Python 写了一个小程序，用来统计每天的步数。",
    "天气预报说明天有小雨，气温在12到18摄氏度之间。",
    "茶叶的种类很多，包括绿茶、红茶、乌龙茶和白茶。",
    "古代的工匠用黏土烧制陶器，后来又发展出了瓷器。",
]


# The modules that take minutes, slowest first. They are collected first, so that the two workers of `make test`
# (which take whole modules, in collection order) start on them and finish together, rather than one worker
# waiting out another's long last module.
SLOW_MODULES = ("test_invariance.py", "test_machines.py", "test_demo.py", "test_pretrain.py", "test_recipes.py",
                "test_bench.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module stays in one piece


def shared_path(name: str, env: str = "ZHLM_SHARED_DATA") -> Path:
    """A path under ../shared (data or anchors). CI sets the variables; locally ../shared is used."""
    root = os.environ.get(env)
    default = REPO.parent / "shared" / ("data" if env == "ZHLM_SHARED_DATA" else "anchors")
    base = Path(root) if root else default
    if not base.exists():
        if root:
            raise FileNotFoundError(f"{env}={root} does not exist")
        pytest.skip(f"shared data not found ({env} unset and {default} missing)")
    return base / name


def served_copy(model: Path, target: Path, never: list[int]) -> Path:
    """A copy of `model` whose generation config never emits the token ids `never`. The tiny test models often
    end a reply at once (an empty reply); tests of streaming, cancelling and the web page need replies that
    run on to max_new_tokens."""
    shutil.copytree(model, target)
    config = GenerationConfig.from_pretrained(target)
    config.suppress_tokens = sorted(set(never))
    config.save_pretrained(target)
    return target


def run_script(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    """Run an entry script as a user would; returns the completed process (stdout+stderr captured)."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


class SummaryTable(logging.Handler):
    """Collects the rows of the table a training stage logs at its end (model/training/summary.py), as
    {label: value}; attached to that module's logger, which `setup_logging` leaves alone (it resets the root's)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.rows: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for line in record.getMessage().splitlines()[1:]:
            label, _, value = line.strip().partition("  ")
            self.rows[label] = value.strip()

    def __enter__(self) -> dict[str, str]:
        logging.getLogger("model.training.summary").addHandler(self)
        return self.rows

    def __exit__(self, *exc) -> None:
        logging.getLogger("model.training.summary").removeHandler(self)


def run_until_interrupted(args, stop_at: int, cwd=REPO, launcher=(sys.executable,), script: str = "pre_train.py"):
    """Start a training script with `args`, send SIGINT (to its whole process group, as ctrl+c does) once
    it logged step `stop_at`, and wait for it to save and exit."""
    log = open(args[args.index("--output_dir") + 1] + ".log", "w+")
    process = subprocess.Popen([*launcher, script, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        log.seek(0)
        if f"step {stop_at}/" in log.read():
            os.killpg(process.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    process.wait(timeout=300)
    log.seek(0)
    return process.returncode, log.read()


def kill_after_first_batch(script: str, args: list[str], progress: Path) -> int:
    """Run `script` with `args` and kill -9 it as soon as its progress record `progress` appears (a batch is on
    disk, the next is being made); returns the record's `next_index`."""
    process = subprocess.Popen([sys.executable, script, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not progress.exists() and process.poll() is None:
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -9  # killed while working, not finished
    return json.loads(progress.read_text())["next_index"]


def digest(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`: equal before and after means nothing changed."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def make_documents(count: int, seed: int = 0, sentences_per_doc: int = 8) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(SENTENCES) for _ in range(sentences_per_doc)) + f"第{i}篇。"
            for i in range(count)]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A jsonl corpus of original text, large enough for a few hundred BPE merges."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for text in make_documents(200):
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    import train_tokenizer

    train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--vocab_size", "1024",
                          "--output_dir", str(out), "--num_sentinels", "8", "--min_frequency", "1"])
    return out


def pretrain_tiny(preset: str, corpus: Path, tokenizer: Path, output: Path, steps: int = 30, *extra: str) -> Path:
    """Pretrain a tiny model of `preset` (t5-tiny / llama-tiny / mixtral-tiny) for `steps` steps (`extra`: more
    flags); returns its directory."""
    import pre_train

    pre_train.main(["--config", "none", "--model_config", preset, "--tokenizer_name_or_path", str(tokenizer),
                    "--train_files", str(corpus), "--validation_files", str(corpus), "--output_dir", str(output),
                    "--block_size", "64", "--max_source_length", "64", "--per_device_train_batch_size", "4",
                    "--max_steps", str(steps), "--learning_rate", "3e-3", "--logging_steps", "10",
                    "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--seed", "3",
                    "--preprocessing_num_workers", "1", *extra])
    return output


@pytest.fixture(scope="session")
def tiny_t5(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny pretrained T5 directory (model + tokenizer with the chat template), built once per session.
    Read-only for tests: copy it before training on top of it in place."""
    return pretrain_tiny("t5-tiny", tiny_corpus, tiny_tokenizer, tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture(scope="session")
def tiny_llama(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny pretrained Llama directory (model + tokenizer with the chat template), built once per session."""
    return pretrain_tiny("llama-tiny", tiny_corpus, tiny_tokenizer, tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny pretrained mixture-of-experts decoder (mixtral-tiny: 4 experts, top-2), built once per session."""
    return pretrain_tiny("mixtral-tiny", tiny_corpus, tiny_tokenizer, tmp_path_factory.mktemp("mixtral") / "model")


def lora_deltas(adapter_dir: Path) -> dict:
    """{base weight name: scaling * B @ A} from a saved LoRA adapter."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            deltas[f"{module}.weight"] = scaling * weights[key.replace(".lora_A.", ".lora_B.")] @ a
    return deltas


@pytest.fixture(scope="module")
def served_tiny_llama(tiny_llama):
    """serve.py's app for the tiny Llama (a 256-token context) on 127.0.0.1, without an API key: (its /v1 URL,
    the model, the tokenizer)."""
    from model.inference.generation import load_for_inference
    from model.inference.service import DecodingOptions
    from model.serving.app import ServeArguments, create_app
    from model.serving.listening import running_in_thread

    model, tokenizer = load_for_inference(str(tiny_llama))
    app = create_app(model, tokenizer, ServeArguments(model_name_or_path=str(tiny_llama)), DecodingOptions())
    with running_in_thread(app) as url:
        yield url + "/v1", model, tokenizer
