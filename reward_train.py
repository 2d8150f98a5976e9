"""Train a reward model on preference pairs: TRL's `RewardTrainer` on an SFT model with a one-output score head,
reading pairs through the same row parser and chat template as DPO. Llama and T5 (see model/training/reward.py).

    python reward_train.py                     # config/reward.yaml: model_save/sft + data/dpo -> model_save/reward
    python reward_train.py --model_name_or_path model_save/sft --train_files pairs.jsonl --output_dir model_save/reward
    accelerate launch --config_file accelerate.yaml reward_train.py   # 2 GPUs

Data: any preference format of utils/data/conversations.py (`{prompt, chosen, rejected}`, LLaMA-Factory
alpaca pairwise and ShareGPT ranking rows, TRL's implicit-prompt rows; files, directories, hub datasets).

Reports the pairwise accuracy (chosen scored above rejected) and loss on held-out pairs
(--validation_files, or --validation_ratio of the training pairs). The output loads with
`AutoModelForSequenceClassification.from_pretrained(output_dir)` (one logit: the reward) and is what
grpo_train.py takes as `--reward_model`. Every weight trains (the score head is new). ctrl+c saves a
checkpoint and exits; the same command resumes from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import set_seed

from model.build import count_parameters, flops_per_token
from model.inference.generation import context_length
from model.training.callbacks import ProgressLine
from model.training.checkpoints import save_final
from model.training.reward import RewardArguments, RewardModelTrainer, load_reward_model
from model.training.runs import claim_output_dir, run_identity
from model.training.summary import final_evaluation, log_summary
from model.training.trainer import describe_plan, train_until_done_or_stopped
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.data.conversations import PreferenceDataArguments, load_preference_splits
from utils.errors import UserError
from utils.hub import local_dir
from utils.logging import setup_logging
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger("reward_train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="model_save/sft", metadata={"identity": False,
        "help": "The model the reward model starts from (sft_train.py output); its tokenizer and chat template "
                "are used."})


@dataclass
class DataArguments(PreferenceDataArguments):
    """The preference pairs the reward model learns from (fields shared with dpo_train.py)."""


def main(argv: Sequence[str] | None = None) -> RewardModelTrainer | None:
    setup_logging()
    model_args, data, args = parse_config([ModelArguments, DataArguments, RewardArguments], argv,
                                          default_recipe=recipe_path("reward"), description=__doc__)
    set_seed(args.seed)  # the new score head starts from this seed
    train_set, eval_set = load_preference_splits(data, args.seed)
    model_dir = local_dir(model_args.model_name_or_path, "model_name_or_path",
                          fix="pass an sft_train.py output directory")
    tokenizer = load_tokenizer(model_dir, "model_name_or_path")
    model = load_reward_model(model_dir, tokenizer)
    seq_len = data.max_prompt_length + data.max_completion_length
    if seq_len > context_length(model, tokenizer):
        raise UserError(f"max_prompt_length + max_completion_length = {seq_len} exceeds the model's "
                        f"{context_length(model, tokenizer)} positions", field="max_completion_length",
                        fix="lower --max_prompt_length / --max_completion_length")
    if claim_output_dir(run_identity("reward", model, tokenizer, [model_args, data], args), args):
        return None

    # both answers of a pair run forward and backward: the usual training cost per token
    trainer = RewardModelTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                 processing_class=tokenizer, max_prompt_length=data.max_prompt_length,
                                 max_completion_length=data.max_completion_length,
                                 callbacks=[ProgressLine(flops_per_token(model.config, seq_len))])
    logger.info("reward model %s: %s parameters, all trainable | %d training pairs%s | %s", type(model).__name__,
                f"{count_parameters(model):,}", len(trainer.train_dataset),
                f", {len(trainer.eval_dataset)} held out" if eval_set else "",
                describe_plan(args, len(trainer.train_dataset), "pairs"))

    result = train_until_done_or_stopped(trainer, args)
    if result is None:
        return trainer
    metrics = final_evaluation(trainer) if eval_set is not None else {}
    summary = {"base_model": model_args.model_name_or_path, "pairs": len(trainer.train_dataset),
               **result.metrics, **metrics}
    log_summary(trainer, summary, save_final(trainer, tokenizer, [model_args, data, args], summary))
    return trainer


if __name__ == "__main__":
    run_main(main)
