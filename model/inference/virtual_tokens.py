"""Generation with a prompt-learning adapter's virtual tokens, by the base model's own `generate`.

A prompt-learning adapter (`sft_train.py --peft prefix|ptuning|prompt`) adds virtual tokens before every input,
so no merge can hold it and its `PeftModel` stays a `PeftModel` at inference. What the model saw in training is
PEFT's forward pass: a decoder-only model gets `num_virtual_tokens` keys and values before the prompt in every
layer (prefix tuning: trained directly; prompt tuning and P-tuning: the keys and values its layers compute for
the virtual token embeddings at positions 0..n-1, since causal attention lets nothing after them change them),
and the prompt's positions start after them; T5 gets the virtual embeddings before its encoder input (prompt
tuning, P-tuning) or keys and values before its decoder's self-attention (prefix tuning).

PEFT's own `generate` does not reproduce that with transformers 5.25 and PEFT 0.21 (measured on tiny models,
tests/test_peft_methods.py): a prefix-tuned Llama or T5 replies as its base does (the prefix PEFT injects under
`past_key_values` is dropped beside the cache that generate makes), and a prompt-tuned or P-tuned Llama's
greedy replies leave those of its own forward pass after a few tokens. So `generate` here hands the base
model's `generate` the same inputs PEFT's forward gives it: a decoder-only model's prompt with a cache already
holding the virtual tokens' keys and values (the attention mask covers them, so positions and left padding come
out as in training), T5's encoder input as embeddings with the virtual ones first, or T5's decoder cache holding
the prefix. Every decoding `generate` offers works (greedy, sampling, beam search), and the output holds the
prompt and reply ids as a plain model's does.
"""

from __future__ import annotations

import torch
from peft import PeftModel, PeftType
from transformers import EncoderDecoderCache, GenerationConfig


def has_virtual_tokens(model) -> bool:
    """Whether `model` is a PeftModel of a prompt-learning method (virtual tokens; nothing to merge)."""
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: GenerationConfig,
             **kwargs) -> torch.Tensor:
    """`model.generate(input_ids=..., attention_mask=..., generation_config=..., **kwargs)`, with a prompt-learning
    adapter's virtual tokens put where PEFT's forward pass puts them (see the module)."""
    if not has_virtual_tokens(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                              **kwargs)
    base, config = model.get_base_model(), model.active_peft_config
    virtual = torch.ones(input_ids.shape[0], config.num_virtual_tokens, dtype=attention_mask.dtype,
                         device=attention_mask.device)
    # generate repeats every tensor input by this, but not a cache: the prefix is the same in every row
    rows = input_ids.shape[0] * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    with torch.no_grad():
        if config.peft_type == PeftType.PREFIX_TUNING:
            cache = model.get_prompt(batch_size=rows)
        elif base.config.is_encoder_decoder:
            embeddings = base.get_input_embeddings()(input_ids)
            # T5's prompt encoder makes 2n vectors; PEFT's forward puts the first n before the encoder input
            prompts = model.get_prompt(batch_size=input_ids.shape[0])[:, :config.num_virtual_tokens]
            prompts = prompts.to(embeddings.dtype)
            return base.generate(inputs_embeds=torch.cat([prompts, embeddings], dim=1),
                                 attention_mask=torch.cat([virtual, attention_mask], dim=1),
                                 generation_config=generation_config, **kwargs)
        else:
            prompts = model.get_prompt(batch_size=rows).to(base.dtype)
            cache = base(inputs_embeds=prompts, use_cache=True).cache
    if isinstance(cache, EncoderDecoderCache):  # T5's prefix: in the decoder's self-attention
        start = torch.ones(input_ids.shape[0], 1 + config.num_virtual_tokens, dtype=attention_mask.dtype,
                           device=attention_mask.device)
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, decoder_attention_mask=start,
                             cache=cache, generation_config=generation_config, **kwargs)
    # The prompt alone with a mask over [virtual tokens, prompt]: generate feeds the prompt after the cache
    return base.generate(input_ids=input_ids, attention_mask=torch.cat([virtual, attention_mask], dim=1), cache=cache,
                         generation_config=generation_config, **kwargs)
