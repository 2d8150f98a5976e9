"""A model's side of a running batch: the rows that decode together, their KV caches, and how each row's next
token is chosen. Rows join (their prompts are read, the first token chosen) and leave between steps; every
step feeds each row its last token and chooses its next.

    rows = ModelRows(model, tokenizer)
    first = rows.join([reply_a, reply_b])     # prefill: one forward over the joining prompts
    tokens = rows.step()                      # one token for every row, in row order
    rows.leave([1])                           # keep row 1 only (row 0's reply ended)
    beam_search(model, reply)                 # beam search: one reply, whole, by model.generate

The caches of all rows share one width: each row's is padded on the left (and masked), so that every row's
newest token sits in the last column and one step appends one column for all. A decoder-only model (Llama)
gets each row's own position ids, so padding moves no position; T5's decoder has relative positions only
(query minus key), the same for every row once their tokens end in the same column. T5's cross-attention keys
(the encoded prompt) are padded on the right with the encoder mask. A row's arithmetic thus differs from the
same reply generated alone only where padding and batch size change how floating-point sums are grouped
(tests/test_batching.py bounds it); greedy replies are the same tokens.
"""

from __future__ import annotations

import copy
import inspect

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from model.inference.generation import padded_batch
from model.inference.reply import LiveReply
from model.inference.virtual_tokens import generate

# Processors that read only which tokens came before, never where: rows sharing them are processed together,
# each row's context padded with its own first token (which changes no set of tokens).
POSITION_FREE = (RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                 TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper, EpsilonLogitsWarper,
                 EtaLogitsWarper, InfNanRemoveLogitsProcessor)


def decoding_key(config) -> str:
    """Replies with equal keys choose tokens the same way: equal generation configs but for max_new_tokens."""
    return repr(sorted((name, value) for name, value in vars(config).items()
                       if not name.startswith("_") and name != "max_new_tokens"))


class TokenChoice:
    """How one reply's next token is chosen from the model's scores: the logits processors `model.generate`
    builds for its generation config (so a reply equals generate's for any config a model carries), then
    greedy or sampling."""

    def __init__(self, model, config, context_length: int, encoder_ids: torch.Tensor | None = None):
        config = copy.copy(config)  # the preparation below sets attributes; it changes none in place
        # transformers' own preparation and processor list (private helpers: the toolkit pins transformers)
        model._prepare_special_tokens(config, True, device=model.device, batch_size=1)
        self.processors = model._get_logits_processor(config, input_ids_seq_length=context_length,
                                                      encoder_input_ids=encoder_ids, device=model.device)
        self.sample = bool(config.do_sample)
        self.position_free = all(isinstance(p, POSITION_FREE) for p in self.processors)
        self.key = decoding_key(config) if self.position_free else str(id(self))


def token_choice(model, config, context_length: int, encoder_ids: torch.Tensor | None = None,
                 shared: dict[str, TokenChoice] | None = None) -> TokenChoice:
    """A reply's `TokenChoice`; a position-free one is built once per decoding options and kept in `shared`."""
    key = decoding_key(config)
    if shared is not None and key in shared:
        return shared[key]
    choice = TokenChoice(model, config, context_length, encoder_ids)
    if shared is not None and choice.position_free:
        if len(shared) >= 64:  # requests may each bring options of their own: keep only recent ones
            shared.clear()
        shared[key] = choice
    return choice


def choose_tokens(logits: torch.Tensor, contexts: torch.Tensor, lengths: torch.Tensor,
                  choices: list[TokenChoice]) -> torch.Tensor:
    """The next token of each row from its float32 `logits`. `contexts` are the ids each row's processors read
    (left-padded with the row's first token; `lengths` real), `choices` each row's way of choosing."""
    groups: dict[str, list[int]] = {}
    for row, choice in enumerate(choices):
        groups.setdefault(choice.key, []).append(row)
    tokens = torch.empty(len(choices), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        choice = choices[rows[0]]
        if len(rows) == len(choices):
            scores, ids = logits, contexts
        else:
            index = torch.tensor(rows, device=logits.device)
            scores, ids = logits.index_select(0, index), contexts.index_select(0, index)
        if not choice.position_free:  # one row: its exact context
            ids = ids[:, ids.shape[1] - int(lengths[rows[0]]):]
        scores = choice.processors(ids, scores)
        tokens[rows] = (torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1) if choice.sample else
                        scores.argmax(dim=-1))
    return tokens


