"""What a training output directory holds, by name: the one home of the file and folder names that the
checkpoints (`model.training.checkpoints`), the final save and run identity (`model.training.runs`) share.

    model_save/sft/
      run.json                 the run's identity (RUN_FILE), written before the first step
      checkpoint-N/            complete checkpoints; they appear only by a rename out of .staging/
      .staging/                the checkpoint being written (discarded if the run dies meanwhile)
      .final-staging/          the final model being written
      config.json, model.safetensors, tokenizer.json, ...   the final model (MODEL_FILES and OUTPUT_FILES)
      training_summary.json    written last (FINISHED_FILE): the final model is complete
      adapter/                 a LoRA run's checkpoints and adapter, beside its merged model
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from utils.config import CONFIG_FILENAME

RUN_FILE = "run.json"
STAGING_DIR = ".staging"
FINAL_STAGING_DIR = ".final-staging"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "adapter_config.json", "adapter_model.safetensors")
# Written last by the final save, and removed first when a final model is replaced: a directory holding it
# holds a complete final model.
FINISHED_FILE = "training_summary.json"
# A prompt-learning adapter's whole prompt encoder, which PEFT's adapter file leaves out (keep_prompt_encoder)
PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"
# Files a finished stage writes beside the weights (removed with the old model on --overwrite_output_dir).
OUTPUT_FILES = (*MODEL_FILES, PROMPT_ENCODER_FILE, "generation_config.json", FINISHED_FILE, "trainer_state.json",
                CONFIG_FILENAME, RUN_FILE)
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in `directory`, complete or being written (staging folders count: they are a run's work)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and (p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
                                                           or p.name in (STAGING_DIR, FINAL_STAGING_DIR))]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (checkpoints appear only by an atomic rename)."""
    found = [(int(m.group(1)), p) for p in checkpoints(output_dir) if (m := _CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its name checkpoint-N)."""
    state = Path(path) / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    found = _CHECKPOINT.match(Path(path).name)
    return int(found.group(1)) if found else 0


def holds_model(directory: str | Path) -> bool:
    """Whether `directory` itself holds a saved model (checkpoint-N/ and adapter/ inside it do not count)."""
    root = Path(directory)
    return any((root / name).exists() for name in MODEL_FILES) or any(root.glob("model-*.safetensors"))


def clear_run(directory: str | Path, model_files: bool) -> None:
    """Remove a run's checkpoints (and with `model_files`, its final model and records) from `directory`."""
    root = Path(directory)
    for path in checkpoints(root):
        shutil.rmtree(path)
    if model_files:
        for path in [*(root / name for name in OUTPUT_FILES), *root.glob("model-*.safetensors")]:
            path.unlink(missing_ok=True)
