"""LoRA and QLoRA for every training stage (DPO, SFT, continued pretraining): one definition of the adapter
flags, the 4-bit base of QLoRA, which embedding rows train beside the adapter, and the merge back into a
plain model.

    python sft_train.py --peft lora                     # LoRA adapters on the frozen base
    python sft_train.py --peft qlora                    # the same on a 4-bit NF4 base (CUDA + bitsandbytes)
    python pre_train.py --model_name_or_path BASE --tokenizer_name_or_path EXTENDED --peft lora   # Chinese-LLaMA
    python sft_train.py --peft lora --use_dora true --lora_init pissa --loraplus_lr_ratio 16     # LoRA variants
    python sft_train.py --peft prompt                    # also ia3, prefix, ptuning: model/training/peft_methods.py

LoRA variants (flags of every stage with LoRA, DPO and GRPO included): DoRA (`--use_dora`, a learnt magnitude
per output channel beside LoRA's direction), rsLoRA (`--use_rslora`, updates scaled by alpha / sqrt(r) rather
than alpha / r, so a large rank still learns), the initialisation of A and B (`--lora_init`: PEFT's default,
gaussian, or PiSSA / OLoRA, which start the adapter at the principal singular vectors / a QR factor of the base
weight and take them out of it; the base weights therefore change at the start of training, and PEFT redoes
that when it loads the adapter on the original base), and LoRA+ (`--loraplus_lr_ratio`, B's learning rate as a
multiple of A's).

Output and merge: `model.training.merge`.

Embeddings. With a tokenizer extended by `train_tokenizer.py --extend`, `model.build.load_model` appends rows
to the embeddings and the LM head, and those rows must learn (LoRA on the attention and feed-forward layers
cannot teach the model a token it has no vector for). `--lora_embeddings rows` (default) trains exactly the
rows of the new tokens, in the input embeddings and the LM head, through PEFT's `trainable_token_indices`:
the base's own rows stay bit-equal, and on a 7B Llama extended by 18k tokens this trains 148M embedding
parameters instead of the 410M of both whole matrices (`all`, PEFT's `modules_to_save`, Chinese-LLaMA's
choice: 6.6 GB of fp32 weights, gradients and Adam moments instead of 2.4 GB, which is what decides whether
LoRA fits a 24 GB card; docs/PEFT.md "The Chinese-LLaMA recipe"). `none` keeps them frozen. SFT adds the chat
format's role and end-of-turn tokens to those rows: pretraining text never holds them, so their vectors are
still the ones they started with, and they are the tokens SFT teaches. T5 ties one `shared` matrix into
encoder, decoder and LM head, which PEFT's trainable rows and module copies do not keep tied through the
merge (merged logits differ from the adapter's), so T5 training rows beside LoRA is refused.

QLoRA. The base is loaded in 4-bit NF4 with double quantisation and bf16 compute (bitsandbytes, CUDA only;
`--peft qlora` on a machine without CUDA is refused); the adapter and the trainable rows stay in higher
precision; the output is merged into the base reloaded unquantised (`model.training.merge`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from model.build import is_seq2seq, load_model
from model.training.merge import is_quantized
from model.training.peft_methods import PROMPT_METHODS, PromptMethodArguments, check_method_fits, keep_prompt_encoder
from utils.errors import UserError

logger = logging.getLogger(__name__)

PeftMethod = Literal["none", "lora", "qlora", "ia3", "prefix", "ptuning", "prompt"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
EmbeddingMode = Literal["rows", "all", "none"]
# Attention and feed-forward projections; lm_head is left out (TRL reads its weight directly).
LORA_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],  # wi_0/wi_1: gated-GELU feed-forward
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # Mixtral's experts are 3-D parameters (gate_up_proj, down_proj: one slice per expert), not nn.Linear, and
    # its router is a bare weight: LoRA adapts the attention, and the experts with --lora_target_parameters.
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
GPU_EXTRAS = "pip install -r requirements-gpu.txt"  # bitsandbytes is pinned there (GPU only)


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (columns of A, rows of B)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator: updates are scaled by "
                                                              "lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (0 = none)."})
    lora_target_modules: list[str] = field(default_factory=list, metadata={
        "help": "Module names to adapt; empty = attention + feed-forward: T5 q k v o wi wo (wi_0 wi_1 when "
                "gated), Llama q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; Mixtral (mixture of "
                "experts) the attention q_proj k_proj v_proj o_proj (its experts: --lora_target_parameters)."})
    lora_target_parameters: list[str] = field(default_factory=list, metadata={"identity": "unless_default",
        "help": "Weights held as bare parameters rather than linear layers that LoRA adapts too (PEFT's "
                "target_parameters), named by their ends: a mixture of experts' stacked expert weights, Mixtral "
                "mlp.experts.gate_up_proj mlp.experts.down_proj (a LoRA per expert). PEFT takes them with "
                "--lora_dropout 0 only, and not with DoRA or PiSSA/OLoRA."})
    use_dora: bool = field(default=False, metadata={"identity": "unless_default",
        "help": "DoRA: a learnt magnitude per output channel beside LoRA's direction (slower steps)."})
    use_rslora: bool = field(default=False, metadata={"identity": "unless_default",
        "help": "rsLoRA: scale updates by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r."})
    lora_init: LoraInit = field(default="default", metadata={"identity": "unless_default",
        "help": "How A and B start: default (A Kaiming-uniform, B zero), gaussian (A normal), pissa (the base "
                "weight's principal singular vectors, taken out of the base; exact SVD), olora (a QR factor of "
                "the base weight, likewise)."})
    loraplus_lr_ratio: float = field(default=0.0, metadata={"identity": "unless_default",
        "help": "LoRA+: lora_B's learning rate as a multiple of lora_A's (the paper suggests 16); 0 = off."})

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, not {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if self.loraplus_lr_ratio < 0:
            raise ValueError(f"--loraplus_lr_ratio must be 0 (off) or positive, not {self.loraplus_lr_ratio}")
        if self.lora_target_parameters:  # PEFT's ParamWrapper refuses the rest
            refused = {"--lora_dropout": self.lora_dropout > 0, "--use_dora": self.use_dora,
                       f"--lora_init {self.lora_init}": self.lora_init in ("pissa", "olora")}
            unsupported = [flag for flag, on in refused.items() if on]
            if unsupported:
                raise ValueError(f"--lora_target_parameters cannot go with {', '.join(unsupported)} (PEFT's LoRA "
                                 "on bare parameters has no dropout, DoRA or PiSSA/OLoRA): pass --lora_dropout 0 "
                                 "and leave the others at their defaults")

    def check_base_kept(self, stage: str) -> None:
        """Refuse PiSSA / OLoRA where the base must stay the base: DPO's and GRPO's reference model is the
        policy with its adapter switched off, which these initialisations change."""
        if self.lora_init in ("pissa", "olora"):
            raise UserError(f"--lora_init {self.lora_init} takes the adapter's start out of the base weights, and "
                            f"{stage}'s reference model is the base with the adapter off", field="lora_init",
                            fix="use --lora_init default or gaussian here")

    def config_for(self, model: PreTrainedModel, frozen: Sequence[str] = ()) -> LoraConfig:
        """The LoRA config for `model`: the given target modules, or the architecture's defaults that exist;
        none inside the T5 parts named in `frozen` ("encoder", "decoder": see sft_train.py --freeze)."""
        linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        present = {name.rsplit(".", 1)[-1] for name in linear}
        targets = self.lora_target_modules or [t for t in LORA_TARGETS.get(model.config.model_type, []) if t in present]
        missing = [t for t in targets if t not in present]
        if not targets or missing:
            raise UserError(f"LoRA target modules not in the model: {', '.join(missing) or '(none given)'}",
                            field="lora_target_modules",
                            fix=f"choose among the model's linear layers: {', '.join(sorted(present))}")
        skipped = tuple(f"{part}." for part in frozen if part in ("encoder", "decoder"))
        if skipped:  # full module names: a frozen stack gets no adapters
            targets = [name for name in linear if name.rsplit(".", 1)[-1] in targets and not name.startswith(skipped)]
        init = {"default": True}.get(self.lora_init, self.lora_init)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, target_parameters=self.parameter_targets(model) or None,
                          bias="none", use_dora=self.use_dora, use_rslora=self.use_rslora, init_lora_weights=init,
                          task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq(model.config) else TaskType.CAUSAL_LM)

    def parameter_targets(self, model: PreTrainedModel) -> list[str]:
        """`--lora_target_parameters`, each the end of a bare parameter's name in `model` (PEFT matches them so);
        refused, with the names there are, where one is not."""
        layers = (torch.nn.Linear, torch.nn.Embedding)
        bare = [f"{module_name}.{name}".lstrip(".") for module_name, module in model.named_modules()
                if not isinstance(module, layers)
                for name, weight in module.named_parameters(recurse=False) if weight.dim() >= 2]
        missing = [t for t in self.lora_target_parameters if not any(n == t or n.endswith(f".{t}") for n in bare)]
        if missing:
            ends = sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in bare})  # model.layers.0.mlp.x -> mlp.x
            raise UserError(f"LoRA target parameters not in the model: {', '.join(missing)}",
                            field="lora_target_parameters",
                            fix=f"choose among its bare weights: {', '.join(ends) or '(none)'}, or adapt linear "
                                "layers with --lora_target_modules")
        return list(self.lora_target_parameters)


@dataclass
class PeftArguments(PromptMethodArguments, LoraArguments):
    """`--peft` for the stages that can also train every weight (SFT, continued pretraining)."""

    peft: PeftMethod = field(default="none", metadata={
        "help": "none (train the weights themselves), lora (LoRA adapters on the frozen base), qlora (the same "
                "on a 4-bit NF4 base; CUDA and bitsandbytes only), ia3 (learnt scales), prefix (prefix tuning = "
                "P-tuning v2), ptuning (P-tuning v1, a prompt encoder) or prompt (prompt tuning). lora, qlora and "
                "ia3 give a merged plain model; prefix, ptuning and prompt the adapter itself with the tokenizer."})
    lora_embeddings: EmbeddingMode = field(default="rows", metadata={
        "help": "With --peft lora/qlora, which embedding and LM-head weights train beside the adapters: rows (those "
                "of the tokens an extended tokenizer added, and in SFT of the chat tokens), all (both whole "
                "matrices), none."})

    def __post_init__(self):
        LoraArguments.__post_init__(self)
        PromptMethodArguments.__post_init__(self)
        if self.peft == "qlora":
            if self.lora_init in ("pissa", "olora"):
                raise ValueError(f"--lora_init {self.lora_init} takes the adapter out of the base weights, which "
                                 "a 4-bit base cannot hold exactly: use it with --peft lora")
            check_qlora_available()

    @property
    def enabled(self) -> bool:
        return self.peft != "none"

    @property
    def merges(self) -> bool:
        """Whether the output is a merged plain model (LoRA, QLoRA, IA3) rather than the adapter itself."""
        return self.peft not in PROMPT_METHODS

    def config_for(self, model: PreTrainedModel, frozen: Sequence[str] = (),
                   new_tokens: Sequence[int] = ()) -> LoraConfig:
        """LoRA's config plus the embedding rows that train (see the module docstring); `frozen` naming
        "embeddings" (sft_train.py --freeze) keeps them frozen, and refuses `--lora_embeddings all`."""
        config = super().config_for(model, frozen)
        mode = self.lora_embeddings
        if "embeddings" in frozen:
            if mode == "all":
                raise UserError("--lora_embeddings all trains the embeddings, and --freeze keeps them frozen (its "
                                "default for T5, auto, is embeddings,encoder)", field="lora_embeddings",
                                fix="pass --lora_embeddings none, or a --freeze without embeddings (e.g. --freeze "
                                    "encoder; T5 then trains every weight: --peft none)")
            mode = "none"
        if mode == "none" and new_tokens:
            # their vectors are the mean of the old rows (an extension) or were never trained (the chat tokens
            # before SFT): LoRA on the projections cannot teach the model what these tokens mean
            logger.warning("%d token rows stay frozen (%s), though they may never have been trained: an extended "
                           "tokenizer's new tokens, and in SFT the chat tokens, which pretraining text never holds. "
                           "The model cannot learn them; %s", len(new_tokens),
                           "--freeze embeddings" if self.lora_embeddings != "none" else "--lora_embeddings none",
                           "train every weight (--peft none) to teach them" if is_seq2seq(model.config)
                           else "--lora_embeddings rows trains exactly those rows")
        if mode == "none" or (mode == "rows" and not new_tokens):
            return config
        if is_seq2seq(model.config):
            raise UserError(f"T5 cannot train {'token rows' if mode == 'rows' else 'its embeddings'} beside "
                            "LoRA: PEFT does not keep T5's shared embedding tied to encoder, decoder and LM head "
                            "through the merge", field="lora_embeddings",
                            fix="train every weight (--peft none), or keep the embeddings frozen "
                                "(--lora_embeddings none)")
        names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        tied = outputs is not None and outputs.weight is inputs.weight
        modules = [names[inputs]] + ([] if tied or outputs is None else [names[outputs]])
        if mode == "rows":  # PEFT follows a tied LM head by itself
            config.trainable_token_indices = {name: sorted(new_tokens) for name in modules}
        else:
            config.modules_to_save, config.ensure_weight_tying = modules, tied
        return config


def check_qlora_available() -> None:
    """Refuse `--peft qlora` where it cannot run: bitsandbytes' 4-bit layers need CUDA."""
    if not torch.cuda.is_available():
        raise UserError("--peft qlora needs a CUDA GPU: bitsandbytes' 4-bit NF4 layers run on CUDA only",
                        field="peft", fix="use --peft lora here (the same adapters on an unquantised base), or "
                                          f"run on a CUDA machine with `{GPU_EXTRAS}`")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--peft qlora needs the bitsandbytes package, which is not installed", field="peft",
                        fix=f"{GPU_EXTRAS} (GPU machines only; README \"Installing on a GPU machine\")")


