"""Generation settings shared by every stage that saves or runs a model.

A saved model's `generation_config.json` stops at either EOS or the chat template's end-of-turn token
`<|end|>`, pads with the tokenizer's pad token, and (for T5) starts the decoder with the pad token, so
`model.generate` works on any output directory of the toolkit without extra arguments.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from transformers import GenerationConfig, PreTrainedConfig

from utils.tokenizer import CHAT_TEMPLATE, END_OF_TURN


def default_generation_config(tokenizer, config: PreTrainedConfig) -> GenerationConfig:
    """The toolkit's generation defaults for a model of `config` with `tokenizer`."""
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = [tokenizer.eos_token_id] + ([end] if end not in (None, tokenizer.unk_token_id) else [])
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id,
                            decoder_start_token_id=tokenizer.pad_token_id if seq2seq else None,
                            max_new_tokens=256, repetition_penalty=1.1)


DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class InferenceArguments:
    """The model a script runs and where (chat, serve, evaluate and generate_rejected subclass it)."""

    model_name_or_path: str = field(default="model_save", metadata={
        "help": "Model directory: any toolkit output (T5 or Llama) or a compatible HF model directory."})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu. None = cuda when available."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not '{self.dtype}'")


def load_for_inference(path: str, device: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` of a toolkit output directory (or any compatible HF model directory), in
    eval mode on `device` (default: cuda if available, else cpu). `dtype`: auto (bf16 on GPUs that
    support it, else fp32), bf16, fp16 or fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from model.build import require_model_dir
    from utils.errors import UserError

    require_model_dir(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template", path=str(path), field="chat_template",
                        fix="use a tokenizer trained by train_tokenizer.py (it saves the toolkit's template)")
    return model, tokenizer


def context_length(model, tokenizer) -> int:
    """Longest prompt + reply the model takes: the decoder's position limit, else the tokenizer's."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit or tokenizer.model_max_length)


def chat_prompt_ids(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """Token ids of `messages` rendered with the chat template plus the assistant generation prompt.

    When the conversation is longer than `max_prompt_tokens`, the oldest turns are dropped (a system
    message stays) until it fits; the last message alone is truncated from the left if it must be.
    """
    return ChatPrompts(tokenizer, messages).prompt_ids(len(messages), max_prompt_tokens)


def prompt_ids_by_rerendering(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """`chat_prompt_ids` for any chat template: render, and render again after each dropped turn (quadratic
    in the number of turns; `ChatPrompts` uses it only for templates other than the toolkit's)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if len(ids) <= max_prompt_tokens:
            return list(ids)
        if len(turns) > 1:
            turns = turns[1:]
        elif system:
            system = []
        else:
            return list(ids)[-max_prompt_tokens:]


class ChatPrompts:
    """The generation prompts of a conversation's beginnings, from one rendering and one tokenisation.

    `prompt_ids(end, limit)` equals `chat_prompt_ids(tokenizer, messages[:end], limit)`, and SFT asks for it
    before every answer, so rendering each beginning and each trimmed candidate anew was cubic in the
    conversation's length. The toolkit's template renders a conversation as its messages rendered one by
    one, each starting with a role token, then the generation prompt `<|assistant|>\n`; the tokenizer splits
    the text at added tokens before anything else, so the ids of any run of messages are that run's slice
    of the whole tokenisation. The cuts are checked to fall on added tokens; another template, or a cut
    that fails the check, falls back to `prompt_ids_by_rerendering`.
    """

    def __init__(self, tokenizer, messages: list[dict]):
        self.tokenizer, self.messages = tokenizer, messages
        self.has_system = bool(messages) and messages[0]["role"] == "system"
        self.tokens: list[int] | None = None  # the whole conversation + generation prompt; None = re-render
        self.starts: list[int] = []  # token index where message i starts; starts[-1]: the generation prompt
        if messages and tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.is_fast:
            self._tokenize_once()

    def _tokenize_once(self):
        render = lambda messages, prompt: self.tokenizer.apply_chat_template(  # noqa: E731
            messages, add_generation_prompt=prompt, tokenize=False)
        pieces = [render([message], False) for message in self.messages]
        pieces.append(render(self.messages[-1:], True)[len(pieces[-1]):])
        # tokenised as apply_chat_template does, with character offsets to find the cuts
        encoded = self.tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
        first_token_at: dict[int, int] = {}
        for index, (start, _) in enumerate(encoded["offset_mapping"]):
            first_token_at.setdefault(start, index)
        added, tokens = self.tokenizer.added_tokens_decoder, encoded["input_ids"]
        cuts, starts = 0, []
        for piece in pieces:
            index = first_token_at.get(cuts)
            if index is None or tokens[index] not in added:
                return
            starts.append(index)
            cuts += len(piece)
        self.tokens, self.starts = tokens, starts

    def length(self, end: int) -> int:
        """Tokens of `messages[:end]` rendered whole with the generation prompt (before any trimming)."""
        if self.tokens is None:
            return len(self.tokenizer.apply_chat_template(self.messages[:end], add_generation_prompt=True,
                                                          tokenize=True, return_dict=False))
        return self.starts[end] + len(self.tokens) - self.starts[-1]

    def prompt_ids(self, end: int, max_prompt_tokens: int | None = None) -> list[int]:
        """`chat_prompt_ids(tokenizer, messages[:end], max_prompt_tokens)`; None = no limit, nothing dropped."""
        limit = max_prompt_tokens if max_prompt_tokens is not None else self.length(end)
        if self.tokens is None:
            return prompt_ids_by_rerendering(self.tokenizer, self.messages[:end], limit)
        tokens, starts = self.tokens, self.starts
        generation = tokens[starts[-1]:]
        oldest = 1 if self.has_system and end > 0 else 0  # the oldest turn after a system message
        newest = max(end - 1, oldest)  # the newest turn always stays
        system = starts[oldest]  # tokens of the system message, 0 without one
        # the oldest turn from which the conversation fits: system + starts[end] - starts[turn] + generation
        turn = bisect_left(starts, system + starts[end] + len(generation) - limit, oldest, newest + 1)
        if turn <= newest:
            return tokens[:system] + tokens[starts[turn]:starts[end]] + generation
        return (tokens[starts[newest]:starts[end]] + generation)[-limit:]  # the system message goes too


def generate_replies(model, tokenizer, conversations: list[list[dict]], generation_config: GenerationConfig | None = None,
                     batch_size: int = 8, max_prompt_tokens: int | None = None, progress: bool = True) -> list[str]:
    """The model's reply to each conversation (each ends with a user turn), generated in batches.

    Prompts go through the chat template (`chat_prompt_ids`); decoder-only models are left-padded so
    that every prompt ends where generation starts. Replies are decoded without special tokens.
    """
    import torch
    from tqdm.auto import tqdm

    import copy

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
        prompts = [chat_prompt_ids(tokenizer, c, max_prompt_tokens) for c in conversations[start:start + batch_size]]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        padded = [(p + [pad] * (width - len(p))) if seq2seq else ([pad] * (width - len(p)) + p) for p in prompts]
        mask = [([1] * len(p) + [0] * (width - len(p))) if seq2seq else ([0] * (width - len(p)) + [1] * len(p))
                for p in prompts]
        input_ids = torch.tensor(padded, device=model.device)
        batch_config = config
        if not seq2seq and width + max_new > context:
            batch_config = copy.deepcopy(config)
            batch_config.max_new_tokens = max(context - width, 1)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=torch.tensor(mask, device=model.device),
                                    generation_config=batch_config)
        new_tokens = output if seq2seq else output[:, width:]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies
