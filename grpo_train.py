"""Reinforce what a reward says is good: GRPO through TRL with a PEFT LoRA adapter on an SFT (or DPO) Llama model,
merged back into a plain model at the end. Rewards: rule-based ones shipped with the toolkit (exact answer vs the
dataset's reference, ending the turn with <|end|>, a penalty for repeated n-grams; model/training/rewards.py) and/or
a reward_train.py model, weighted, each logged on its own (rewards/<name>/mean). T5 is refused (see
model/training/grpo.py).

    python grpo_train.py                       # config/grpo.yaml: model_save/sft + data/sft -> model_save/grpo
    python grpo_train.py --model_name_or_path model_save/sft --train_files qa.jsonl --rewards exact_answer format \\
        --reward_weights 1.0 0.2 --output_dir model_save/grpo
    python grpo_train.py --rewards repetition --reward_model model_save/reward --reward_weights 0.5 1.0
    accelerate launch --config_file accelerate.yaml grpo_train.py   # 2 GPUs

Data: prompts with a reference answer in any instruction or preference format of utils/data/conversations.py
(the answer, or the chosen answer, is the reference the exact-answer reward compares with).

The merged model (weights + tokenizer + generation config + config.yaml + training_summary.json) is written
into --output_dir and loads with plain AutoModelForCausalLM; the LoRA adapter and the checkpoints live in
--output_dir/adapter. ctrl+c saves a checkpoint and exits; the same command resumes from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import AutoConfig, set_seed

from model.build import count_parameters, flops_per_token, is_seq2seq, load_model
from model.training.callbacks import ProgressLine
from model.training.grpo import (
    T5_REFUSAL,
    GRPOArguments,
    PolicyTrainer,
    PromptDataArguments,
    RewardFunctionArguments,
    load_prompts,
)
from model.training.lora import LoraArguments
from model.training.merge import adapter_output_dir, save_trained
from model.training.peft_methods import use_loraplus
from model.training.reward import RewardModelScore
from model.training.rewards import rule_rewards
from model.training.runs import claim_output_dir, run_identity
from model.training.summary import final_evaluation, log_summary
from model.training.trainer import describe_plan, train_until_done_or_stopped
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.errors import UserError
from utils.hub import local_dir
from utils.logging import setup_logging
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger("grpo_train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="model_save/sft", metadata={"identity": False,
        "help": "The Llama model to improve (sft_train.py or dpo_train.py output); its tokenizer and chat template "
                "are used."})


def reward_functions(rewards: RewardFunctionArguments, args: GRPOArguments, tokenizer, max_prompt_length: int):
    """The reward functions in --reward_weights order: the rule-based ones, then the reward model."""
    functions = rule_rewards(rewards.rewards, tokenizer, rewards.repetition_ngram)
    if rewards.reward_model:
        path = local_dir(rewards.reward_model, "reward_model", fix="pass a reward_train.py output directory")
        functions.append(RewardModelScore(path, max_prompt_length, args.device))
    if args.reward_weights is not None and len(args.reward_weights) != len(functions):
        raise UserError(f"{len(args.reward_weights)} weights for {len(functions)} rewards", field="reward_weights",
                        fix="give one weight per --rewards entry, then one for --reward_model")
    return functions


def main(argv: Sequence[str] | None = None) -> PolicyTrainer | None:
    setup_logging()
    model_args, lora, rewards, data, args = parse_config(
        [ModelArguments, LoraArguments, RewardFunctionArguments, PromptDataArguments, GRPOArguments], argv,
        default_recipe=recipe_path("grpo"), description=__doc__)
    lora.check_base_kept("GRPO")
    output_dir = adapter_output_dir(args)  # checkpoints and the adapter in output_dir/adapter
    set_seed(args.seed)
    model_dir = local_dir(model_args.model_name_or_path, "model_name_or_path",
                          fix="pass an sft_train.py output directory")
    if is_seq2seq(AutoConfig.from_pretrained(model_dir)):
        raise UserError(T5_REFUSAL, path=model_args.model_name_or_path, field="model_name_or_path",
                        fix="align a T5 model with dpo_train.py, or run GRPO on a Llama model")
    tokenizer = load_tokenizer(model_dir, "model_name_or_path")
    train_set, eval_set = load_prompts(data, tokenizer, args.seed)
    model = load_model(model_dir, tokenizer)
    functions = reward_functions(rewards, args, tokenizer, data.max_prompt_length)
    if claim_output_dir(run_identity("grpo", model, tokenizer, [model_args, lora, rewards, data], args), args,
                        output_dir):
        return None

    # per sampled token: generation (a forward) and the policy's forward + backward
    seq_len = data.max_prompt_length + args.max_completion_length
    trainer = PolicyTrainer(model=model, reward_funcs=functions, args=args, train_dataset=train_set,
                            eval_dataset=eval_set, processing_class=tokenizer, peft_config=lora.config_for(model),
                            callbacks=[ProgressLine(flops_per_token(model.config, seq_len) * 4 / 3)])
    logger.info("model %s: %s parameters, LoRA r=%d: %s trainable | rewards %s (weights %s) | %d prompts%s, %d "
                "replies each | %s", type(model).__name__, f"{count_parameters(trainer.model):,}", lora.lora_r,
                f"{count_parameters(trainer.model, trainable_only=True):,}", ", ".join(trainer.reward_func_names),
                ", ".join(f"{w:g}" for w in trainer.reward_weights.tolist()), len(train_set),
                f", {len(eval_set)} held out" if eval_set else "", args.num_generations,
                describe_plan(args, len(train_set) * args.num_generations, "replies"))

    use_loraplus(trainer, lora.loraplus_lr_ratio)
    result = train_until_done_or_stopped(trainer, args)
    if result is None:
        return trainer
    metrics = final_evaluation(trainer) if eval_set is not None else {}
    last = next((h for h in reversed(trainer.state.log_history) if "reward" in h), {})
    summary = {"base_model": model_args.model_name_or_path, "prompts": len(train_set),
               "trainable_parameters": count_parameters(trainer.model, trainable_only=True), **result.metrics,
               **{f"last_{k}": v for k, v in last.items() if k.startswith("reward")}, **metrics}
    log_summary(trainer, summary, save_trained(trainer, tokenizer, [model_args, lora, rewards, data, args],
                                               summary, output_dir, model_dir))
    return trainer


if __name__ == "__main__":
    run_main(main)
