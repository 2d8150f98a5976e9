"""Run identity: what makes a training run *this* run, stored with its output and every checkpoint.

A training stage writes into an output directory for hours or days, and the same command resumes it
after ctrl+c. Pointed at a directory that holds another run's work, it must neither overwrite that work
nor "resume" from it. So every run records `run.json` in its output directory (and a copy in every
checkpoint and in the final model): the stage, the model's architecture and configuration, the tokenizer,
the data and its settings, and the training settings that fix the data order and the optimizer. Before
anything is written, `claim_output_dir` compares the stored identity with the new run's:

- same identity, finished (its final model complete, trained to the same --max_steps / --num_train_epochs):
  nothing to do; the command says so and exits 0 without writing a byte;
- same identity otherwise: resume from the latest checkpoint (or start over with `--no_resume`, which clears
  the old checkpoints so a later resume can never pick one of them up). `--overwrite_output_dir` never
  touches the same run: a rerun of an interrupted command resumes, whatever flags it repeats;
- another identity, or a model / checkpoints with no `run.json`: refused, naming every difference, unless
  `--overwrite_output_dir` (which removes the old run's checkpoints and model files, nothing else).

Which settings count is said where they are declared: every field of a stage's model / data / LoRA dataclasses
counts unless its metadata says `"identity": False` (where a model or tokenizer is, worker counts), and of the
training arguments only the fields an arguments class marks with `counts_in_identity` (those that decide the
data order and how the optimizer moves: `model.training.arguments.TRAINING_IDENTITY`, plus DPO's beta, ...).

A run that trains an adapter writes its checkpoints into `--output_dir/adapter` and its merged model into
`--output_dir`; both directories are checked.

What may change between the interrupted run and its resumption: how the global batch is split into
micro-batches, accumulation steps and processes (the examples of each step stay the same; logged with a
warning), the number of steps or epochs (to extend a run), logging / evaluation / saving intervals,
precision, worker counts, and where the model, tokenizer and data are (identified by content, not by path:
two machines keep their copies in different places).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from model.training.machines import one_outcome, settle_storage
from model.training.outputs import FINISHED_FILE, RUN_FILE, checkpoints, clear_run, holds_model
from utils.config import CONFIG_FILENAME
from utils.config import IDENTITY_KEY as IDENTITY
from utils.errors import UserError
from utils.io import write_json_atomic

logger = logging.getLogger(__name__)

# What decides when a run is done: the same run with other values goes on (extends) or is refused.
LENGTH_SETTINGS = ("max_steps", "num_train_epochs")
SAMPLE_BYTES = 2**20  # a data file counts in the identity by its size, first and last MiB
VOLATILE_CONFIG = {"transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _sample_digest(files: Iterable[Path], root: Path) -> str:
    """A digest of each file's name under `root`, size and first and last MiB: the same data wherever a machine
    keeps it, without reading a corpus of many GB at every start."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}:{size}:".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                handle.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:12]


def _files(paths: Iterable[str]) -> list[list]:
    """[name, bytes, content digest] of each input (a directory counts all files under it), or [name, None]
    for a hub dataset name or a missing path. Where the data is does not count: two machines keep their
    copies of a corpus in different places, and a run moved with its data is the same run."""
    out = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            out.append([path.name, sum(p.stat().st_size for p in files), _sample_digest(files, path)])
        elif path.is_file():
            out.append([path.name, path.stat().st_size, _sample_digest([path], path.parent)])
        else:
            out.append([name, None])
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value  # enums
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def global_batch(args) -> int:
    """Examples per optimizer step: micro-batch x accumulation steps x processes (`train_batch_size` is the
    micro-batch of all GPUs one process drives)."""
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


def counts_in_identity(*names: str):
    """Class decorator for an arguments dataclass that mixes in HF's / TRL's training arguments: mark the
    inherited fields `names` as part of a run's identity (field metadata `identity`; the class gets copies of
    those fields, HF's own stay as they are)."""
    def mark(cls):
        for name in names:
            marked = copy.copy(cls.__dataclass_fields__[name])
            marked.metadata = MappingProxyType({**marked.metadata, IDENTITY: True})
            cls.__dataclass_fields__[name] = marked
        return cls
    return mark


def _default(item) -> Any:
    return item.default_factory() if item.default_factory is not MISSING else item.default


