"""Supervised fine-tuning: teach a pretrained T5 or Llama (pre_train.py output) to answer, on instruction
data in any conversation format (prompt/response, alpaca, ShareGPT, messages, hub datasets).

    python sft_train.py                                   # config/sft.yaml: model_save/pretrain -> model_save/sft
    python sft_train.py --model_name_or_path DIR --train_files a.jsonl b.json --output_dir DIR2
    accelerate launch --config_file accelerate.yaml sft_train.py   # 2 GPUs, DeepSpeed ZeRO-2

Every format goes through the tokenizer's chat template (utils/examples/sft_data.py). T5: the encoder reads the
conversation so far, the decoder learns the answer; by default the embeddings and the whole encoder are
frozen (ChatLM-mini-Chinese's recipe, `--freeze embeddings,encoder`; `--freeze none` trains everything).
T5 ties its input embeddings to the LM head (one tensor), so freezing `embeddings` freezes the output
projection too: the decoder learns to reach the pretrained output space rather than moving it, which
keeps the vocabulary geometry of pretraining intact for the rarely seen tokens. Freezing `encoder` or
`decoder` never touches that shared tensor; name `embeddings` for it. Llama: the loss covers only the
assistant's tokens (labels -100 on the prompt, from the template's `{% generation %}` mask, which is what
TRL's `assistant_only_loss` reads too); nothing is frozen by default. One tokenisation and one trainer
(`LanguageModelTrainer`) serve both model types: TRL's `SFTTrainer` builds causal LMs only and truncates at
`max_length` without counting, while here the length limits are counted and truncate-or-drop is a choice.

`--peft lora` / `--peft qlora` (4-bit base, CUDA) train LoRA adapters instead of the weights (see
model/training/lora.py; DoRA, rsLoRA, PiSSA / OLoRA and LoRA+ are its flags), `--peft ia3` learnt scales;
T5's frozen parts get none. The merged model goes into --output_dir as always, the adapter and the checkpoints
into --output_dir/adapter. `--peft prefix|ptuning|prompt` (prefix tuning = P-tuning v2, P-tuning, prompt tuning:
model/training/peft_methods.py) cannot merge: --output_dir holds the adapter with the tokenizer, which chat,
serve, eval_model and generate_rejected load.

ctrl+c saves a checkpoint and exits; the same command resumes from it. The output directory loads with
plain AutoModelForSeq2SeqLM / AutoModelForCausalLM and AutoTokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from transformers import DataCollatorForSeq2Seq, TrainerCallback, set_seed

from model.build import (
    AttentionArguments,
    added_token_ids,
    check_attention_for_training,
    count_parameters,
    flops_per_token,
    is_seq2seq,
)
from model.inference.generation import generate_replies
from model.training import lora
from model.training.arguments import TrainArguments
from model.training.callbacks import ProgressLine
from model.training.distillation import DistillationArguments, load_teacher
from model.training.merge import adapter_output_dir, save_trained
from model.training.peft_methods import use_loraplus
from model.training.runs import claim_output_dir, run_identity
from model.training.summary import final_evaluation, log_summary
from model.training.trainer import LanguageModelTrainer, train_until_done_or_stopped
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.data.conversations import ConversationDataArguments, hold_out, load_conversations
from utils.errors import UserError
from utils.examples.sft_data import OVERLONG, tokenize_conversations
from utils.logging import setup_logging
from utils.tokenization.chat_format import CHAT_TOKENS, default_generation_config
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger("sft_train")
FREEZABLE = ("embeddings", "encoder", "decoder")


@dataclass
class ModelArguments(AttentionArguments):
    model_name_or_path: str = field(default="model_save/pretrain", metadata={"identity": False,
        "help": "Pretrained model directory (pre_train.py output, or any HF T5 / Llama checkpoint)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"identity": False,
        "help": "Tokenizer directory with the toolkit's chat template; default: the one in --model_name_or_path."})
    freeze: str = field(default="auto", metadata={
        "help": "Comma-separated parts kept frozen: embeddings (tied to the LM head), encoder, decoder (T5 only); "
                "'none'; auto = embeddings,encoder for T5, none for Llama."})


@dataclass
class DataArguments(ConversationDataArguments):
    train_files: list[str] = field(default_factory=lambda: ["data/sft"], metadata={
        "help": "Instruction data: files or directories (.jsonl/.json/.parquet/.csv) or hub dataset names."})
    validation_ratio: float = field(default=0.02, metadata={
        "help": "Share of training conversations held out for evaluation when no --validation_files (0 = none)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn put first in conversations that have none (use the same one at inference)."})
    max_source_length: int = field(default=512, metadata={"help": "T5 encoder input limit (tokens)."})
    max_target_length: int = field(default=320, metadata={"help": "T5 answer limit (tokens, incl. <|end|> + EOS)."})
    max_length: int = field(default=1024, metadata={"help": "Llama conversation limit (tokens)."})
    overlong: str = field(default="truncate", metadata={
        "help": "What to do with examples over the limits: truncate or drop (both counted in the log)."})
    eval_samples: int = field(default=3, metadata={"identity": False,
        "help": "Validation prompts answered by the model and logged at each evaluation (0 = none)."})
    sample_max_new_tokens: int = field(default=64, metadata={"identity": False,
                                                             "help": "Reply length of those samples (tokens)."})
    preprocessing_num_workers: int = field(default=1, metadata={"identity": False,
                                                                "help": "Processes for tokenisation."})

    def __post_init__(self):
        super().__post_init__()
        if self.overlong not in OVERLONG:
            raise ValueError(f"--overlong must be truncate or drop, not '{self.overlong}'")


def freeze_parameters(model, spec: str) -> list[str]:
    """Set requires_grad=False on the named parts; returns them. The shared (tied) embedding tensor
    belongs to `embeddings` only, so `encoder` / `decoder` leave it trainable unless it is named."""
    seq2seq = is_seq2seq(model.config)
    parts = ["embeddings", "encoder"] if spec == "auto" and seq2seq else [] if spec in ("auto", "none") \
        else [p.strip() for p in spec.split(",") if p.strip()]
    for part in parts:
        if part not in FREEZABLE or (part != "embeddings" and not seq2seq):
            allowed = "embeddings, encoder, decoder" if seq2seq else "embeddings"
            raise UserError(f"cannot freeze '{part}' of a {model.config.model_type} model", field="freeze",
                            fix=f"use a comma-separated list of {allowed}, or none")
    embedding = model.get_input_embeddings().weight
    modules = {"encoder": model.get_encoder() if seq2seq else None, "decoder": model.get_decoder() if seq2seq else None}
    for part in parts:
        params = [embedding] if part == "embeddings" else [p for p in modules[part].parameters() if p is not embedding]
        for param in params:
            param.requires_grad_(False)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    if "embeddings" in parts:
        logger.info("embeddings frozen%s", " (tied to the LM head: the head is frozen too)" if tied else "")
    return parts


def split_validation(conversations: list, data: DataArguments, seed: int) -> tuple[list, list]:
    """(train, validation): --validation_files, else a seeded --validation_ratio share of the conversations."""
    if data.validation_files:
        return conversations, load_conversations(data.validation_files, data.data_format, "validation",
                                                 data.system_prompt, "validation_files")
    return hold_out(conversations, data.validation_ratio, seed)


class SampleReplies(TrainerCallback):
    """At each evaluation, log the model's replies to a few validation prompts (greedy, main process)."""

    def __init__(self, conversations: list, tokenizer, max_new_tokens: int):
        self.prompts = [c[:max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
        self.references = [c[len(p)]["content"] for c, p in zip(conversations, self.prompts)]
        self.tokenizer, self.max_new_tokens, self.latest = tokenizer, max_new_tokens, []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or not state.is_world_process_zero:
            return
        config = default_generation_config(self.tokenizer, model.config)
        config.max_new_tokens = self.max_new_tokens
        was_training = model.training
        model.eval()
        self.latest = generate_replies(model, self.tokenizer, self.prompts, config, batch_size=len(self.prompts),
                                       progress=False)
        model.train(was_training)
        for prompt, reply, reference in zip(self.prompts, self.latest, self.references):
            logger.info("sample at step %d | prompt: %s | reply: %s | reference: %s", state.global_step,
                        prompt[-1]["content"][:80], reply[:120], reference[:80])


def main(argv: Sequence[str] | None = None) -> LanguageModelTrainer | None:
    setup_logging()
    model_args, peft, kd, data, args = parse_config(
        [ModelArguments, lora.PeftArguments, DistillationArguments, DataArguments, TrainArguments], argv,
        default_recipe=recipe_path("sft"), description=__doc__)
    output_dir = adapter_output_dir(args) if peft.enabled else None
    set_seed(args.seed)
    # the data first: a bad file is refused before the model loads and the output directory is claimed
    conversations = load_conversations(data.train_files, data.data_format, data.dataset_split, data.system_prompt)
    train_conversations, eval_conversations = split_validation(conversations, data, args.seed)
    if not eval_conversations and args.eval_strategy != "no":
        raise UserError("evaluation is on but there is no validation data", field="eval_strategy",
                        fix="pass --validation_files or --validation_ratio > 0, or --eval_strategy no")
    tokenizer = (load_tokenizer(model_args.tokenizer_name_or_path) if model_args.tokenizer_name_or_path
                 else load_tokenizer(model_args.model_name_or_path, "model_name_or_path"))
    model = lora.load_base(model_args.model_name_or_path, tokenizer, peft, model_args.attn_implementation)
    check_attention_for_training(model)
    seq2seq = is_seq2seq(model.config)
    frozen = freeze_parameters(model, model_args.freeze)
    if peft.enabled:
        vocab = tokenizer.get_vocab()  # rows beside LoRA: an extension's new tokens and the chat tokens
        added = added_token_ids(model_args.model_name_or_path, tokenizer)
        rows = {*added, *(vocab[token] for token in CHAT_TOKENS if token in vocab)}
        model = lora.add_adapter(model, peft, sorted(rows), frozen, args.activation_checkpointing, added,
                                 tokenizer.name_or_path)
    teacher = load_teacher(kd, model, tokenizer, model_args.attn_implementation)
    # runs without --peft or a teacher keep the identity they had before those options existed
    settings = [model_args, data, *([peft] if peft.enabled else []), *([kd] if teacher is not None else [])]
    if claim_output_dir(run_identity("sft", model, tokenizer, settings, args), args, output_dir):
        return None

    with args.main_process_first(desc="tokenize"):
        tokenize = lambda convs: tokenize_conversations(  # noqa: E731
            convs, tokenizer, seq2seq, data.max_source_length, data.max_target_length, data.max_length,
            data.overlong, data.preprocessing_num_workers)
        train_set, stats = tokenize(train_conversations)
        eval_set, eval_stats = tokenize(eval_conversations) if eval_conversations else (None, None)
    logger.info("train: %s", stats.describe())
    if eval_stats:
        logger.info("validation: %s", eval_stats.describe())

    seq_len = data.max_source_length if seq2seq else data.max_length
    flops = flops_per_token(model.config, seq_len, data.max_target_length if seq2seq else None)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    logger.info("model %s: %s trainable of %s parameters (%.1f%%) | frozen: %s%s | %d train examples | batch %d x "
                "accum %d x %d processes", type(model).__name__, f"{trainable:,}", f"{total:,}",
                100 * trainable / total, ", ".join(frozen) or "nothing",
                f" | {lora.describe_adapter(model)}" if peft.enabled else "", len(train_set),
                args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size)

    samples = SampleReplies(eval_conversations[:data.eval_samples], tokenizer, data.sample_max_new_tokens)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    trainer = LanguageModelTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                   teacher=teacher, distillation=kd,
                                   data_collator=collator, processing_class=tokenizer,
                                   callbacks=[ProgressLine(flops), samples])
    use_loraplus(trainer, peft.loraplus_lr_ratio)
    result = train_until_done_or_stopped(trainer, args)
    if result is None:
        return trainer
    metrics = final_evaluation(trainer) if eval_set is not None else {}
    summary = {"model_type": model.config.model_type, "parameters": total, "trainable_parameters": trainable,
               "frozen": frozen, "peft": peft.peft, "data": asdict(stats), "samples": samples.latest,
               **result.metrics, **metrics}
    log_summary(trainer, summary, save_trained(trainer, tokenizer, [model_args, peft, kd, data, args], summary,
                                                    output_dir, model_args.model_name_or_path))
    return trainer


if __name__ == "__main__":
    run_main(main)
