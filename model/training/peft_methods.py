"""The parameter-efficient methods beside LoRA (`--peft ia3|prefix|ptuning|prompt`), their flags and configs,
and LoRA+'s optimizer; `model.training.lora` owns the `--peft` switch and LoRA itself.

    python sft_train.py --peft ia3                                        # (IA)^3: learnt scales, merged
    python sft_train.py --peft prefix --num_virtual_tokens 16             # prefix tuning = P-tuning v2
    python sft_train.py --peft ptuning --ptuning_encoder mlp              # P-tuning (v1): a prompt encoder
    python sft_train.py --peft prompt --prompt_init_text "请回答问题："   # prompt tuning
    python sft_train.py --peft lora --loraplus_lr_ratio 16                # LoRA+: B learns 16x faster than A

- **IA3** ((IA)^3, Liu et al. 2022) learns one scale per channel of the keys, values and feed-forward output
  (PEFT's defaults for T5 and Llama); it merges into the weights like LoRA, so the output is a plain model.
- **prefix** (prefix tuning, Li & Liang 2021; P-tuning v2, Liu et al. 2022, is the same deep prompt: trained
  keys and values at every layer) prepends `--num_virtual_tokens` key/value pairs to every attention layer,
  optionally produced by a two-layer MLP during training (`--prefix_projection`, the paper's reparameterisation).
- **ptuning** (P-tuning v1, Liu et al. 2021): virtual token embeddings at the input, produced by an MLP or LSTM
  prompt encoder over trained embeddings.
- **prompt** (prompt tuning, Lester et al. 2021): trained virtual token embeddings at the input, random or
  started from the embeddings of `--prompt_init_text`.

The prompt-learning methods add virtual tokens at inference too, so they cannot be merged into the weights:
their output directory is the adapter itself (`adapter_config.json`, `adapter_model.safetensors`) with the
tokenizer, which `model.inference.generation.load_for_inference` loads on the base named in
`adapter_config.json` (`base_model_name_or_path`); chat, serve, eval_model and generate_rejected generate
with it through `model.inference.virtual_tokens.generate`. GGUF export refuses it (llama.cpp has no virtual
tokens). P-tuning's and `--prefix_projection`'s encoder network is kept beside the adapter in every checkpoint
(`keep_prompt_encoder`), so their runs resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import (
    IA3Config,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)
from peft.optimizers import create_loraplus_optimizer
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer

from model.build import is_seq2seq
from model.training.outputs import PROMPT_ENCODER_FILE
from utils.errors import UserError

logger = logging.getLogger(__name__)

PROMPT_METHODS = ("prefix", "ptuning", "prompt")  # virtual tokens: cannot merge, saved as an adapter
MERGED_METHODS = ("lora", "qlora", "ia3")


@dataclass
class PromptMethodArguments:
    """Flags of `--peft ia3|prefix|ptuning|prompt` (mixed into `model.training.lora.PeftArguments`)."""

    num_virtual_tokens: int = field(default=20, metadata={"identity": "unless_default",
        "help": "--peft prefix/ptuning/prompt: virtual tokens added to every input (prefix: key/value pairs at "
                "every layer). They take positions from a Llama's context."})
    prompt_init_text: str = field(default="", metadata={"identity": "unless_default",
        "help": "--peft prompt: start the virtual tokens at the embeddings of this text (repeated to "
                "--num_virtual_tokens); empty = random."})
    ptuning_encoder: Literal["mlp", "lstm"] = field(default="mlp", metadata={"identity": "unless_default",
        "help": "--peft ptuning: the prompt encoder over the virtual token embeddings."})
    prefix_projection: bool = field(default=False, metadata={"identity": "unless_default",
        "help": "--peft prefix: produce the prefix by a two-layer MLP during training (the paper's "
                "reparameterisation; more parameters train, the saved prefix is the same size)."})
    encoder_hidden_size: int = field(default=0, metadata={"identity": "unless_default",
        "help": "Hidden size of the ptuning encoder and of the prefix MLP; 0 = the model's d_model."})
    ia3_target_modules: list[str] = field(default_factory=list, metadata={"identity": "unless_default",
        "help": "--peft ia3: modules whose outputs (or, for feed-forward outputs, inputs) get learnt scales; "
                "empty = PEFT's defaults: T5 k v wo, Llama k_proj v_proj down_proj."})

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--num_virtual_tokens must be at least 1, not {self.num_virtual_tokens}")
        if self.encoder_hidden_size < 0:
            raise ValueError(f"--encoder_hidden_size must be 0 (d_model) or more, not {self.encoder_hidden_size}")

    def method_config(self, method: str, model: PreTrainedModel, frozen: Sequence[str] = (),
                      tokenizer_path: str | None = None) -> PeftConfig:
        """The PEFT config of `method` (ia3, prefix, ptuning, prompt) for `model`. IA3 adapts no module inside
        the T5 parts named in `frozen`, as LoRA; the prompt methods add their virtual tokens at the input (the
        encoder's for T5) or to every layer's keys and values (prefix), frozen parts or not."""
        task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(model.config) else TaskType.CAUSAL_LM
        if method == "ia3":
            return self._ia3_config(model, frozen, task)
        hidden = self.encoder_hidden_size or model.config.hidden_size
        common = {"task_type": task, "num_virtual_tokens": self.num_virtual_tokens}
        if method == "prefix":
            return PrefixTuningConfig(**common, prefix_projection=self.prefix_projection, encoder_hidden_size=hidden)
        if method == "ptuning":
            kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
            return PromptEncoderConfig(**common, encoder_reparameterization_type=kind[self.ptuning_encoder],
                                       encoder_hidden_size=hidden)
        assert method == "prompt", method
        if not self.prompt_init_text:
            return PromptTuningConfig(**common, prompt_tuning_init=PromptTuningInit.RANDOM)
        return PromptTuningConfig(**common, prompt_tuning_init=PromptTuningInit.TEXT,
                                  prompt_tuning_init_text=self.prompt_init_text, tokenizer_name_or_path=tokenizer_path)

    def _ia3_config(self, model: PreTrainedModel, frozen: Sequence[str], task: TaskType) -> IA3Config:
        linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        present = {name.rsplit(".", 1)[-1] for name in linear}
        kind = model.config.model_type
        targets = self.ia3_target_modules or [t for t in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(kind, [])
                                              if t in present]
        missing = [t for t in targets if t not in present]
        if not targets or missing:
            raise UserError(f"IA3 target modules not in the model: {', '.join(missing) or '(none given)'}",
                            field="ia3_target_modules",
                            fix=f"choose among the model's linear layers: {', '.join(sorted(present))}")
        feedforward = [t for t in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(kind, []) if t in targets]
        skipped = tuple(f"{part}." for part in frozen if part in ("encoder", "decoder"))
        if skipped:  # full module names: a frozen stack gets no scales
            targets = [n for n in linear if n.rsplit(".", 1)[-1] in targets and not n.startswith(skipped)]
            feedforward = [n for n in targets if n.rsplit(".", 1)[-1] in feedforward]
        return IA3Config(task_type=task, target_modules=targets, feedforward_modules=feedforward)


def check_method_fits(method: str, model: PreTrainedModel, added_tokens: Sequence[int]) -> None:
    """Refuse a method that cannot keep what the run needs: rows appended for an extended tokenizer train (and
    are saved) only beside LoRA."""
    if method in ("ia3", *PROMPT_METHODS) and added_tokens:
        raise UserError(f"--peft {method} cannot train the embedding rows of the {len(added_tokens)} tokens the "
                        "tokenizer adds to the model's own, and would leave them at their starting values",
                        field="peft", fix="use --peft lora (it trains those rows beside the adapters), or the "
                                          "model's own tokenizer")


def keep_prompt_encoder(model: PeftModel) -> None:
    """Save and load a prompt-learning adapter's whole prompt encoder beside the adapter (`PROMPT_ENCODER_FILE`).

    PEFT saves such an adapter as the virtual tokens its encoder gives, which is all inference needs, but not the
    encoder itself where it is more than those vectors (P-tuning's MLP or LSTM over its own embedding, prefix
    tuning's `--prefix_projection` MLP): the Trainer's resume put the encoder's output where its input embedding
    was and left the network at its initial weights (P-tuning: the resumed run went on from another model), or
    failed (prefix: PEFT's load cannot fit the saved prefix into the MLP's input embedding). Every save (the
    Trainer's checkpoints, `save_final`) goes through `save_pretrained`, the Trainer's resume through
    `load_adapter`; the file is read only there (inference uses PEFT's own file)."""
    encoder = model.prompt_encoder
    if set(encoder.state_dict()) <= {f"{name}.embedding.weight" for name in model.peft_config}:
        return  # prompt tuning, plain prefix tuning: the saved vectors are the whole encoder
    save, load = model.save_pretrained, model.load_adapter

    def save_pretrained(directory, *args, **kwargs):
        save(directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        given = kwargs.get("state_dict")  # the Trainer's, gathered from every rank under ZeRO-3
        weights = encoder.state_dict() if given is None else \
            {k.removeprefix("prompt_encoder."): v for k, v in given.items() if k.startswith("prompt_encoder.")}
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(Path(directory) / PROMPT_ENCODER_FILE))

    def load_adapter(directory, *args, **kwargs):
        path = Path(directory) / PROMPT_ENCODER_FILE
        if not path.is_file():
            logger.warning("%s has no %s (saved before the toolkit kept the prompt encoder): the encoder starts "
                           "again from its initial weights", directory, PROMPT_ENCODER_FILE)
            return load(directory, *args, **kwargs)
        # The whole trained state of a prompt-learning adapter. PEFT's own load cannot take it in training mode
        # (a prefix MLP's saved output does not fit the embedding under it, and P-tuning's would replace it).
        return encoder.load_state_dict(load_file(str(path)), strict=True)

    model.save_pretrained, model.load_adapter = save_pretrained, load_adapter


def use_loraplus(trainer: Trainer, ratio: float) -> None:
    """LoRA+ (Hayou et al. 2024): LoRA's B matrices learn `ratio` times faster than its A matrices. The
    trainer's optimizer (its `--optim` class and settings) gets PEFT's LoRA+ parameter groups; set before
    training, it is the one the Trainer prepares and, on resume, loads the checkpoint's state into."""
    if not ratio:
        return
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs.pop("lr", None)
    trainer.optimizer = create_loraplus_optimizer(trainer.model, optimizer_cls, lr=trainer.args.learning_rate,
                                                  loraplus_lr_ratio=ratio,
                                                  loraplus_weight_decay=trainer.args.weight_decay, **kwargs)
    logger.info("LoRA+: lora_B learns at %g x the learning rate of lora_A (%g)", ratio, trainer.args.learning_rate)