def run_identity(stage: str, model, tokenizer, settings: Sequence[Any], args) -> dict:
    """The identity of a run: every field of the stage's model / data / LoRA dataclasses `settings` except those
    whose metadata says `identity: False` (where a model or tokenizer is, worker counts: identified by content or
    changing only speed), `*_files` fields and those marked `identity: "content"` (a teacher model) by name, size
    and content (`_files`), those marked `identity: "unless_default"` only when set; of the training arguments
    `args`, the fields marked `identity: True` (`counts_in_identity`: the data order and the optimizer)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG and not k.startswith("_")}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    values: dict[str, Any] = {}
    for group in settings:
        for item in fields(group) if is_dataclass(group) else ():
            counts = item.metadata.get(IDENTITY, True)
            if counts:
                value = getattr(group, item.name)
                if counts == "unless_default" and value == _default(item):
                    continue  # an option added later: runs made before it, which never set it, stay resumable
                if counts == "content":  # a model directory (a distillation teacher): what it holds
                    values[item.name] = _files([value])[0] if value else None
                else:
                    values[item.name] = _files(value) if item.name.endswith("_files") and value else _plain(value)
    training = {item.name: _plain(getattr(args, item.name)) for item in fields(args) if item.metadata.get(IDENTITY)}
    split = {"per_device": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
             "processes": args.world_size}
    training["global_batch"] = global_batch(args)
    return {"stage": stage,
            "model": {"architecture": type(model).__name__,
                      "config": _digest(json.dumps(_plain(config), sort_keys=True))},
            "tokenizer": {"tokens": len(tokenizer),
                          "digest": _digest(vocabulary + (getattr(tokenizer, "chat_template", None) or ""))},
            "settings": values, "training": training, "batch_split": split}


def read_identity(directory: str | Path) -> dict | None:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError("not valid JSON (a damaged run record)", path=str(path),
                        fix="restore it, or pass --overwrite_output_dir to start the run over") from None


def differences(stored: dict, current: dict) -> list[str]:
    """`key: was -> now` for every identity entry that differs (the batch split is not identity)."""
    out = []
    for section in ("stage", "model", "tokenizer", "settings", "training"):
        old, new = stored.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key, "(unset)") != new.get(key, "(unset)"):
                    out.append(f"{section}.{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
        elif old != new:
            out.append(f"{section}: {old} -> {new}")
    return out


def another_run(directory: Path, identity: dict) -> list[str] | None:
    """What makes the work in `directory` another run's: the differences of its `run.json`, or one line when it
    holds a model or checkpoints without that record; None when it holds this same run or no work at all (a
    `run.json` alone, left by a run refused before its first step, e.g. for bad data the user then fixed)."""
    if not (holds_model(directory) or checkpoints(directory)):
        return None
    stored = read_identity(directory)
    if stored is None:
        return [f"a model or checkpoints with no record of the run that made them ({RUN_FILE})"]
    return differences(stored, identity) or None


def is_finished(directory: Path, identity: dict, args) -> bool:
    """Whether `directory` holds this run's complete final model, trained to the --max_steps /
    --num_train_epochs asked for now (its `config.yaml` records those it ran with)."""
    stored = read_identity(directory)
    if not (directory / FINISHED_FILE).is_file() or stored is None or differences(stored, identity):
        return False
    try:
        recorded = yaml.safe_load((directory / CONFIG_FILENAME).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    return all(recorded.get(name) == getattr(args, name) for name in LENGTH_SETTINGS)


def claim_output_dir(identity: dict, args, final_dir: str | Path | None = None) -> bool:
    """Check that `args.output_dir` (and `final_dir`, where the final model goes when it is elsewhere: a run
    that trains an adapter) is free for this run or holds this same run (see the module docstring), clear
    what the user asked to start over from, and record `run.json`. Call it before writing anything into the
    output directory. Returns True when this run has finished already: nothing was written, and the stage
    has nothing to do. On several machines, every process gets the same answer (`model.training.machines`):
    machines whose copies of the output directory disagree are refused together, each named."""
    root = Path(args.output_dir)
    final = Path(final_dir) if final_dir is not None else root
    settle_storage(args, root)
    return one_outcome(lambda: _claim(identity, args, root, final), "whether this run has finished",
                       lambda finished: "finished" if finished else "not finished",
                       fix="give every machine the same copy of --output_dir (the final model, checkpoints and "
                           f"{RUN_FILE}), or start over on every machine with --no_resume")


def _claim(identity: dict, args, root: Path, final: Path) -> bool:
    """`claim_output_dir` on one process (the first process of each machine that keeps its own copy, or of the
    run, checks first)."""
    fix = "choose another --output_dir, or pass --overwrite_output_dir to replace that run"
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    with args.main_process_first(local=args.save_on_each_node, desc="check the output directory"):
        for directory in dict.fromkeys((final, root)):
            if (changed := another_run(directory, identity)) is None:
                continue
            if not args.overwrite_output_dir:
                raise UserError("the output directory holds another run; it differs in\n    " + "\n    ".join(changed),
                                path=str(directory), field="output_dir",
                                fix=fix + " (or run with the settings above to resume it)")
            if args.should_save:
                logger.warning("--overwrite_output_dir: removing the checkpoints and model of the run in %s",
                               directory)
                clear_run(directory, model_files=True)
        if resume is not None and (other := read_identity(resume)) is not None \
                and (changed := differences(other, identity)):
            raise UserError("the checkpoint belongs to another run; it differs in\n    " + "\n    ".join(changed),
                            path=str(resume), field="resume_from_checkpoint",
                            fix="resume with that run's settings, or start over without --resume_from_checkpoint")
        if resume is None and not args.no_resume and is_finished(final, identity, args):
            logger.info("this run has finished already: its model is in %s. Nothing to do (pass a larger --max_steps "
                        "to train on, or --no_resume to train it again)", final)
            return True
        stored = read_identity(root)
        if args.overwrite_output_dir and stored is not None:
            logger.info("--overwrite_output_dir: %s holds this same run, which goes on (it replaces another run "
                        "only; --no_resume starts this one over)", root)
        if stored is not None and args.no_resume and resume is None and args.should_save:
            if checkpoints(root):
                logger.warning("--no_resume: removing the earlier checkpoints of this run in %s", root)
            clear_run(root, model_files=False)
            (final / FINISHED_FILE).unlink(missing_ok=True)  # until the new final model is complete
        elif stored is not None and stored.get("batch_split") != identity["batch_split"] and checkpoints(root):
            logger.warning("resuming with the global batch of %d split differently (%s, was %s): each step sees the "
                           "same examples, but the result is not bit-identical to an unchanged run",
                           identity["training"]["global_batch"], identity["batch_split"], stored.get("batch_split"))
        if args.should_save:
            root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(root / RUN_FILE, identity)
    return False
