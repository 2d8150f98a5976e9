"""Align an SFT model with preference pairs: DPO through TRL with a PEFT LoRA adapter, merged back into a
plain model at the end. Works for the T5 path (TRL extended for encoder-decoders, see model/training/dpo.py) and the
Llama path (stock TRL; both tokenise through the chat template the same way).

    python dpo_train.py                        # config/dpo.yaml: model_save/sft + data/dpo -> model_save
    python dpo_train.py --model_name_or_path model_save/sft --train_files pairs.jsonl --output_dir model_save
    accelerate launch --config_file accelerate.yaml dpo_train.py   # 2 GPUs

Data: `{prompt, chosen, rejected}` rows, or any preference format of utils/data/conversations.py
(LLaMA-Factory alpaca pairwise and ShareGPT ranking rows, TRL's explicit- and implicit-prompt rows; jsonl /
json / parquet / csv files, directories, hub datasets).

The merged model (weights + tokenizer + generation config + config.yaml + training_summary.json) is
written into --output_dir and loads with plain AutoModelForSeq2SeqLM / AutoModelForCausalLM; the LoRA
adapter and the checkpoints live in --output_dir/adapter. ctrl+c saves a checkpoint and exits; the same
command resumes from it. An output directory that already holds a model is refused unless
--overwrite_output_dir.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import set_seed

from model.build import (
    AttentionArguments,
    check_attention_for_training,
    count_parameters,
    flops_per_token,
    is_seq2seq,
    load_model,
)
from model.inference.generation import context_length
from model.training.callbacks import ProgressLine
from model.training.dpo import DPOArguments, PreferenceTrainer
from model.training.lora import LoraArguments
from model.training.merge import adapter_output_dir, save_trained
from model.training.peft_methods import use_loraplus
from model.training.runs import claim_output_dir, run_identity
from model.training.summary import final_evaluation, log_summary
from model.training.trainer import describe_plan, train_until_done_or_stopped
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.data.conversations import RANKING_PAIRS_HELP, PreferenceDataArguments, RankingPairs, load_preference_splits
from utils.errors import UserError
from utils.hub import local_dir
from utils.logging import setup_logging
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger("dpo_train")


@dataclass
class ModelArguments(AttentionArguments):
    model_name_or_path: str = field(default="model_save/sft", metadata={"identity": False,
        "help": "The model to align (sft_train.py output); its tokenizer and chat template are used."})


@dataclass
class DataArguments(PreferenceDataArguments):
    """The preference pairs DPO trains on (fields shared with reward_train.py). From a ranking, DPO takes the best
    answer against each other one (each pair one example); the reward model takes every pair."""

    ranking_pairs: RankingPairs = field(default="best_vs_rest", metadata={"identity": "unless_default",
                                                                          "help": RANKING_PAIRS_HELP})


def check_lengths(data: DataArguments, args: DPOArguments, model, tokenizer, seq2seq: bool) -> int:
    """Tokens per training sequence; refuses limits a decoder cannot hold."""
    if seq2seq:
        return data.max_prompt_length
    total = data.max_prompt_length + data.max_completion_length
    limit = min(context_length(model, tokenizer), args.max_length or total)
    if total > limit:
        raise UserError(f"max_prompt_length + max_completion_length = {total} exceeds the {limit} tokens the model "
                        f"holds (context length, or --max_length)", field="max_completion_length",
                        fix=f"lower --max_prompt_length / --max_completion_length to {limit} tokens in all")
    return total


def main(argv: Sequence[str] | None = None) -> PreferenceTrainer | None:
    setup_logging()
    model_args, lora, data, args = parse_config([ModelArguments, LoraArguments, DataArguments, DPOArguments], argv,
                                                default_recipe=recipe_path("dpo"), description=__doc__)
    lora.check_base_kept("DPO")
    output_dir = adapter_output_dir(args)  # checkpoints and the adapter in output_dir/adapter
    set_seed(args.seed)
    train_set, eval_set = load_preference_splits(data, args.seed)
    model_dir = local_dir(model_args.model_name_or_path, "model_name_or_path",
                          fix="pass an sft_train.py output directory")
    tokenizer = load_tokenizer(model_dir, "model_name_or_path")
    model = load_model(model_dir, tokenizer, model_args.attn_implementation)
    check_attention_for_training(model)
    seq2seq = is_seq2seq(model.config)
    seq_len = check_lengths(data, args, model, tokenizer, seq2seq)
    if claim_output_dir(run_identity("dpo", model, tokenizer, [model_args, lora, data], args), args, output_dir):
        return None

    # DPO runs the policy forward + backward on both answers and the reference forward: 4/3 of training cost
    flops = flops_per_token(model.config, seq_len, data.max_completion_length if seq2seq else None) * 4 / 3
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                processing_class=tokenizer, peft_config=lora.config_for(model),
                                max_prompt_length=data.max_prompt_length,
                                max_completion_length=data.max_completion_length, callbacks=[ProgressLine(flops)])
    logger.info("model %s: %s parameters, LoRA r=%d on %s: %s trainable | loss %s, beta %g | %d training pairs%s | "
                "%s", type(model).__name__, f"{count_parameters(trainer.model):,}", lora.lora_r,
                ",".join(sorted(trainer.model.peft_config["default"].target_modules)),
                f"{count_parameters(trainer.model, trainable_only=True):,}", ",".join(args.loss_type), args.beta,
                len(trainer.train_dataset), f", {len(trainer.eval_dataset)} held out" if eval_set else "",
                describe_plan(args, len(trainer.train_dataset), "pairs"))

    use_loraplus(trainer, lora.loraplus_lr_ratio)
    result = train_until_done_or_stopped(trainer, args)
    if result is None:
        return trainer
    metrics = final_evaluation(trainer) if eval_set is not None else {}
    summary = {"base_model": model_args.model_name_or_path, "pairs": len(trainer.train_dataset),
               "trainable_parameters": count_parameters(trainer.model, trainable_only=True), **result.metrics,
               **metrics}
    log_summary(trainer, summary, save_trained(trainer, tokenizer, [model_args, lora, data, args], summary,
                                               output_dir, model_args.model_name_or_path))
    return trainer


if __name__ == "__main__":
    run_main(main)
