"""Where a model, tokenizer or dataset named on the command line comes from: a local path, or the Hugging Face
hub when the name looks like a hub id and the user allowed the hub.

    python sft_train.py --model_name_or_path model_save/pretrain            # a local directory, always
    HF_HUB_OFFLINE=0 python sft_train.py --model_name_or_path Qwen/Qwen2.5-0.5B   # downloaded to the HF cache

The hub is off unless `HF_HUB_OFFLINE` (huggingface_hub's own switch) is set to 0: a mistyped local path
then fails at once with the path named, instead of after transformers' network retries (about a minute
for the Chinese-LLaMA recipe without its `models/base`). A hub id is `org/name`: not an existing path, not
starting with `./`, `../`, `/` or `~`, and not ending with a file extension.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError

HUB_SWITCH = "HF_HUB_OFFLINE"
_HUB_ID = re.compile(r"^[\w-][\w.-]*/[\w.-]+$")
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")  # ".jsonl", ".gguf"; not a version such as "Qwen2.5"
ALLOW_HUB = f"run the command with {HUB_SWITCH}=0 (it then downloads the name from the hub)"


def hub_allowed() -> bool:
    """Whether the user allowed the hub: `HF_HUB_OFFLINE` set to 0 / false / no / off."""
    return os.environ.get(HUB_SWITCH, "").strip().lower() in {"0", "false", "no", "off"}


def looks_like_hub_id(name: str) -> bool:
    """`org/name` that is no local path (see the module docstring)."""
    return (bool(_HUB_ID.match(name)) and not name.startswith(".") and not _EXTENSION.search(name)
            and not Path(name).exists())


def from_hub(name: str) -> bool:
    """Whether `name` is to be read from the hub: it looks like a hub id and the hub is allowed."""
    return looks_like_hub_id(name) and hub_allowed()


def missing_path(name: str, field: str | None, fix: str) -> UserError:
    """The error for a local path that does not exist; for a name that looks like a hub id, it says how to
    allow the hub."""
    if looks_like_hub_id(name):
        return UserError("no such local file or directory (the name looks like a hub id, but the hub is off)",
                         path=name, field=field, fix=f"{fix}; or, for the hub, {ALLOW_HUB}")
    return UserError("no such file or directory", path=name, field=field, fix=fix)


MODEL_FIX = "pass an output directory of pre_train.py / sft_train.py / dpo_train.py, e.g. model_save"


def local_dir(name: str, field: str, needs: Sequence[str] = ("config.json",), what: str = "model directory",
              fix: str = MODEL_FIX) -> str:
    """`name` as a local directory holding one of the files `needs`: the directory itself, or, for a hub id
    when the hub is allowed, its snapshot in the HF cache (downloaded once). Every stage loads models and
    tokenizers through this, so nothing downstream looks anything up on the network."""
    if from_hub(name):
        from huggingface_hub import snapshot_download

        try:
            # PyTorch weights only: the other frameworks' copies in a repository are never read here
            path = snapshot_download(name, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf",
                                                            "*.pth", "original/*"])
        except Exception as err:  # unknown or gated repository, no network: all the user's to fix
            raise UserError(f"cannot download it from the hub ({type(err).__name__}: {err})", path=name, field=field,
                            fix="check the hub id and the network (a gated model needs HF_TOKEN), or pass a "
                                "local directory") from None
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise missing_path(name, field, fix)
    if not any((Path(path) / need).is_file() for need in needs):
        raise UserError(f"not a {what} (no {' or '.join(needs)})", path=name, field=field, fix=fix)
    check_safetensors(Path(path), field)
    return str(path)


def check_safetensors(directory: Path, field: str) -> None:
    """Refuse a `.safetensors` file in `directory` that was cut short (an interrupted copy or download), naming
    it, before any work: its header must be whole and its tensors must end within the file. Reading the
    header costs a few kB; without this the error comes from deep inside a loader or converter, mid-way. A
    sharded checkpoint's index must name only shards that are there."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError("the weights index is not valid JSON with a weight_map", path=str(index), field=field,
                            fix="copy or download the model again") from None
        missing = sorted(str(shard) for shard in shards if not (directory / str(shard)).is_file())
        if missing:
            raise UserError(f"the weights index lists {len(missing)} shard(s) that are not there: "
                            f"{', '.join(missing[:3])}", path=str(index), field=field,
                            fix="copy or download the model again (every shard the index lists)")
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little") if size >= 8 else size
            header = handle.read(length) if 8 + length <= size else b""
        try:
            tensors = json.loads(header)
            end = 8 + length + max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"),
                                   default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            end = None
        if end is None or end > size:
            promised = "its header is incomplete or unreadable" if end is None else f"its header promises {end:,}"
            raise UserError(f"the weights file is cut short or corrupt ({size:,} bytes; {promised})",
                            path=str(file), field=field, fix="copy or download the model again")
