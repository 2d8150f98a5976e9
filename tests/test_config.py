"""Configuration: recipes, precedence, unknown keys, --help, the resolved config saved with outputs."""

from __future__ import annotations

import enum
import errno
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from conftest import REPO, run_script

from utils.cli import run_main
from utils.config import load_recipe, parse_config, save_config
from utils.errors import UserError


@dataclass
class Model:
    width: int = field(default=8, metadata={"help": "hidden size"})
    name: str = field(default="tiny", metadata={"help": "preset"})


@dataclass
class Data:
    files: list[str] = field(default_factory=list, metadata={"help": "inputs"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle"})

    def __post_init__(self):
        if "bad" in self.files:
            raise ValueError("--files must not contain 'bad'")


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Kinds:
    """One field of each kind of type the stages use (HF's `TrainingArguments` included)."""
    ratio: float = field(default=0.5, metadata={"help": "a share"})
    weights: list[float] = field(default_factory=list, metadata={"help": "mixing weights"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "speed"})
    color: Color | str = field(default=Color.RED, metadata={"help": "an enum, as HF writes them"})
    limit: int | None = field(default=None, metadata={"help": "None = no limit"})
    level: str = field(default="info", metadata={"help": "log level", "choices": ["info", "debug"]})
    targets: list[str] | None = field(default=None, metadata={"help": "optional list"})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_recipe_and_cli_precedence(tmp_path):
    recipe = write(tmp_path / "r.yaml", "width: 16\nname: from_yaml\nfiles: [a, b]\n")
    model, data = parse_config([Model, Data], ["--config", str(recipe), "--name", "from_cli"])
    assert (model.width, model.name, data.files, data.shuffle) == (16, "from_cli", ["a", "b"], True)
    model, data = parse_config([Model, Data], ["--config", "none"])
    assert (model.width, model.name, data.files) == (8, "tiny", [])


def test_default_recipe_is_used_when_no_config_given(tmp_path):
    recipe = write(tmp_path / "default.yaml", "width: 32\n")
    (model, _) = parse_config([Model, Data], [], default_recipe=recipe)
    assert model.width == 32
    (model, _) = parse_config([Model, Data], ["--config", "none"], default_recipe=recipe)
    assert model.width == 8


def test_unknown_recipe_key_names_file_line_and_suggestion(tmp_path):
    recipe = write(tmp_path / "r.yaml", "width: 16\n\nwidht: 3\n")
    with pytest.raises(UserError) as err:
        parse_config([Model, Data], ["--config", str(recipe)])
    message = str(err.value)
    assert "r.yaml, line 3" in message and "'widht'" in message and "did you mean 'width'" in message


def test_unknown_cli_flag_and_bad_yaml_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown argument '--no_such_flag'"):
        parse_config([Model, Data], ["--config", "none", "--no_such_flag", "1"])
    with pytest.raises(UserError, match="line 2"):
        load_recipe(write(tmp_path / "bad.yaml", "width: 1\n  name: [unclosed\n"), [Model])
    with pytest.raises(UserError, match="mapping"):
        load_recipe(write(tmp_path / "list.yaml", "- 1\n- 2\n"), [Model])
    with pytest.raises(UserError, match="does not exist"):
        parse_config([Model, Data], ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("flag", ["--wid", "--wid=3", "--fil"])
def test_abbreviated_flags_are_unknown_with_the_full_name_suggested(flag):
    with pytest.raises(UserError) as err:
        parse_config([Model, Data], ["--config", "none", flag, "3"])
    name = "--width" if flag.startswith("--wid") else "--files"
    assert f"unknown argument '{flag}'" in str(err.value) and f"did you mean '{name}'" in str(err.value)


def test_flag_value_of_the_wrong_type_is_a_user_error():
    with pytest.raises(UserError, match="--width: invalid int value: '4.5'"):
        parse_config([Model, Data], ["--config", "none", "--width", "4.5"])


GOOD_VALUES = [  # recipe line -> the value the field gets
    ("files: /data/one.jsonl", "files", ["/data/one.jsonl"]),  # one value for a list field: a one-element list
    ("files: []", "files", []),
    ("width: '16'", "width", 16),  # text that spells a number, as a flag's value would
    ("shuffle: 'no'", "shuffle", False),
    ("ratio: 1", "ratio", 1),  # an int is a float
    ("ratio: 3e-4", "ratio", 3e-4),  # YAML 1.1 reads 3e-4 (no dot) as text
    ("weights: 0.7", "weights", [0.7]),
    ("weights: [1, 0.5]", "weights", [1, 0.5]),
    ("mode: slow", "mode", "slow"),
    ("color: green", "color", "green"),
    ("limit: null", "limit", None),
    ("limit: 3", "limit", 3),
    ("level: debug", "level", "debug"),
    ("targets: q", "targets", ["q"]),
    ("targets:", "targets", None),
]


@pytest.mark.parametrize("line,key,expected", GOOD_VALUES, ids=[case[0] for case in GOOD_VALUES])
def test_recipe_values_fitting_their_field_are_taken(line, key, expected, tmp_path):
    recipe = write(tmp_path / "r.yaml", f"{line}\n")
    parsed = parse_config([Model, Data, Kinds], ["--config", str(recipe)])
    value = next(getattr(config, key) for config in parsed if hasattr(config, key))
    assert value == expected and type(value) is type(expected)


BAD_VALUES = [  # recipe line -> words of the error
    ("width: 4096.5", "expected a whole number, got 4096.5"),
    ("width: [1, 2]", "expected a whole number, got [1, 2]"),
    ("width: true", "expected a whole number, got true"),
    ("width:", "expected a whole number, got null"),
    ("name: 3", "expected a string, got 3"),
    ("name: {a: 1}", "expected a string"),
    ("files: [a, [b]]", "expected a string or a list of them"),
    ("files: 3", "expected a string or a list of them"),
    ("shuffle: 1", "expected true or false"),
    ("shuffle: maybe", "expected true or false"),
    ("ratio: half", "expected a number"),
    ("weights: [a]", "expected a number or a list of them"),
    ("mode: medium", 'expected one of "fast", "slow"'),
    ("color: blue", "expected one of red, green"),
    ("limit: 1.5", "expected a whole number or null"),
    ("level: trace", "expected one of info, debug"),
    ("targets: {a: 1}", "expected a string or a list of them or null"),
]


@pytest.mark.parametrize("line,expected", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_recipe_values_of_the_wrong_type_name_file_line_and_field(line, expected, tmp_path):
    recipe = write(tmp_path / "r.yaml", f"# a comment\n{line}\n")
    with pytest.raises(UserError) as err:
        parse_config([Model, Data, Kinds], ["--config", str(recipe)])
    key = line.split(":")[0]
    assert f"r.yaml, line 2, field '{key}': {expected}" in str(err.value) and "fix:" in str(err.value)


def test_recipe_values_for_hf_training_arguments(tmp_path):
    from model.training.arguments import TrainArguments

    recipe = write(tmp_path / "r.yaml", f"output_dir: {tmp_path}\nreport_to: none\neval_strategy: steps\n"
                                        "eval_steps: 10\nwarmup_steps: 0.1\nlr_scheduler_kwargs: {min_lr: 0.1}\n"
                                        "include_num_input_tokens_seen: all\n")
    (args,) = parse_config([TrainArguments], ["--config", str(recipe)])
    assert (args.report_to, args.eval_strategy, args.eval_steps, args.lr_scheduler_kwargs) == \
        ([], "steps", 10, {"min_lr": 0.1})
    assert args.include_num_input_tokens_seen == "all"  # a valid value the command line cannot give
    write(recipe, f"output_dir: {tmp_path}\neval_strategy: sometimes\n")
    with pytest.raises(UserError, match="line 2, field 'eval_strategy': expected one of no, steps, epoch"):
        parse_config([TrainArguments], ["--config", str(recipe)])


def test_torch_compile_auto_true_false_and_a_saved_config(tmp_path):
    """--torch_compile auto is on with CUDA, off here; true / false as before; a saved config.yaml (YAML
    booleans) reloads. --use_liger_kernel on CPU is one clear error, before any work."""
    from model.training.arguments import TrainArguments

    base = ["--config", "none", "--output_dir", str(tmp_path), "--report_to", "none"]
    values = {value: parse_config([TrainArguments], [*base, "--torch_compile", value])[0].torch_compile
              for value in ("auto", "true", "false")}
    assert values == {"auto": torch.cuda.is_available(), "true": True, "false": False}
    path = save_config(tmp_path, parse_config([TrainArguments], [*base, "--torch_compile", "true"])[0])
    assert yaml.safe_load(path.read_text())["torch_compile"] is True
    assert parse_config([TrainArguments], ["--config", str(path)])[0].torch_compile is True
    with pytest.raises(UserError, match="torch_compile"):
        parse_config([TrainArguments], [*base, "--torch_compile", "sometimes"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--use_liger_kernel needs a CUDA GPU"):
            parse_config([TrainArguments], [*base, "--use_liger_kernel", "true"])


def test_cross_field_error_becomes_user_error():
    with pytest.raises(UserError, match="must not contain 'bad'"):
        parse_config([Model, Data], ["--config", "none", "--files", "bad"])


def test_saved_config_reloads_as_recipe(tmp_path):
    model, data = parse_config([Model, Data], ["--config", "none", "--width", "4", "--files", "x"])
    path = save_config(tmp_path, model, data)
    assert yaml.safe_load(path.read_text()) == {"width": 4, "name": "tiny", "files": ["x"], "shuffle": True}
    again = parse_config([Model, Data], ["--config", str(path)])
    assert again == (model, data)


STAGES = {  # recipe name -> (entry script, its argument dataclasses, writes an --output_dir)
    "prepare_data": ("prepare_data.py", lambda m: [m.InputArguments, m.CleaningArguments, m.DedupArguments,
                                                   m.OutputArguments], True),
    "tokenizer": ("train_tokenizer.py", lambda m: [m.TokenizerArguments], True),
    "pretrain": ("pre_train.py", lambda m: [m.ModelArguments, m.lora.PeftArguments, m.DistillationArguments,
                                            m.DataArguments, m.TrainArguments], True),
    "sft": ("sft_train.py", lambda m: [m.ModelArguments, m.lora.PeftArguments, m.DistillationArguments,
                                       m.DataArguments, m.TrainArguments], True),
    "generate_rejected": ("generate_rejected.py", lambda m: [m.GenerateArguments], False),
    "dpo": ("dpo_train.py", lambda m: [m.ModelArguments, m.LoraArguments, m.DataArguments, m.DPOArguments], True),
    "reward": ("reward_train.py", lambda m: [m.ModelArguments, m.DataArguments, m.RewardArguments], True),
    "grpo": ("grpo_train.py", lambda m: [m.ModelArguments, m.LoraArguments, m.RewardFunctionArguments,
                                         m.PromptDataArguments, m.GRPOArguments], True),
    "chat": ("chat.py", lambda m: [m.ChatArguments, m.DecodingOptions], False),
    "serve": ("serve.py", lambda m: [m.ServeArguments, m.DecodingOptions], False),
    "evaluate": ("eval_model.py", lambda m: [m.EvalArguments], True),
    "export": ("export.py", lambda m: [m.ExportArguments], False),
    "rag": ("rag_chat.py", lambda m: [m.RagArguments], False),
    "distill": ("distill_data.py", lambda m: [m.DistillArguments], False),
}
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "config").rglob("*.yaml") if p.parent.name != "models")


def test_every_recipe_belongs_to_a_stage():
    assert {recipe.stem for recipe in RECIPES} == set(STAGES)


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_recipe_parses(recipe):
    import importlib

    script, types, _ = STAGES[recipe.stem]
    module = importlib.import_module(script[:-3])
    parsed = parse_config(types(module), ["--config", str(REPO / recipe)])
    assert all(parsed)


@pytest.mark.slow  # runs a script in a process of its own
@pytest.mark.parametrize("script,writes_output", [(script, out) for script, _, out in STAGES.values()])
def test_entry_scripts_answer_help(script, writes_output):
    result = run_script(script, "--help")
    assert "--config" in result.stdout
    assert ("--output_dir" in result.stdout) == writes_output


@pytest.fixture(params=["read_only", "under_a_file"])
def unwritable(request, tmp_path):
    """An output path that no one can write, root included (CI runs the tests as root, and root ignores
    permission bits, so a chmod 0555 folder alone would not do): a folder made immutable with `chattr +i`
    as root (chmod 0555 for other users), or a path whose parent is a regular file (ENOTDIR)."""
    if request.param == "under_a_file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        yield tmp_path / "notes.txt" / "out"
        return
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("root needs chattr +i (on a filesystem that supports it) for a folder it cannot write")
    try:
        yield folder / "out"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.slow  # runs a script in a process of its own
@pytest.mark.parametrize("script,args", [
    ("prepare_data.py", ["--input", "nothing.jsonl"]),
    ("train_tokenizer.py", ["--input", "nothing.jsonl"]),
])
def test_unwritable_output_is_one_clear_error_before_any_work(script, args, unwritable):
    result = run_script(script, "--config", "none", *args, "--output_dir", str(unwritable), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {unwritable}, field 'output_dir': cannot write here" in result.stderr
    assert "fix: choose another --output_dir" in result.stderr  # before the missing input is even noticed


def test_system_refusing_a_file_is_a_user_error_at_the_boundary(capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/out/train-00000.parquet")

    with pytest.raises(SystemExit) as done:
        run_main(main, [])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: /data/out/train-00000.parquet: Permission denied\n  fix: ")

    def buggy(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/bug")

    with pytest.raises(FileNotFoundError):  # not the system refusing: a traceback, as for any bug
        run_main(buggy, [])