def load_base(path: str, tokenizer, peft: PeftArguments, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """`model.build.load_model`, in 4-bit NF4 on this process's GPU for QLoRA (bf16 compute, double
    quantisation: the QLoRA paper's settings). Embeddings and the LM head stay unquantised, so an extended
    tokenizer's rows can be appended and trained."""
    if peft.peft != "qlora":
        return load_model(path, tokenizer, attn_implementation)
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return load_model(path, tokenizer, attn_implementation, quantization_config=four_bit, dtype=torch.bfloat16,
                      device_map={"": PartialState().local_process_index})


def add_adapter(model: PreTrainedModel, peft: PeftArguments, new_tokens: Sequence[int] = (),
                frozen: Sequence[str] = (), gradient_checkpointing: bool = False, added_tokens: Sequence[int] = (),
                tokenizer_path: str | None = None) -> PeftModel:
    """Wrap `model` in the adapter of `--peft` (LoRA: `PeftArguments.config_for`; the others:
    `method_config`); the base weights are frozen. `new_tokens`: the rows LoRA trains beside it (an
    extension's `added_tokens`, and SFT's chat tokens); the other methods refuse `added_tokens`
    (`check_method_fits`) and leave `new_tokens` frozen."""
    if peft.peft == "qlora":  # norms in fp32, inputs requiring grad for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    if peft.peft not in ("lora", "qlora"):
        check_method_fits(peft.peft, model, added_tokens)
        if new_tokens:
            logger.warning("%d token rows stay frozen with --peft %s (only LoRA trains rows beside it): the chat "
                           "tokens' vectors are those the model has", len(new_tokens), peft.peft)
        adapted = get_peft_model(model, peft.method_config(peft.peft, model, frozen, tokenizer_path))
        if adapted.peft_config["default"].is_prompt_learning:
            keep_prompt_encoder(adapted)
        return adapted
    adapted = get_peft_model(model, peft.config_for(model, frozen, new_tokens))
    if adapted.peft_config["default"].trainable_token_indices:
        # The adapter file holds the trained rows themselves (`trainable_tokens_delta`). PEFT's default
        # (save_embedding_layers="auto") adds both whole embedding matrices whenever the vocabulary was resized,
        # at every checkpoint (7B + 18k tokens: 2 x 0.6 GB of rows that did not change), though `load_model`
        # rebuilds them from the base and the tokenizer. The Trainer's checkpoints and `save_final` both save
        # through this method.
        adapted.save_pretrained = functools.partial(adapted.save_pretrained, save_embedding_layers=False)
    return adapted


def describe_adapter(model: PeftModel) -> str:
    """`lora r=16 alpha 32 on q_proj,v_proj | trained embedding rows: 384 (embed_tokens, lm_head)` for the log."""
    config = model.peft_config["default"]
    if config.is_prompt_learning:
        return f"{config.peft_type.value.lower()}: {config.num_virtual_tokens} virtual tokens"
    if config.peft_type.value == "IA3":
        return f"ia3 on {','.join(sorted({name.rsplit('.', 1)[-1] for name in config.target_modules}))}"
    targets = config.target_modules if isinstance(config.target_modules, str) else \
        ",".join(sorted({name.rsplit(".", 1)[-1] for name in config.target_modules}))
    text = f"{'qlora' if is_quantized(model) else 'lora'} r={config.r} alpha {config.lora_alpha:g} on {targets}"
    if config.target_parameters:
        text += f" + {','.join(config.target_parameters)}"
    variants = [name for name, on in (("dora", config.use_dora), ("rslora", config.use_rslora)) if on]
    if config.init_lora_weights is not True:
        variants.append(f"init {config.init_lora_weights}")
    text += f" ({', '.join(variants)})" if variants else ""
    if config.trainable_token_indices:
        rows = next(iter(config.trainable_token_indices.values()))
        text += f" | trained embedding rows: {len(rows):,} tokens ({', '.join(config.trainable_token_indices)})"
    elif config.modules_to_save:
        text += f" | trained whole: {', '.join(config.modules_to_save)}"
    return text
