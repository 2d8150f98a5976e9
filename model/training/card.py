"""The model card of a final model: `README.md` in the Hugging Face format, written by every training stage's
final save (`model.training.checkpoints.save_final`) beside the weights.

    ---
    language: zh
    library_name: transformers
    pipeline_tag: text-generation        # text2text-generation (T5), text-classification (reward models)
    license: other                       # the user's to choose (license_name says so)
    base_model: hub/id                   # only a hub id: a local directory is named in the lineage instead
    datasets: [hub/id]                   # the hub datasets of the run record; local files are listed in the text
    tags: [zhlm, sft, ...]
    ---
    # <directory name>   training summary, held-out figures, lineage, how to load, chat and serve it

Lineage. `training_summary.json` holds `lineage`: one entry per stage that made this model, oldest first
(pretrain -> sft -> dpo), each with its stage, output directory, steps, tokens, time and held-out loss. A stage
copies its base model's lineage (when the base is a toolkit output) and appends itself, so the chain survives
the base directory being moved or deleted later. huggingface_hub builds and parses the card (`ModelCard`,
`ModelCardData`); nothing here writes YAML by hand.

A README.md in the output directory that the toolkit did not write (no `zhlm` tag) is the user's: it is kept,
and the card goes to MODEL_CARD.md instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from model.build import count_parameters
from model.training.callbacks import format_duration
from model.training.summary import summary_rows
from utils.hub import looks_like_hub_id
from utils.io import cpu_model

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
SIDE_CARD_FILE = "MODEL_CARD.md"  # where the card goes when README.md is the user's own
TAG = "zhlm"  # marks a card this toolkit wrote (and may rewrite)
LICENSE_PLACEHOLDER = "choose-a-license-before-sharing"
_TASKS = {"seq2seq": ("text2text-generation", "AutoModelForSeq2SeqLM"),
          "causal": ("text-generation", "AutoModelForCausalLM"),
          "classifier": ("text-classification", "AutoModelForSequenceClassification")}


def hardware(world_size: int) -> str:
    """What the run ran on: processes and the device each drives."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu_model()})"
    return f"{world_size} process{'es' if world_size > 1 else ''}, {device}"


def lineage_entry(stage: str, output_dir: str | Path, summary: dict, steps: int) -> dict:
    """This stage's line of the lineage: what a reader of the chain wants to know of each link."""
    entry = {"stage": stage, "output_dir": str(output_dir), "steps": steps,
             "tokens": summary.get("num_input_tokens_seen"), "train_runtime": summary.get("train_runtime")}
    losses = {key: value for key, value in summary.items() if key.startswith("eval_") and key.endswith("loss")}
    return {**entry, **losses}


def base_lineage(base: str | None) -> list[dict]:
    """The lineage of the model a run started from: its `training_summary.json`'s, when the base is a toolkit
    output (a directory without one, or a hub id, starts the chain: returned as one entry naming it)."""
    if not base:
        return []
    summary = Path(base) / "training_summary.json"
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("lineage")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, list) and recorded:
        return recorded
    return [{"stage": "base model", "output_dir": base}]


def _kind(model) -> str:
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    return "classifier" if type(model).__name__.endswith("ForSequenceClassification") else "causal"


def _datasets(files: list) -> tuple[list[str], list[str]]:
    """(hub dataset ids for the metadata, every data source as the text names it)."""
    hub = [name for name in files if looks_like_hub_id(str(name)) and not Path(str(name)).exists()]
    return hub, [str(name) for name in files]


