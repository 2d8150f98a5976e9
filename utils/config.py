"""Configuration for every stage: dataclasses grouped by concern, a YAML recipe, command-line overrides.

    python train_tokenizer.py --config config/tokenizer.yaml --vocab_size 32000

Precedence, lowest to highest: dataclass defaults < the YAML recipe (`--config`, or the stage's default
recipe in `config/` when none is given) < command-line flags. A key that no dataclass declares is an
error, in the recipe as on the command line (where flags are never abbreviated: `--min_cjk` is not
`--min_cjk_ratio`). Each recipe value is checked against its field's type (a single value for a list field
is a one-element list) and refused with its file, line and field otherwise. An output location
(`output_dir`, `output`) that cannot be written is refused here too, before any work. The resolved
configuration is written next to every output by `save_config`, so each output directory records exactly
how it was made.

Built on `transformers.HfArgumentParser`, so Hugging Face argument dataclasses (`TrainingArguments`,
TRL's configs) plug in unchanged.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import json
import logging
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from utils.errors import UserError
from utils.io import check_writable, write_text_atomic

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILENAME = "config.yaml"
OUTPUT_FIELDS = ("output_dir", "output")  # checked for writability before a stage starts work
# Actions of one command, not settings of a run: never saved into a config.yaml, and refused as true in a recipe
# (a saved `overwrite_output_dir: true` rerun to extend a run would delete the run it extends).
ONE_COMMAND_ACTIONS = ("overwrite_output_dir", "overwrite", "no_resume", "resume_from_checkpoint")
# Field metadata that says whether a setting counts in a training run's identity (model/training/runs.py).
IDENTITY_KEY = "identity"
_BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")  # what --flag VALUE accepts
_NO = object()  # "the value does not fit the type"


def recipe_path(name: str) -> Path:
    """The default recipe of a stage, e.g. `recipe_path("tokenizer")` -> `config/tokenizer.yaml`."""
    return REPO_ROOT / "config" / f"{name}.yaml"


def load_recipe(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """Read a flat YAML mapping of the fields of `dataclass_types`: refuse unknown keys (naming the line
    and a close match) and values that do not fit their field's type; return the values as the fields
    take them (a single value for a list field becomes a one-element list)."""
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
    fields = dataclass_fields(dataclass_types)
    checked = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError("unknown key", path=str(path), line=lines.get(key), field=str(key),
                            fix=f"{did_you_mean(str(key), fields)}run the script with --help for the accepted keys")
        if key in ONE_COMMAND_ACTIONS:
            if value not in (None, False, "false", "no"):
                raise UserError(f"'{key}' is an action of one command, not a setting a recipe keeps", path=str(path),
                                line=lines.get(key), field=key,
                                fix=f"remove the line, and pass --{key} on the command line when you mean it")
            continue  # a `false` that configs saved before this rule carry
        annotation, choices = fields[key]
        checked[key] = _coerce(value, annotation)
        wanted = describe_type(annotation)
        if checked[key] is not _NO and choices is not None and not _within(checked[key], choices):
            checked[key], wanted = _NO, "one of " + ", ".join(map(str, choices))
        if checked[key] is _NO:
            shown = json.dumps(value, ensure_ascii=False, default=str)
            quoting = isinstance(value, (int, float, bool)) and _coerce(str(value), annotation) is not _NO
            raise UserError(f"expected {wanted}, got {shown}", path=str(path), line=lines.get(key), field=key,
                            fix=f"set '{key}' to {wanted} (see --help)" +
                                (f"; text that YAML reads as a number or boolean needs quotes: {key}: \"{value}\""
                                 if quoting else ""))
    return checked


class ArgumentParser(HfArgumentParser):
    """HF's parser, which hands a field's metadata to argparse: the keys that are not argparse's (run identity's
    `identity`, model/training/runs.py) are left out."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field):
        if IDENTITY_KEY in field.metadata:
            field = copy.copy(field)
            field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k != IDENTITY_KEY})
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *,
                 default_recipe: str | Path | None = None, description: str | None = None) -> tuple:
    """Parse `argv` (default: `sys.argv[1:]`) into one instance of each dataclass type.

    `--config PATH` names a YAML recipe; without it `default_recipe` is used when it exists
    (`--config none` starts from the dataclass defaults alone).
    """
    parser = ArgumentParser(list(dataclass_types), description=description, allow_abbrev=False,
                              exit_on_error=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML recipe with defaults for any flag below; flags given on the command "
                             f"line win. 'none' = no recipe. Default: {default_recipe or 'none'}")

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config_arg = pre.parse_known_args(argv)[0].config
    if config_arg is None and default_recipe is not None and Path(default_recipe).is_file():
        config_arg = str(default_recipe)
    recipe: dict[str, Any] = {}
    if config_arg and config_arg.lower() != "none":
        recipe = load_recipe(config_arg, dataclass_types)
        logger.info("recipe: %s", config_arg)
        parser.set_defaults(**recipe)  # shown by --help
    fields = dataclass_fields(dataclass_types)
    # Flags not given keep this marker, so recipe values never pass through argparse's conversions again.
    unset = argparse.Namespace(**dict.fromkeys(fields, _NO))
    try:
        namespace, remaining = parser.parse_known_args(argv, namespace=unset)
    except argparse.ArgumentError as err:  # a flag's value that does not fit its type or choices
        raise UserError(str(err), fix="run the script with --help for the accepted values") from None
    if remaining:
        flag = next((arg for arg in remaining if arg.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=")[0].replace("-", "_")
        raise UserError(f"unknown argument '{flag}'" if flag.startswith("-") else f"unexpected argument '{flag}'",
                        fix=f"{did_you_mean(name, [*fields, 'config'], prefix='--')}run the script with --help "
                            "for the accepted flags")
    given = {name: value for name, value in vars(namespace).items() if name in fields and value is not _NO}
    try:
        parsed = parser.parse_dict({**recipe, **given})
    except ValueError as err:
        # Cross-field checks in the dataclasses' __post_init__ raise ValueError naming the flags.
        raise UserError(str(err), path=config_arg if recipe else None,
                        fix="correct the flags named above (see --help)") from None
    for config in parsed:
        for name in OUTPUT_FIELDS:
            if isinstance(getattr(config, name, None), str):
                check_writable(getattr(config, name), field=name)
    return tuple(parsed)


def config_to_dict(*configs: Any) -> dict[str, Any]:
    """Flatten argument dataclasses into one plain mapping (the same flat shape a recipe has)."""
    resolved: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        for key, value in values.items():
            resolved[key] = _plain(value)
    return resolved


def run_config(*configs: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run records of its configuration: `config_to_dict` (with `overrides` on top) less the actions of
    the command (`ONE_COMMAND_ACTIONS`)."""
    return {key: value for key, value in {**config_to_dict(*configs), **(overrides or {})}.items()
            if key not in ONE_COMMAND_ACTIONS}


def save_config(output_dir: str | Path, *configs: Any, overrides: dict[str, Any] | None = None) -> Path:
    """Write the resolved configuration (`run_config`) as `config.yaml` in `output_dir`; it reloads with
    `--config`."""
    path = Path(output_dir) / CONFIG_FILENAME
    write_text_atomic(path, yaml.safe_dump(run_config(*configs, overrides=overrides), allow_unicode=True,
                                           sort_keys=False))
    return path


def already_made(output_dir: str | Path, *configs: Any, inputs: Iterable[str] = ()) -> bool:
    """Whether `output_dir` holds what this same command made before, so that running it again has nothing to
    do (logged): its `config.yaml` equals the one `save_config` would write now, and none of the local `inputs`
    (files, or every file under a folder) changed since it was written. Stages whose output replaces itself
    whole (the corpus, the tokenizer) call it first; `--overwrite_output_dir` makes them again."""
    saved = Path(output_dir) / CONFIG_FILENAME
    try:
        recorded = yaml.safe_load(saved.read_text(encoding="utf-8"))
        made = saved.stat().st_mtime
    except (OSError, yaml.YAMLError):
        return False
    if recorded != yaml.safe_load(yaml.safe_dump(run_config(*configs), allow_unicode=True)):  # as saved, read back
        return False
    for name in inputs:
        path = Path(name)
        for file in (path.rglob("*") if path.is_dir() else [path]):
            if file.is_file() and file.stat().st_mtime > made:
                return False
    logger.info("%s holds the output of this same command, made after its inputs last changed: nothing to do "
                "(pass --overwrite_output_dir to make it again)", output_dir)
    return True


def dataclass_fields(dataclass_types: Iterable[type]) -> dict[str, tuple[Any, Sequence | None]]:
    """Every field a recipe or flag may set: name -> (its type, the `choices` of its metadata or None).

    Every field has a default: argparse would demand a field without one on the command line even when the
    recipe gives it (and the stages' defaults are what chains them through data/ and model_save/)."""
    fields = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for item in dataclasses.fields(dtype):
            assert not item.init or item.default is not dataclasses.MISSING \
                or item.default_factory is not dataclasses.MISSING, f"{dtype.__name__}.{item.name} needs a default"
            if item.init:
                fields[item.name] = (hints[item.name], item.metadata.get("choices"))
    return fields


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """The hint "did you mean 'X'? " for the known name closest to `name` (one it abbreviates first), or ""."""
    known = sorted(known)
    close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{prefix}{close[0]}'? " if close else ""


def describe_type(annotation: Any) -> str:
    """A field type in words, as an error message asks for it: `list[int]` -> "a whole number or a list of them"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(member) for member in _union_members(args)))
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in annotation)
    if origin is list or annotation is list:
        return f"{describe_type(args[0]) if args else 'a value'} or a list of them"
    if origin is dict or annotation is dict:
        return "a mapping"
    names = {type(None): "null (nothing)", bool: "true or false", int: "a whole number", float: "a number",
             str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _union_members(args: tuple) -> tuple:
    # `IntervalStrategy | str` means "one of the strategy names", as HfArgumentParser reads it
    if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
        return tuple(a for a in args if a is not str)
    return args


def _coerce(value: Any, annotation: Any, promote: bool = True) -> Any:
    """`value` as a field of type `annotation` takes it, or `_NO`. Text that spells a number or a boolean
    becomes one (as a flag's value would); with `promote`, a single value for a list becomes a one-element
    list. Types this does not know (library classes) are left for their dataclass to check."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for allow_promotion in (False, True):  # a value that fits as it is wins over a one-element list
            for member in _union_members(args):
                fitted = _coerce(value, member, allow_promotion)
                if fitted is not _NO:
                    return fitted
        return _NO
    if annotation is type(None):
        return value if value is None else _NO
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NO
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value if isinstance(value, annotation) or value in [m.value for m in annotation] else _NO
    if annotation is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return string_to_bool(value)
        return value if isinstance(value, bool) else _NO
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                return _NO
        kinds = (int,) if annotation is int else (int, float)
        return value if isinstance(value, kinds) and not isinstance(value, bool) else _NO
    if annotation is str:
        return value if isinstance(value, str) else _NO
    if origin is list or annotation is list:
        if value is None or isinstance(value, dict) or (not isinstance(value, list) and not promote):
            return _NO
        items = [_coerce(item, args[0] if args else Any, promote=False)
                 for item in (value if isinstance(value, list) else [value])]
        return _NO if any(item is _NO for item in items) else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return _NO
        if not args:
            return value
        fitted = {_coerce(k, args[0], False): _coerce(v, args[1], False) for k, v in value.items()}
        return _NO if any(k is _NO or v is _NO for k, v in fitted.items()) else fitted
    return value


def _within(value: Any, choices: Sequence) -> bool:
    return value is None or all(item in choices for item in (value if isinstance(value, list) else [value]))


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
