"""Model presets and construction: stock HF T5 / Llama classes built from `config/models/*.yaml`.

    config = model_config("t5-demo", tokenizer, {"num_layers": 4})
    model = build_model(config)

Presets: t5-tiny, t5-demo, t5-0.2b, llama-tiny, llama-demo, llama-0.2b, and the mixture-of-experts decoder
mixtral-tiny, mixtral-0.2b (transformers' MixtralForCausalLM: top-2 routing over SwiGLU experts, trained with
its load-balancing loss; see model/training/trainer.py). A preset name, a preset YAML or
an HF `config.json` can be given, and any key overridden. The vocabulary comes from the tokenizer,
rounded up to a multiple of 64, and the special token ids are taken from it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.flex_attention import compile_friendly_flex_attention, flex_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    add_offsets_to_mask_function,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)

from utils.errors import UserError
from utils.hub import local_dir
from utils.tokenization.tokenizer import TOKENIZER_FILES, round_vocab

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "config" / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_model_config(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"unknown model config '{name_or_path}'", field="model_config",
                        fix=f"use a preset ({', '.join(preset_names())}), a preset YAML or an HF config.json")
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict) or "model_type" not in values:
        raise UserError("a model config needs a 'model_type' (t5, llama or mixtral)", path=str(path),
                        field="model_type", fix="add 'model_type: t5', 'model_type: llama' or 'model_type: mixtral'")
    return values


def is_seq2seq(config: PreTrainedConfig) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def model_config(name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                 overrides: dict[str, Any] | None = None) -> PreTrainedConfig:
    """An HF config for a preset / file, with `overrides` applied and the tokenizer's vocabulary."""
    values = {**_read_model_config(name_or_path), **(overrides or {})}
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    values.update(vocab_size=round_vocab(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if model_type == "t5":
        values["decoder_start_token_id"] = tokenizer.pad_token_id
    try:
        return AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid model config: {err}", field="model_config",
                        fix="check the keys against the HF config class of this model type") from None


Attention = Literal["sdpa", "eager", "flex_attention"]
ATTENTION = get_args(Attention)
Precision = Literal["auto", "bf16", "fp16", "fp32"]  # auto = bf16 on GPUs that support it, else fp32
PRECISIONS = get_args(Precision)


@dataclass
class AttentionArguments:
    """The attention kernel flag of every training stage (mixed into its ModelArguments)."""

    attn_implementation: Attention = field(default="sdpa", metadata={"identity": False,
        "help": f"Attention kernel: {', '.join(ATTENTION)} (the same function). sdpa: PyTorch's fused kernels (T5's "
                "position bias enters as an additive mask, so no flash kernel serves T5). flex_attention: the "
                "bias as a FlexAttention score_mod in a compiled kernel; CUDA only for training (PyTorch has no "
                "FlexAttention backward on CPU) and no attention dropout (needs dropout_rate 0)."})

    def __post_init__(self):
        if self.attn_implementation == "flex_attention" and not torch.cuda.is_available():
            raise ValueError("--attn_implementation flex_attention cannot train on CPU (PyTorch has no FlexAttention "
                             "backward pass there); use --attn_implementation sdpa, or train on a CUDA GPU")


def check_attention_for_training(model: PreTrainedModel) -> None:
    """Refuse FlexAttention for a model with attention dropout: FlexAttention has none (HF's function raises
    mid-step; T5 drops attention probabilities at its `dropout_rate`, Llama at `attention_dropout`)."""
    if model.config._attn_implementation != "flex_attention":
        return
    name = "dropout_rate" if is_seq2seq(model.config) else "attention_dropout"
    dropout = getattr(model.config, name, 0.0) or 0.0
    if dropout > 0:
        raise UserError(f"FlexAttention has no attention dropout, and this model's {name} is {dropout}",
                        field="attn_implementation",
                        fix=f"use --attn_implementation sdpa, or a model with {name} 0 (pre_train.py "
                            f"--model_overrides '{{\"{name}\": 0.0}}'; T5 1.1 pretrains without dropout)")


def t5_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      position_bias: torch.Tensor | None = None, **kwargs):
    """HF's `flex_attention` with T5's relative position bias added by a FlexAttention `score_mod`.

    T5 computes the bias once per stack as one (1, heads, query, key) tensor that every layer and batch row
    shares (zeros in cross-attention). HF's own flex function (transformers 5.24) reads it as
    `position_bias[batch, head, q, kv]`, out of bounds from the second batch row on; here the score_mod reads
    row 0. Padding and causality arrive as HF's `BlockMask`, so fully masked blocks are skipped. Attention
    without a position bias (Llama) goes to HF's function unchanged. Compiled once by HF's wrapper (under a
    compiled model, traced inline); `torch.compiler.set_stance("force_eager")` runs it eagerly (the CPU tests).
    """
    if position_bias is None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout > 0:
        raise ValueError("flex_attention has no attention dropout (see model.build.check_attention_for_training)")
    assert attention_mask is None or isinstance(attention_mask, BlockMask), type(attention_mask)
    assert position_bias.shape[0] == 1, position_bias.shape
    bias = position_bias[0]

    def add_position_bias(score, batch, head, q_idx, kv_idx):
        return score + bias[head, q_idx, kv_idx]

    output = compile_friendly_flex_attention(query, key, value, score_mod=add_position_bias, block_mask=attention_mask,
                                             scale=scaling, kernel_options=kwargs.get("kernel_options"),
                                             training=module.training)
    return output.transpose(1, 2).contiguous(), None