def pad_to(x: torch.Tensor, width: int, dim: int, left: bool, filler: torch.Tensor | float = 0) -> torch.Tensor:
    """`x` padded along `dim` to `width`, with `filler` (a value, or a [batch] tensor of one value per row)."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    pad = (filler.view(-1, *[1] * (x.dim() - 1)).expand(shape) if isinstance(filler, torch.Tensor) else
           x.new_full(shape, filler))
    return torch.cat([pad, x] if left else [x, pad], dim=dim)


class AppendingLayer(DynamicLayer):
    """A self-attention cache layer that appends each step's keys and values into room it keeps beyond them
    (doubled when full) instead of concatenating the whole cache every step, as `DynamicLayer` does: at 32 rows
    that copy was an eighth of a step. `keys` / `values` are views of the room; the rows' joining and leaving
    replace them with new tensors, and the next step makes room again."""

    room: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def taking_over(cls, layer: DynamicLayer) -> AppendingLayer:
        appending = cls()
        appending.__dict__.update(layer.__dict__)
        return appending

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        width, new = self.keys.shape[-2], key_states.shape[-2]
        keys = self.room[0] if self.room is not None else None
        if (keys is None or keys.data_ptr() != self.keys.data_ptr() or keys.shape[:-2] != self.keys.shape[:-2]
                or keys.shape[-2] < width + new):
            shape = (*self.keys.shape[:-2], 2 * (width + new), self.keys.shape[-1])
            self.room = (self.keys.new_empty(shape), self.values.new_empty(shape))
            self.room[0][..., :width, :], self.room[1][..., :width, :] = self.keys, self.values
        self.room[0][..., width:width + new, :], self.room[1][..., width:width + new, :] = key_states, value_states
        self.keys, self.values = self.room[0][..., :width + new, :], self.room[1][..., :width + new, :]
        return self.keys, self.values


class ModelRows:
    """The rows of one model's running batch (see the module). `replies` are the rows' replies, in row order;
    `mask` [rows, width] marks real cache columns; `contexts` [rows, width + 1] the ids each row's processors
    read (prompt and reply for a decoder-only model, the decoder's ids for T5), ending in the token the next
    step feeds; `lengths` their real lengths."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.seq2seq = bool(model.config.is_encoder_decoder)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.replies: list[LiveReply] = []
        self.choices: list[TokenChoice] = []
        self.shared: dict[str, TokenChoice] = {}  # position-free choices by decoding options
        self.cache = self.mask = self.contexts = self.lengths = None
        self.encoder_states = self.encoder_mask = None  # T5: the encoded prompts, padded on the right

    def __len__(self) -> int:
        return len(self.replies)

    def join(self, replies: list[LiveReply]) -> list[int]:
        """Read the prompts of `replies` in one forward pass, add them as rows; their first tokens."""
        model, device = self.model, self.model.device
        prompts = [reply.prompt_ids for reply in replies]
        ids, mask = padded_batch(prompts, self.pad, not self.seq2seq, device)
        mask = mask.bool()
        new = {}
        with torch.inference_mode():
            if self.seq2seq:
                encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
                starts = [r.config.decoder_start_token_id for r in replies]
                contexts = torch.tensor([[model.config.decoder_start_token_id if start is None else start]
                                         for start in starts], device=device)
                output = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=contexts,
                               use_cache=True)
                new["encoder_states"], new["encoder_mask"] = encoded.last_hidden_state, mask
                mask = torch.ones_like(contexts, dtype=torch.bool)
                choices = [token_choice(model, r.config, 1, torch.tensor([r.prompt_ids], device=device), self.shared)
                           for r in replies]
            else:
                positions = mask.long().cumsum(-1) - 1
                output = model(input_ids=ids, attention_mask=mask, position_ids=positions.masked_fill(~mask, 1),
                               use_cache=True, **({"logits_to_keep": 1} if self.keep_last_logits else {}))
                first = ids.gather(1, (~mask).sum(1, keepdim=True))
                contexts = torch.where(mask, ids, first)  # padded with each row's first token
                choices = [token_choice(model, r.config, len(r.prompt_ids), shared=self.shared) for r in replies]
            logits = output.logits[:, -1].to(copy=True, dtype=torch.float32)
        lengths = mask.sum(1)
        tokens = choose_tokens(logits, contexts, lengths, choices)
        new.update(cache=output.cache, mask=mask, contexts=torch.cat([contexts, tokens[:, None]], 1),
                   lengths=lengths + 1)
        self._merge(new)
        self.replies += replies
        self.choices += choices
        return tokens.tolist()

    def step(self) -> list[int]:
        """One token for every row: each row's last token in, its next chosen."""
        step_mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], 1)
        inputs = self.contexts[:, -1:]
        with torch.inference_mode():
            if self.seq2seq:
                output = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
                                    attention_mask=self.encoder_mask, decoder_input_ids=inputs,
                                    decoder_attention_mask=step_mask, cache=self.cache, use_cache=True)
            else:
                output = self.model(input_ids=inputs, attention_mask=step_mask, position_ids=self.lengths[:, None] - 1,
                                    cache=self.cache, use_cache=True)
            logits = output.logits[:, -1].to(copy=True, dtype=torch.float32)
        self.cache, self.mask = output.cache, step_mask
        tokens = choose_tokens(logits, self.contexts, self.lengths, self.choices)
        self.contexts = torch.cat([self.contexts, tokens[:, None]], 1)
        self.lengths = self.lengths + 1
        return tokens.tolist()

    def leave(self, keep: list[int]) -> None:
        """Keep only the rows `keep` (indices, in order); cache columns no row uses any more go too."""
        if not keep:
            self.replies, self.choices = [], []
            self.cache = self.mask = self.contexts = self.lengths = self.encoder_states = self.encoder_mask = None
            return
        index = torch.tensor(keep, device=self.model.device)
        self.replies = [self.replies[i] for i in keep]
        self.choices = [self.choices[i] for i in keep]
        self.mask, self.contexts, self.lengths = (x.index_select(0, index) for x in (self.mask, self.contexts,
                                                                                      self.lengths))
        cut = self.mask.shape[1] - int(self.lengths.max()) + 1  # leading columns that are padding in every row
        self.mask, self.contexts = self.mask[:, cut:], self.contexts[:, cut:]
        for layer in self._self_layers():
            layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]
        if self.seq2seq:
            width = int(self.encoder_mask.index_select(0, index).sum(1).max())
            self.encoder_mask = self.encoder_mask[index, :width]
            self.encoder_states = self.encoder_states[index, :width]
            for layer in self.cache.cross_attention_cache.layers:
                layer.keys, layer.values = layer.keys[index, :, :width], layer.values[index, :, :width]

    def _self_layers(self) -> list:
        cache = self.cache.self_attention_cache if self.seq2seq else self.cache
        return cache.layers

    def _merge(self, new: dict) -> None:
        """Add the rows of a prefill (`new`: its cache, mask, contexts, lengths and T5's encoder states)."""
        layers = (new["cache"].self_attention_cache if self.seq2seq else new["cache"]).layers
        layers[:] = [AppendingLayer.taking_over(layer) for layer in layers]
        if self.cache is None:
            for name, value in new.items():
                setattr(self, name, value)
            return
        old_self = self._self_layers()
        new_self = (new["cache"].self_attention_cache if self.seq2seq else new["cache"]).layers
        width = max(self.mask.shape[1], new["mask"].shape[1])
        for old, added in zip(old_self, new_self):
            old.keys = torch.cat([pad_to(old.keys, width, 2, True), pad_to(added.keys, width, 2, True)])
            old.values = torch.cat([pad_to(old.values, width, 2, True), pad_to(added.values, width, 2, True)])
        self.mask = torch.cat([pad_to(self.mask, width, 1, True, False), pad_to(new["mask"], width, 1, True, False)])
        self.contexts = torch.cat([pad_to(c, width + 1, 1, True, c.gather(1, (c.shape[1] - n)[:, None]).squeeze(1))
                                   for c, n in ((self.contexts, self.lengths), (new["contexts"], new["lengths"]))])
        self.lengths = torch.cat([self.lengths, new["lengths"]])
        if self.seq2seq:
            width = max(self.encoder_mask.shape[1], new["encoder_mask"].shape[1])
            for old, added in zip(self.cache.cross_attention_cache.layers, new["cache"].cross_attention_cache.layers):
                old.keys = torch.cat([pad_to(old.keys, width, 2, False), pad_to(added.keys, width, 2, False)])
                old.values = torch.cat([pad_to(old.values, width, 2, False), pad_to(added.values, width, 2, False)])
            self.encoder_states = torch.cat([pad_to(self.encoder_states, width, 1, False),
                                             pad_to(new["encoder_states"], width, 1, False)])
            self.encoder_mask = torch.cat([pad_to(self.encoder_mask, width, 1, False, False),
                                           pad_to(new["encoder_mask"], width, 1, False, False)])


