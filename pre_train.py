"""Pretrain a T5 (span corruption and/or text-to-text pairs) or a Llama-style decoder from scratch,
or continue pretraining an HF checkpoint, with the HF Trainer.

    python pre_train.py                                          # config/pretrain.yaml (t5-0.2b)
    python pre_train.py --model_config llama-demo --max_steps 200 --output_dir model_save/llama_demo
    accelerate launch --config_file accelerate.yaml pre_train.py  # 2 GPUs, DeepSpeed ZeRO-2
    python pre_train.py --config config/chinese_llama/pretrain.yaml   # continue a base with LoRA (docs/PEFT.md)

Continued pretraining (--model_name_or_path) can train LoRA adapters instead of every weight (`--peft lora`,
or `qlora` on a 4-bit base, CUDA): with an extended tokenizer the new tokens' embedding and LM-head rows
train beside them (model/training/lora.py). The merged model goes into --output_dir as always, the adapter
and the checkpoints into --output_dir/adapter.

ctrl+c saves a checkpoint and exits; the same command resumes from it. The output directory loads with
plain AutoModelForSeq2SeqLM / AutoModelForCausalLM and AutoTokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import DataCollatorForSeq2Seq, default_data_collator, set_seed

from model.build import (
    AttentionArguments,
    added_token_ids,
    build_model,
    check_attention_for_training,
    count_parameters,
    flops_per_token,
    is_seq2seq,
    model_config,
)
from model.training import lora
from model.training.arguments import TrainArguments
from model.training.callbacks import ProgressLine
from model.training.distillation import DistillationArguments, load_teacher
from model.training.merge import adapter_output_dir, save_trained
from model.training.peft_methods import use_loraplus
from model.training.runs import claim_output_dir, run_identity
from model.training.summary import final_evaluation, log_summary
from model.training.trainer import LanguageModelTrainer, plan_steps, train_until_done_or_stopped
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.data.sources import split_files
from utils.errors import UserError
from utils.examples.pretrain_data import PackedBlocks, SpanCorruptionBlocks, TextToTextPairs, TokenStream, WeightedMix
from utils.logging import setup_logging
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger("pre_train")
Objective = Literal["auto", "causal_lm", "span_corruption", "text_to_text", "mix"]


@dataclass
class ModelArguments(AttentionArguments):
    model_config: str = field(default="t5-0.2b", metadata={"identity": False,
        "help": "Preset (t5-tiny, t5-demo, t5-0.2b, llama-tiny, llama-demo, llama-0.2b, mixtral-tiny, "
                "mixtral-0.2b), a preset YAML or an HF config.json. Ignored with --model_name_or_path."})
    model_overrides: str | None = field(default=None, metadata={"identity": False,
        "help": "JSON object of config keys to override, e.g. '{\"num_layers\": 4, \"d_model\": 512}'."})
    model_name_or_path: str | None = field(default=None, metadata={"identity": False,
        "help": "Continue pretraining this HF checkpoint (embeddings grow to fit an extended tokenizer)."})
    tokenizer_name_or_path: str = field(default="data/tokenizer", metadata={"identity": False,
        "help": "Tokenizer directory (train_tokenizer.py output)."})

    def overrides(self) -> dict:
        if not self.model_overrides:
            return {}
        try:
            values = json.loads(self.model_overrides)
        except json.JSONDecodeError as err:
            raise UserError(f"not a JSON object: {err.msg}", field="model_overrides",
                            fix="pass e.g. --model_overrides '{\"num_layers\": 4}'") from None
        if not isinstance(values, dict):
            raise UserError("must be a JSON object", field="model_overrides", fix="pass '{\"key\": value}'")
        return values


@dataclass
class DataArguments:
    train_files: list[str] = field(default_factory=lambda: ["data/corpus"], metadata={
        "help": "Text for causal LM / span corruption: prepare_data.py output dirs (train-*.parquet) or "
                ".parquet/.jsonl/.txt files with a 'text' column."})
    validation_files: list[str] = field(default_factory=list, metadata={
        "help": "Held-out text; default: the validation-*.parquet shards of --train_files directories."})
    pair_files: list[str] = field(default_factory=list, metadata={
        "help": "T5 text-to-text data: files with 'prompt' and 'response' columns."})
    validation_pair_files: list[str] = field(default_factory=list, metadata={
        "help": "Held-out prompt/response pairs for the text-to-text objective."})
    objective: Objective = field(default="auto", metadata={
        "help": "causal_lm (Llama), span_corruption, text_to_text or mix (T5); auto = causal_lm for decoders, "
                "span_corruption for T5 (mix when --pair_files are given too)."})
    mix_weights: list[float] = field(default_factory=lambda: [1.0, 1.0], metadata={
        "help": "Sampling weights of span_corruption and text_to_text examples for --objective mix."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per causal LM example (packed)."})
    max_source_length: int = field(default=512, metadata={"help": "T5 encoder input length (tokens)."})
    max_target_length: int = field(default=256, metadata={"help": "T5 text-to-text target length (tokens)."})
    noise_density: float = field(default=0.15, metadata={"help": "Share of tokens masked by span corruption."})
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "Mean masked span length (tokens)."})
    preprocessing_num_workers: int = field(default=max(1, os.cpu_count() or 1), metadata={"identity": False,
        "help": "Processes for tokenisation."})

    def __post_init__(self):
        if not 0 < self.noise_density < 1:
            raise ValueError(f"--noise_density must be in (0, 1), not {self.noise_density}")


def check_data_files(data: DataArguments) -> None:
    """Refuse a missing data file, naming its flag, before the model loads and the output directory is claimed
    (the datasets are built after that: their token cache lives in the output directory)."""
    for name, split in (("train_files", "train"), ("validation_files", "validation"), ("pair_files", "train"),
                        ("validation_pair_files", "validation")):
        split_files(getattr(data, name), split, name)


def data_objective(data: DataArguments, seq2seq: bool) -> str:
    """The objective (`auto` resolved for the model); refused when it does not fit the model or lacks its data."""
    objective = data.objective
    if objective == "auto":
        objective = ("mix" if data.pair_files else "span_corruption") if seq2seq else "causal_lm"
    if seq2seq == (objective == "causal_lm"):
        raise UserError(f"objective '{objective}' does not fit a {'T5' if seq2seq else 'decoder'} model",
                        field="objective", fix="use causal_lm for Llama; span_corruption, text_to_text or mix for T5")
    if objective in ("text_to_text", "mix") and not data.pair_files:
        raise UserError(f"the {objective} objective needs --pair_files", field="pair_files",
                        fix="pass files with prompt and response columns")
    return objective


def build_datasets(data: DataArguments, tokenizer, seq2seq: bool, cache_dir: Path, seed: int, args):
    """Train and eval datasets for the objective, with characters per token for bits per character."""
    objective = data_objective(data, seq2seq)
    validation = data.validation_files or data.train_files
    workers = data.preprocessing_num_workers
    train, evals, ratios = [], {}, {}
    # the cache is in the output directory: machines that share it tokenise once, each other machine for itself
    if objective in ("causal_lm", "span_corruption", "mix"):
        with args.main_process_first(local=args.save_on_each_node, desc="tokenize"):
            stream = TokenStream.build(data.train_files, "train", tokenizer, cache_dir, workers)
            val_stream = TokenStream.build(validation, "validation", tokenizer, cache_dir, workers)
        if objective == "causal_lm":
            train.append(PackedBlocks(stream, data.block_size))
            evals["eval"] = PackedBlocks(val_stream, data.block_size)
            ratios["eval"] = val_stream.chars_per_token
        else:
            make = lambda s, salt: SpanCorruptionBlocks(s, tokenizer, data.max_source_length,  # noqa: E731
                                                        data.noise_density, data.mean_noise_span_length, seed + salt)
            train.append(make(stream, 0))
            evals["span"] = make(val_stream, 1)
            ratios["span"] = val_stream.chars_per_token
    if objective in ("text_to_text", "mix"):
        with args.main_process_first(local=args.save_on_each_node, desc="tokenize pairs"):
            train.append(TextToTextPairs(data.pair_files, "train", tokenizer, data.max_source_length,
                                         data.max_target_length, workers))
            pairs_eval = TextToTextPairs(data.validation_pair_files or data.pair_files, "validation", tokenizer,
                                         data.max_source_length, data.max_target_length, workers)
        evals["pairs"], ratios["pairs"] = pairs_eval, pairs_eval.chars_per_token
    train_set = train[0] if len(train) == 1 else WeightedMix(train, data.mix_weights, seed)
    eval_set = evals.get("eval", evals)
    return objective, train_set, eval_set, ratios


def main(argv: Sequence[str] | None = None) -> LanguageModelTrainer | None:
    setup_logging()
    model_args, peft, kd, data, args = parse_config(
        [ModelArguments, lora.PeftArguments, DistillationArguments, DataArguments, TrainArguments], argv,
        default_recipe=recipe_path("pretrain"), description=__doc__)
    if peft.enabled and not model_args.model_name_or_path:
        raise UserError(f"--peft {peft.peft} adapts an existing model, and none is given", field="peft",
                        fix="pass --model_name_or_path BASE to continue pretraining it, or --peft none to train "
                            "a new model from scratch")
    output_dir = adapter_output_dir(args) if peft.enabled else None
    set_seed(args.seed)
    check_data_files(data)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path)
    if model_args.model_name_or_path:
        model = lora.load_base(model_args.model_name_or_path, tokenizer, peft, model_args.attn_implementation)
    else:
        model = build_model(model_config(model_args.model_config, tokenizer, model_args.overrides()), args.seed,
                            model_args.attn_implementation)
    check_attention_for_training(model)
    if peft.enabled:
        added = added_token_ids(model_args.model_name_or_path, tokenizer)
        model = lora.add_adapter(model, peft, added, gradient_checkpointing=args.activation_checkpointing,
                                 added_tokens=added, tokenizer_path=tokenizer.name_or_path)
    seq2seq = is_seq2seq(model.config)
    data_objective(data, seq2seq)  # refused before the output directory is claimed
    teacher = load_teacher(kd, model, tokenizer, model_args.attn_implementation)
    # runs without --peft or a teacher keep the identity they had before those options existed
    settings = [model_args, data, *([peft] if peft.enabled else []), *([kd] if teacher is not None else [])]
    if claim_output_dir(run_identity("pretrain", model, tokenizer, settings, args), args, output_dir):
        return None
    objective, train_set, eval_set, ratios = build_datasets(data, tokenizer, seq2seq,
                                                            Path(args.output_dir) / "data_cache", args.seed, args)

    seq_len = data.max_source_length if seq2seq else data.block_size
    target_len = SpanCorruptionBlocks.target_len(data) if objective == "span_corruption" else data.max_target_length
    flops = flops_per_token(model.config, seq_len, target_len if seq2seq else None)
    examples_per_step, steps = plan_steps(args, len(train_set))
    tokens_per_step = examples_per_step * seq_len
    logger.info("model %s: %s parameters%s | objective %s | %d examples | %s tokens/step (batch %d x accum %d x "
                "%d processes x %d) | %d steps, %s tokens | %.0f MFLOP/token", type(model).__name__,
                f"{count_parameters(model):,}",
                f", {count_parameters(model, trainable_only=True):,} trainable: {lora.describe_adapter(model)}"
                if peft.enabled else "", objective, len(train_set), f"{tokens_per_step:,}",
                args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size, seq_len,
                steps, f"{tokens_per_step * steps:,}", flops / 1e6)

    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100) if seq2seq \
        else default_data_collator
    trainer = LanguageModelTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                   teacher=teacher, distillation=kd,
                                   data_collator=collator, processing_class=tokenizer, chars_per_token=ratios,
                                   callbacks=[ProgressLine(flops)])
    use_loraplus(trainer, peft.loraplus_lr_ratio)
    result = train_until_done_or_stopped(trainer, args)
    if result is None:
        return trainer
    metrics = final_evaluation(trainer) if args.eval_strategy != "no" or eval_set else {}
    summary = {"objective": objective, "parameters": count_parameters(model), "peft": peft.peft,
               "trainable_parameters": count_parameters(model, trainable_only=True), **result.metrics, **metrics}
    log_summary(trainer, summary, save_trained(trainer, tokenizer, [model_args, peft, kd, data, args], summary,
                                                    output_dir, model_args.model_name_or_path))
    return trainer


if __name__ == "__main__":
    run_main(main)
