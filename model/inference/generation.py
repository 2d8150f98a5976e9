"""Inference: a toolkit output directory loaded for inference, its context length, and batched replies.

Prompts are rendered by `utils.tokenization.chat_format.render_prompt` (the chat template, oldest turns
dropped to fit), and generation runs with the model's saved `generation_config.json`, which stops at EOS or
the end-of-turn token `<|end|>` (`default_generation_config`).

An adapter directory (`adapter_config.json`, as `sft_train.py --peft prefix|ptuning|prompt` writes) loads on the
base its config names: LoRA and IA3 adapters are merged into it, prompt-learning adapters (virtual tokens, which
no merge can hold) stay a `PeftModel`, and every reply of such a model is generated whole by the base model's
`generate` with the virtual tokens where training had them (`model.inference.virtual_tokens`), since the
toolkit's own decoding loop keeps KV caches of the prompt's tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from model.build import Precision
from model.inference.virtual_tokens import generate, has_virtual_tokens
from utils.errors import UserError
from utils.hub import local_dir
from utils.tokenization.chat_format import render_prompt


@dataclass
class InferenceArguments:
    """The model a script runs and where (chat, serve, evaluate and generate_rejected subclass it)."""

    model_name_or_path: str = field(default="model_save", metadata={
        "help": "Model directory: any toolkit output (T5 or Llama) or a compatible HF model directory."})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu. None = cuda when available."})
    dtype: Precision = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32."})

    def __post_init__(self):
        check_device(self.device)


def check_device(device: str | None) -> None:
    """Refuse a --device torch cannot use here (an unknown name; CUDA on a machine without it, or a GPU index
    past the last), before the model loads: torch's own error is a traceback from inside the load."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, not '{device}'") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if parsed.type == "cuda" and (parsed.index or 0) >= count:
        seen = f"torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}" if count else "torch sees no CUDA GPU here"
        raise ValueError(f"--device {device}: {seen}; pass another --device, or none (cuda when available, else cpu)")


def load_for_inference(path: str, device: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` of a toolkit output directory (or any compatible HF model directory), in
    eval mode on `device` (default: cuda if available, else cpu). `dtype`: auto (bf16 on GPUs that
    support it, else fp32), bf16, fp16 or fp32."""
    path = local_dir(path, "model_name_or_path", needs=("config.json", ADAPTER_CONFIG))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if is_adapter_dir(path):
        model = load_adapter(path, torch_dtype)
    else:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=torch_dtype)
    model = model.to(device).eval()
    if getattr(model.config, "output_router_logits", False):  # an MoE's training switch; generate fails with it
        model.config.output_router_logits = False
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template", path=str(path), field="chat_template",
                        fix="use a tokenizer trained by train_tokenizer.py (it saves the toolkit's template)")
    return model, tokenizer


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter without a model of its own (no config.json): the output of a prompt-learning run."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def load_adapter(path: str, dtype: torch.dtype):
    """The adapter in `path` on the base named by its `base_model_name_or_path` (as given when it trained, or
    relative to `path`): merged for LoRA / IA3, a `PeftModel` for prompt learning. The generation config saved
    beside the adapter (the toolkit's stop tokens) is the model's."""
    config = PeftConfig.from_pretrained(path)
    base = config.base_model_name_or_path or ""
    if not Path(base).expanduser().exists() and (Path(path) / base).exists():
        base = str(Path(path) / base)
    base = local_dir(base, "base_model_name_or_path", fix=f"put the base model at {base!r}, or edit "
                     f"base_model_name_or_path in {Path(path) / ADAPTER_CONFIG} to where it is")
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=dtype), path)
    if not config.is_prompt_learning:
        model = model.merge_and_unload()
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def context_length(model, tokenizer) -> int:
    """Longest prompt + reply the model (or its config) takes: the decoder's position limit, else the
    tokenizer's; a decoder-only model's virtual tokens (prompt learning) take their positions from it."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    limit = int(limit or tokenizer.model_max_length)
    if has_virtual_tokens(model) and not model.config.is_encoder_decoder:
        limit -= model.active_peft_config.num_virtual_tokens
    return limit


def padded_batch(prompts: Sequence[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of prompts of different lengths: a decoder-only model's are padded on
    the left, so that every prompt ends where generation starts; an encoder's on the right."""
    width = max(map(len, prompts))
    rows, masks = [], []
    for ids in prompts:
        padding = [pad] * (width - len(ids))
        rows.append(padding + ids if left else ids + padding)
        masks.append([0] * len(padding) + [1] * len(ids) if left else [1] * len(ids) + [0] * len(padding))
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


def generate_replies(model, tokenizer, conversations: list[list[dict]],
                     generation_config: GenerationConfig | None = None, batch_size: int = 8,
                     max_prompt_tokens: int | None = None, progress: bool = True) -> list[str]:
    """The model's reply to each conversation (each ends with a user turn), generated in batches.

    Prompts go through the chat template (`render_prompt`); decoder-only models are left-padded so
    that every prompt ends where generation starts. Replies are decoded without special tokens.
    """
    import copy

    import torch
    from tqdm.auto import tqdm

    config = generation_config or model.generation_config
    seq2seq = bool(model.config.is_encoder_decoder)
    context = context_length(model, tokenizer)
    max_new = config.max_new_tokens or 256
    if max_prompt_tokens is None:
        # a decoder's prompt and reply share its positions; keep at least half for the prompt
        max_prompt_tokens = context if seq2seq else max(context - max_new, context // 2)
    replies: list[str] = []
    batches = range(0, len(conversations), batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        prompts = [render_prompt(tokenizer, c, max_prompt_tokens).ids for c in conversations[start:start + batch_size]]
        input_ids, attention_mask = padded_batch(prompts, tokenizer.pad_token_id, not seq2seq, model.device)
        width = input_ids.shape[1]
        batch_config = config
        if not seq2seq and width + max_new > context:
            batch_config = copy.deepcopy(config)
            batch_config.max_new_tokens = max(context - width, 1)
        with torch.inference_mode():
            output = generate(model, input_ids, attention_mask, batch_config)
        new_tokens = output if seq2seq else output[:, width:]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies
