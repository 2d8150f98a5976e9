"""The output of a run that trained an adapter (`model.training.lora`, `--peft`): where the adapter and the
checkpoints go, the merge back into a plain model, and the final save.

Output: the merged model in --output_dir, loading with plain AutoModelForCausalLM / AutoModelForSeq2SeqLM; the
adapter (`adapter_config.json`, `adapter_model.safetensors`) and the checkpoints in --output_dir/adapter. An
adapter that cannot merge (prefix, ptuning, prompt: virtual tokens) is the output itself.

QLoRA. The adapter is *not* merged into the 4-bit weights (the sum would be rounded to NF4 again): the base is
reloaded unquantised in its own dtype (`dtype="auto"`: bf16 for hub Llamas, fp32 for the toolkit's models) on
the CPU, the saved adapter is applied (`PeftModel.from_pretrained`) and merged (`merge_and_unload`), as the
QLoRA paper and PEFT's documentation do.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, Trainer

from model.build import load_model
from model.training.checkpoints import save_final

ADAPTER_DIR = "adapter"


def adapter_output_dir(args) -> Path:
    """For a run that trains an adapter: point the trainer at --output_dir/adapter (checkpoints and the adapter).
    Returns --output_dir, where the merged model goes (`claim_output_dir` checks both)."""
    output_dir = Path(args.output_dir)
    args.output_dir = str(output_dir / ADAPTER_DIR)
    return output_dir


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """The adapter merged into the base (`merge_and_unload`): a plain model again, without an instance
    `forward` put on it for training (TRL's fused LM head, or `model.training.dpo`'s for T5)."""
    merged = model.merge_and_unload()
    merged.__dict__.pop("forward", None)
    return merged


def is_quantized(model) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, "hf_quantizer", None) is not None


def merge_into_unquantised(base_path: str, tokenizer, adapter_dir: str | Path) -> PreTrainedModel:
    """The saved adapter applied to the base reloaded in its own dtype (resized for `tokenizer` as in
    training) and merged: the QLoRA output (see the module docstring)."""
    base = load_model(base_path, tokenizer, dtype="auto")
    return merge_adapter(PeftModel.from_pretrained(base, adapter_dir))


def save_trained(trainer: Trainer, tokenizer, configs: list, summary: dict, output_dir: Path | None,
                 base_path: str | None) -> Path:
    """The final save of a training stage: `save_final` of the trained model when `output_dir` is None (no
    adapter); else the adapter (with `save_final`'s records) into the trainer's --output_dir/adapter, then the
    merged model into `output_dir` (the command's --output_dir, see `adapter_output_dir`, which `config.yaml`
    records in both). A 4-bit base is merged through `merge_into_unquantised`; any other in memory. An adapter
    that cannot merge (prefix, ptuning, prompt: virtual tokens) goes into `output_dir` itself, with the
    tokenizer and generation config, loading with `model.inference.generation.load_for_inference`."""
    if output_dir is None:
        return save_final(trainer, tokenizer, configs, summary)
    recorded = {"output_dir": str(output_dir)}
    adapter = save_final(trainer, tokenizer, configs, summary, config_overrides=recorded)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if model.active_peft_config.is_prompt_learning:
        return save_final(trainer, tokenizer, configs, summary, output_dir=output_dir, model=model,
                          config_overrides=recorded)
    if not is_quantized(model):
        merged = merge_adapter(model)
    else:  # only the processes that save reload the base
        merged = merge_into_unquantised(base_path, tokenizer, adapter) if trainer.args.should_save else model
    return save_final(trainer, tokenizer, configs, summary, output_dir=output_dir, model=merged,
                      config_overrides=recorded)