def model_card(model, output: Path, config: dict, summary: dict, stage: str, steps: int,
               world_size: int) -> ModelCard:
    """The card of the final model in `output`. `config`: the run's resolved configuration (`config.yaml`);
    `summary`: its `training_summary.json`, with `lineage`."""
    kind = _kind(model)
    pipeline_tag, auto_class = _TASKS[kind]
    base = config.get("model_name_or_path")
    files = [*config.get("train_files", []), *config.get("validation_files", [])]
    hub_datasets, sources = _datasets(files)
    data = ModelCardData(language="zh", library_name="transformers", pipeline_tag=pipeline_tag, license="other",
                         license_name=LICENSE_PLACEHOLDER,
                         base_model=base if base and looks_like_hub_id(base) and not Path(base).exists() else None,
                         datasets=hub_datasets or None, tags=[TAG, stage, model.config.model_type])
    figures = [(label, value) for label, value in summary_rows(summary, steps, output)
               if label not in ("model", "steps", "time")]
    parameters = summary.get("parameters") or count_parameters(model)
    lines = [f"# {output.name}", "",
             f"A {model.config.model_type} model ({type(model).__name__}, {parameters:,} "
             f"parameters) trained with the zhlm toolkit; this card was written by its `{stage}` stage.", "",
             "License: not chosen yet. Set `license:` in the header above (e.g. `apache-2.0`) and remove "
             "`license_name` before sharing; the licenses of the training data apply too.", "",
             "## Training", "", "| | |", "|---|---|", f"| stage | {stage} |",
             f"| steps | {steps:,} |"]
    if summary.get("num_input_tokens_seen"):
        lines.append(f"| tokens | {int(summary['num_input_tokens_seen']):,} |")
    if summary.get("train_runtime") is not None:
        lines.append(f"| time | {format_duration(summary['train_runtime'])} |")
    lines += [f"| hardware | {hardware(world_size)} |", f"| data | {', '.join(sources) or '-'} |"]
    lines += ["", "## Held-out figures", ""]
    lines += ["| | |", "|---|---|", *(f"| {label} | {value} |" for label, value in figures)] if figures else [
        "No held-out set was evaluated."]
    lines += ["", "## Lineage", "", "| stage | model | steps | tokens | time | held-out loss |",
              "|---|---|---|---|---|---|"]
    for entry in summary.get("lineage", []):
        time = format_duration(entry["train_runtime"]) if entry.get("train_runtime") is not None else "-"
        loss = next((f"{v:.4f}" for k, v in entry.items() if k.startswith("eval_") and isinstance(v, float)), "-")
        tokens = f"{entry['tokens']:,}" if entry.get("tokens") else "-"
        lines.append(f"| {entry['stage']} | `{entry['output_dir']}` | {entry.get('steps', '-')} | {tokens} | {time} | "
                     f"{loss} |")
    lines += ["", "## Use", "", "```python", f"from transformers import AutoTokenizer, {auto_class}", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{output}")',
              f'model = {auto_class}.from_pretrained("{output}")', "```", ""]
    if kind != "classifier":
        lines += ["```bash", f"python chat.py --model_name_or_path {output}",
                  f"python serve.py --model_name_or_path {output} --port 8000   # OpenAI API",
                  "```", "", "Prompts use the tokenizer's chat template (system, user and assistant turns).", ""]
    else:
        lines += ["A reward model: one score per (prompt, answer); `grpo_train.py --reward_model` reads it.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: Path, output: Path, model, config: dict, summary: dict, stage: str, steps: int,
                     world_size: int) -> None:
    """Write the card into `folder` (the final save's staging directory, renamed into `output` after): as
    README.md, unless `output` holds a README.md of the user's own (see the module docstring)."""
    card = model_card(model, output, config, summary, stage, steps, world_size)
    existing = output / CARD_FILE
    name = CARD_FILE
    if existing.is_file():
        try:
            ours = TAG in (ModelCard.load(existing).data.tags or [])
        except Exception:  # noqa: BLE001 - any README.md that is not a card of ours is the user's
            ours = False
        if not ours:
            name = SIDE_CARD_FILE
            logger.warning("%s is not a card this toolkit wrote: kept; the model card is in %s", existing,
                           output / SIDE_CARD_FILE)
    card.save(folder / name)
