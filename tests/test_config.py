"""Configuration: recipes, precedence, unknown keys, --help, the resolved config saved with outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_script

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
    with pytest.raises(SystemExit) as exit_info:
        parse_config([Model, Data], ["--config", "none", "--no_such_flag", "1"])
    assert exit_info.value.code != 0
    with pytest.raises(UserError, match="line 2"):
        load_recipe(write(tmp_path / "bad.yaml", "width: 1\n  name: [unclosed\n"), {"width", "name"})
    with pytest.raises(UserError, match="mapping"):
        load_recipe(write(tmp_path / "list.yaml", "- 1\n- 2\n"), {"width"})
    with pytest.raises(UserError, match="does not exist"):
        parse_config([Model, Data], ["--config", str(tmp_path / "missing.yaml")])


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
    "pretrain": ("pre_train.py", lambda m: [m.ModelArguments, m.DataArguments, m.TrainArguments], True),
    "sft": ("sft_train.py", lambda m: [m.ModelArguments, m.DataArguments, m.TrainArguments], True),
    "generate_rejected": ("generate_rejected.py", lambda m: [m.GenerateArguments], False),
    "dpo": ("dpo_train.py", lambda m: [m.ModelArguments, m.LoraArguments, m.DataArguments, m.DPOArguments], True),
    "chat": ("chat.py", lambda m: [m.ChatArguments, m.DecodingOptions], False),
    "serve": ("serve.py", lambda m: [m.ServeArguments, m.DecodingOptions], False),
    "evaluate": ("evaluate.py", lambda m: [m.EvalArguments], True),
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


@pytest.mark.parametrize("script,writes_output", [(script, out) for script, _, out in STAGES.values()])
def test_entry_scripts_answer_help(script, writes_output):
    result = run_script(script, "--help")
    assert "--config" in result.stdout
    assert ("--output_dir" in result.stdout) == writes_output