class CancelBeams(StoppingCriteria):
    """Beam search of one reply stops once its reply is cancelled (beams cannot be stopped row by row)."""

    def __init__(self, reply: LiveReply):
        self.reply = reply

    def __deepcopy__(self, memo) -> CancelBeams:
        """Itself: a copy must watch the same reply (PEFT's T5 prompt tuning deep-copies generate's arguments)."""
        return self

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.reply.cancelled, dtype=torch.bool, device=input_ids.device)


def beam_search(model, tokenizer, reply: LiveReply) -> None:
    """Generate `reply` in one `model.generate` (blocking): beam search, or any decoding of a model whose
    adapter adds virtual tokens (`virtual_tokens.has_virtual_tokens`); it arrives whole, as one piece."""
    if not reply.admit():
        return
    try:
        ids = torch.tensor([reply.prompt_ids], device=model.device)
        config = copy.deepcopy(reply.config)
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        with torch.inference_mode():
            output = generate(model, ids, torch.ones_like(ids), config,
                              stopping_criteria=StoppingCriteriaList([CancelBeams(reply)]))
        reply.take_whole((output[0, 1:] if model.config.is_encoder_decoder else output[0, ids.shape[1]:]).tolist())
    except BaseException as err:  # the reader re-raises it in its own thread
        reply.fail(err)
