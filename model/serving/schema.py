"""What goes over the wire: OpenAI's request bodies (chat and text completions) and ChatLM-mini-Chinese's,
the response bodies and server-sent-event chunks built from a `Reply`, and OpenAI's error shape.

    body = ChatCompletionRequest.model_validate_json(raw, strict=True)
    body.conversation(), body.decoding_overrides(), body.stop_strings()
    completion_body(reply, "chatcmpl-...", "model")             # a whole reply
    chunk_event("chatcmpl-...", "model", {"content": "你"})      # one `data: ...` event of a stream
    raise APIError(400, "...", param="max_tokens", code="invalid_value")
"""

from __future__ import annotations

import json
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.inference.reply import Reply
from model.inference.scoring import TokenScore


class APIError(Exception):
    """A refused request, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # `developer` is OpenAI's current name for system instructions.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_turn(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class DecodingRequest(BaseModel):
    """The decoding fields of OpenAI's completion requests that apply to a local model, plus top_k,
    repetition_penalty and num_beams (as vLLM accepts them; the openai client sends them via extra_body)."""

    # Fields of the OpenAI API that do not apply here (tools, seed, ...) are ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    num_beams: int | None = Field(default=None, ge=1, le=16)
    n: int = Field(default=1, ge=1, le=1)
    # The reply ends before the first of these (OpenAI allows 4; evaluation harnesses send more).
    stop: list[str] | None = Field(default=None, max_length=16)

    @field_validator("stop", mode="before")
    @classmethod
    def one_stop_string_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    def stop_strings(self) -> list[str]:
        return [s for s in self.stop or [] if s]

    def reply_length(self) -> int | None:
        return self.max_tokens

    def decoding_overrides(self) -> dict:
        """DecodingOptions fields of this request (None = the server's default)."""
        return dict(max_new_tokens=self.reply_length(), temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty, num_beams=self.num_beams)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(DecodingRequest):
    """OpenAI's chat completion request (logprobs, tools and the like are ignored)."""

    messages: list[Message]
    max_completion_tokens: int | None = None

    def conversation(self) -> list[dict]:
        return [m.as_turn() for m in self.messages]

    def reply_length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(DecodingRequest):
    """OpenAI's (legacy) text completion request: raw prompts, as text or token ids, one choice each.
    `echo` puts the prompt before the reply and `logprobs` (the number of most likely tokens to list at
    each place) gives token log-probabilities, the prompt's too with `echo`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 with echo = score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class LegacyChatRequest(BaseModel):
    """ChatLM-mini-Chinese's API: one user message, greedy reply."""

    input_txt: str


# pydantic's name for the member of a union an error is about, inside an error's location: ("prompt",
# "list[int]", 1) is the user's prompt.1; fields are snake_case, members are types (str, list[int], TextPart)
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none|[a-z]+\[.*\]|[A-Z]\w*)")


def invalid_value(errors: list[dict]) -> APIError:
    """OpenAI's 400 for a body that does not validate, naming the first field that failed as the client wrote
    it; for a union (prompt: text, texts or token ids), the forms it takes."""
    def member(part) -> bool:
        return isinstance(part, str) and bool(_UNION_MEMBER.fullmatch(part))

    def field_path(error: dict) -> str:
        return ".".join(str(part) for part in error["loc"] if not member(part))

    param = field_path(errors[0]) or None
    members = list(dict.fromkeys(part for error in errors if field_path(error).startswith(param or "")
                                 for part in error["loc"] if member(part)))
    problem = f"not one of {', '.join(members)}" if len(members) > 1 else errors[0]["msg"]
    return APIError(400, f"Invalid value for '{param}': {problem}.", param=param, code="invalid_value")


def usage_of(replies: list[Reply], prompt_tokens: int | None = None) -> dict:
    """OpenAI's `usage` of `replies` (their prompts' tokens unless `prompt_tokens` counts them)."""
    prompt = sum(r.prompt_tokens for r in replies) if prompt_tokens is None else prompt_tokens
    completion = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(reply: Reply, completion_id: str, model_id: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": usage_of([reply])}


def text_completion_body(choices: list[dict], usage: dict, completion_id: str, model_id: str) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": index, **choice} for index, choice in enumerate(choices)], "usage": usage}


def logprobs_body(tokenizer, ids: list[int], generated: list[int], scores: list[TokenScore], echo: bool) -> dict:
    """OpenAI's `logprobs` of one completion choice: the generated tokens, after the prompt's with `echo`
    (the first has no log-probability: nothing comes before it). `scores` are those of `ids + generated`."""
    prefixes = [len(text) for text in tokenizer.batch_decode([ids[:i] for i in range(len(ids) + 1)])] if echo else [0]
    offsets = prefixes[:-1] if echo else []
    offsets += [prefixes[-1] + len(text) for text in tokenizer.batch_decode(
        [generated[:j] for j in range(len(generated))], skip_special_tokens=True)]
    tokens = tokenizer.convert_ids_to_tokens(ids + generated)
    logprobs = [None] + [score.logprob for score in scores]
    top = [None] + [{tokenizer.convert_ids_to_tokens(token): value for token, value in score.top} for score in scores]
    start = 0 if echo else len(ids)
    return {"tokens": tokens[start:], "token_logprobs": logprobs[start:], "top_logprobs": top[start:],
            "text_offset": offsets}


def chunk_event(completion_id: str, model_id: str, delta: dict, finish_reason: str | None = None,
                usage: dict | None = None, chat: bool = True) -> str:
    """One server-sent event of a streamed completion: a chat delta or a text piece, the finish reason,
    or (with `usage`) the closing usage chunk, which has no choices."""
    choice = ({"index": 0, "delta": delta, "finish_reason": finish_reason} if chat else
              {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason})
    chunk = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model_id, "choices": [choice]}
    if usage is not None:
        chunk["choices"], chunk["usage"] = [], usage
    return data_event(chunk)


def data_event(body: dict | str) -> str:
    """`data: ...` and the blank line that ends a server-sent event."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"