def flex_block_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                    mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                    device: torch.device | str = "cpu", **kwargs) -> BlockMask:
    """HF's `flex_attention_mask` without the graph breaks it puts into a compiled model (transformers 5.24):
    it asks whether the padding mask is all ones (a data-dependent branch and a device sync) and builds the mask
    through `create_block_mask(_compile=True)`, whose deprecation warning dynamo cannot trace. Here padding
    always enters the mask_mod (blocks without padding stay full, where the kernel never calls it), and
    `create_block_mask` is compiled on its own only outside a compiled model (inside one it is traced with it)."""
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    create = create_block_mask if torch.compiler.is_compiling() else compiled_create_block_mask()
    return create(mask_function, batch_size, None, q_length, kv_length, device=device)


@functools.cache
def compiled_create_block_mask():
    return torch.compile(create_block_mask)


def register_attention(attn_implementation: str) -> str:
    """Route `flex_attention` through `t5_flex_attention` and `flex_block_mask` (transformers' AttentionInterface
    and AttentionMaskInterface; idempotent)."""
    if attn_implementation == "flex_attention":
        AttentionInterface.register("flex_attention", t5_flex_attention)
        AttentionMaskInterface.register("flex_attention", flex_block_mask)
    return attn_implementation


def build_model(config: PreTrainedConfig, seed: int | None = None,
                attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised model with `attn_implementation` (PyTorch SDPA by default; T5's relative
    position bias then enters SDPA as an additive mask, which rules out the flash kernels; `flex_attention`
    adds it inside the kernel, see `t5_flex_attention`)."""
    if seed is not None:
        torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=register_attention(attn_implementation))


def check_tokenizer_keeps_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that does not keep every token id of the model's own tokenizer (saved beside it).

    An extended tokenizer (`train_tokenizer.py --extend`) appends tokens after the base's last id, so the
    trained embedding rows still mean the same tokens; any other tokenizer would silently scramble them.
    `path` is a local directory (`load_model` and the reward stages resolve it with `utils.hub.local_dir`).
    """
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s holds no tokenizer: cannot check that the tokenizer keeps the model's token ids", path)
        return
    base = AutoTokenizer.from_pretrained(path).get_vocab()
    new = tokenizer.get_vocab()
    changed = sorted((i, token) for token, i in base.items() if new.get(token) != i)
    if changed:
        examples = ", ".join(f"id {i} {token!r}" + (f" is id {new[token]}" if token in new else " is missing")
                             for i, token in changed[:3])
        raise UserError(f"the tokenizer does not keep the model's token ids: {len(changed):,} of {len(base):,} ids "
                        f"differ ({examples}); {len(base) - len(changed):,} agree", field="tokenizer_name_or_path",
                        fix=f"use the model's own tokenizer ({path}) or one extended from it "
                            f"(train_tokenizer.py --extend {path})")


def added_token_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens `tokenizer` has and the model's own tokenizer (saved in `path`) lacks: the tokens an
    extended tokenizer added, whose embedding rows `load_model` appends. Empty when `path` holds no tokenizer."""
    path = local_dir(path, "model_name_or_path")
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return []
    base = AutoTokenizer.from_pretrained(path).get_vocab()
    return sorted(i for token, i in tokenizer.get_vocab().items() if token not in base)


def load_model(path: str, tokenizer: PreTrainedTokenizerBase, attn_implementation: str = "sdpa",
               **load_options) -> PreTrainedModel:
    """Load an HF checkpoint to continue training; grow its embeddings to fit an extended tokenizer.

    The tokenizer must keep the ids of the model's own tokenizer (`check_tokenizer_keeps_ids`). New
    embedding rows start at the mean of the existing rows (so new tokens begin as an "average" token
    instead of noise); existing rows are untouched. `load_options` go to `from_pretrained` (QLoRA's 4-bit
    quantisation, a dtype). `path` is read through `utils.hub.local_dir` (a hub id only when allowed).
    """
    path = local_dir(path, "model_name_or_path")
    check_tokenizer_keeps_ids(path, tokenizer)
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM
    model = auto.from_pretrained(path, attn_implementation=register_attention(attn_implementation), **load_options)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
        logger.info("resized embeddings %d -> %d rows for the tokenizer's %d tokens (new rows = mean of old)",
                    old, model.get_input_embeddings().weight.shape[0], len(tokenizer))
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once even when tied (T5's embeddings and LM head)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def flops_per_token(config: PreTrainedConfig, seq_len: int, target_len: int | None = None) -> float:
    """Training FLOPs per input token (forward + backward = 3x forward), the PaLM / nanoGPT estimate.

    Matmul FLOPs are 6 per parameter per token it touches, plus attention scores. For T5 the encoder
    runs on the inputs and the decoder on the targets; the figure is per *input* token of a batch.
    """
    if is_seq2seq(config):
        d, ff, layers_e, layers_d = config.d_model, config.d_ff, config.num_layers, config.num_decoder_layers
        inner = config.num_heads * config.d_kv
        ffn = (3 if config.is_gated_act else 2) * d * ff
        enc_layer = 4 * d * inner + ffn
        dec_layer = 8 * d * inner + ffn
        target_len = target_len or seq_len
        ratio = target_len / seq_len
        matmul = 6 * (layers_e * enc_layer + ratio * (layers_d * dec_layer + d * config.vocab_size))
        attention = 12 * inner * (layers_e * seq_len + ratio * layers_d * (target_len + seq_len))
        return matmul + attention
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    # A mixture of experts (Mixtral) runs its router and the num_experts_per_tok experts a token is sent to.
    experts = getattr(config, "num_experts_per_tok", 1) if hasattr(config, "num_local_experts") else 1
    router = d * getattr(config, "num_local_experts", 0)
    layer = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * config.intermediate_size * experts + router
    matmul = 6 * (layers * layer + d * config.vocab_size)
    attention = 12 * layers * heads * head_dim * seq_len
    return matmul + attention
