"""Configuration for every stage: dataclasses grouped by concern, a YAML recipe, command-line overrides.

    python train_tokenizer.py --config config/tokenizer.yaml --vocab_size 32000

Precedence, lowest to highest: dataclass defaults < the YAML recipe (`--config`, or the stage's default
recipe in `config/` when none is given) < command-line flags. A key that no dataclass declares is an
error, in the recipe as on the command line. The resolved configuration is written next to every output
by `save_config`, so each output directory records exactly how it was made.

Built on `transformers.HfArgumentParser`, so Hugging Face argument dataclasses (`TrainingArguments`,
TRL's configs) plug in unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from utils.errors import UserError
from utils.io import write_text_atomic

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILENAME = "config.yaml"


def recipe_path(name: str) -> Path:
    """The default recipe of a stage, e.g. `recipe_path("tokenizer")` -> `config/tokenizer.yaml`."""
    return REPO_ROOT / "config" / f"{name}.yaml"


def load_recipe(path: str | Path, known_keys: set[str]) -> dict[str, Any]:
    """Read a flat YAML mapping and refuse keys outside `known_keys`, naming the line and a close match."""
    path = Path(path)
    if not path.is_file():
        raise UserError("the recipe file does not exist", path=str(path), field="config",
                        fix="pass an existing YAML file to --config (see config/ for examples)")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"not valid YAML: {getattr(err, 'problem', err)}", path=str(path),
                        line=mark.line + 1 if mark else None,
                        fix="correct the YAML syntax (a flat 'key: value' mapping)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of 'key: value' lines", path=str(path), line=1,
                        fix="write one 'key: value' per line, keys as listed by --help")
    lines = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in root.value}
    for key in data:
        if key not in known_keys:
            close = difflib.get_close_matches(str(key), sorted(known_keys), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError("unknown key", path=str(path), line=lines.get(key), field=str(key),
                            fix=f"{hint}run the script with --help for the accepted keys")
    return data


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *,
                 default_recipe: str | Path | None = None, description: str | None = None) -> tuple:
    """Parse `argv` (default: `sys.argv[1:]`) into one instance of each dataclass type.

    `--config PATH` names a YAML recipe; without it `default_recipe` is used when it exists
    (`--config none` starts from the dataclass defaults alone).
    """
    parser = HfArgumentParser(list(dataclass_types), description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML recipe with defaults for any flag below; flags given on the command "
                             f"line win. 'none' = no recipe. Default: {default_recipe or 'none'}")
    known_keys = {action.dest for action in parser._actions if action.dest not in ("help", "config")}

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    config_arg = pre.parse_known_args(argv)[0].config
    if config_arg is None and default_recipe is not None and Path(default_recipe).is_file():
        config_arg = str(default_recipe)
    recipe: dict[str, Any] = {}
    if config_arg and config_arg.lower() != "none":
        recipe = load_recipe(config_arg, known_keys)
        logger.info("recipe: %s", config_arg)
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        # HfArgumentParser appends a namespace with the attributes no dataclass took (here: --config).
        parsed = parsed[:len(dataclass_types)]
    except ValueError as err:
        # Cross-field checks in the dataclasses' __post_init__ raise ValueError naming the flags.
        raise UserError(str(err), path=config_arg if recipe else None,
                        fix="correct the flags named above (see --help)") from None
    if remaining:
        parser.error(f"unknown arguments: {' '.join(remaining)}")
    return tuple(parsed)


def config_to_dict(*configs: Any) -> dict[str, Any]:
    """Flatten argument dataclasses into one plain mapping (the same flat shape a recipe has)."""
    resolved: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        for key, value in values.items():
            resolved[key] = _plain(value)
    return resolved


def save_config(output_dir: str | Path, *configs: Any) -> Path:
    """Write the resolved configuration as `config.yaml` in `output_dir`; it reloads with `--config`."""
    path = Path(output_dir) / CONFIG_FILENAME
    write_text_atomic(path, yaml.safe_dump(config_to_dict(*configs), allow_unicode=True, sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value  # enums
    return value
