"""Serve a trained model: an OpenAI-compatible API, ChatLM-mini-Chinese's /api/chat and a web chat page.

    python serve.py                                     # config/serve.yaml: model_save on 127.0.0.1:8000
    python serve.py --model_name_or_path model_save/sft --port 8080 --api_key sk-local
    ZHLM_API_KEY=sk-local python serve.py --host 0.0.0.0 --max_concurrent 32   # on a GPU, reachable on the LAN

Routes:
    GET  /                     the chat page (web/index.html); open http://127.0.0.1:8000/ in a browser
    GET  /v1/models            the one served model
    POST /v1/chat/completions  OpenAI chat completions, `"stream": true` for server-sent events
    POST /v1/completions       OpenAI text completions of raw prompts (no chat template), with `echo` and
                               `logprobs` for prompt log-likelihoods (lm-evaluation-harness's local-completions)
    POST /api/chat             {"input_txt": "..."} -> {"response": "..."} (ChatLM-mini-Chinese)

With an API key (--api_key or ZHLM_API_KEY) every route except the page itself needs
`Authorization: Bearer KEY`; the page asks for the key and keeps it in the browser's local storage.
Other web pages may not drive the server through a visitor's browser: API bodies must be
`Content-Type: application/json`, a request from a page whose Origin is neither the server's own nor in
--allowed_origins is refused, and bound to loopback the Host must be localhost, 127.0.0.1 or [::1] at the
bound port (DNS rebinding). Bound off loopback, the API key is the protection.
Each request gets its own stream and cancel flag; at most --max_concurrent generate at once (the rest wait in
line), in batches on one worker thread (--batching, the default) or each in a thread of its own, and a reply
stops when its client disconnects. A batched reply equals the reply its request gets alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from model.inference.generation import InferenceArguments, load_for_inference
from model.inference.scoring import TokenScore
from model.inference.service import ChatService, DecodingOptions, PreparedReply, PromptTooLong, ReplyTooLong
from model.inference.streaming import Reply
from utils.cli import run_main
from utils.config import REPO_ROOT, parse_config, recipe_path
from utils.errors import UserError
from utils.logging import setup_logging

logger = logging.getLogger("serve")
API_KEY_ENV = "ZHLM_API_KEY"
PAGE = REPO_ROOT / "web" / "index.html"


@dataclass
class ServeArguments(InferenceArguments):
    served_model_name: str | None = field(default=None, metadata={
        "help": "Model id clients send in 'model'. None = the directory's name; the path itself is accepted too."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Interface to listen on. 127.0.0.1 = this machine only; 0.0.0.0 = every interface (set a key)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str | None = field(default=None, metadata={
        "help": f"Require 'Authorization: Bearer KEY' on the API. None = the {API_KEY_ENV} environment "
                "variable, or no key when that is unset too."})
    max_concurrent: int = field(default=16, metadata={
        "help": "Generations running at once; further requests wait in line (their streams start when served). "
                "With --batching, the largest batch."})
    batching: bool = field(default=True, metadata={
        "help": "Generate concurrent requests together in batches (one worker thread; much more throughput "
                "with many clients). false = each request in a thread of its own."})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "Largest request body accepted, in bytes."})
    allowed_origins: list[str] = field(default_factory=list, metadata={
        "help": "Web origins (scheme://host[:port], e.g. http://localhost:5173) whose pages may call the API "
                "from a browser, with CORS; '*' = any page. Empty = only the server's own page at /."})

    def __post_init__(self):
        super().__post_init__()
        origins = [origin if origin == "*" else canonical_origin(origin) for origin in self.allowed_origins]
        if None in origins:
            given = self.allowed_origins[origins.index(None)]
            raise ValueError(f"--allowed_origins: '{given}' is not a web origin; write scheme://host[:port] "
                             "(e.g. http://localhost:5173, no path) or '*' for any")
        self.allowed_origins = origins
        if self.max_concurrent < 1:
            raise ValueError(f"--max_concurrent must be >= 1, not {self.max_concurrent}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max_body_bytes must be >= 1024, not {self.max_body_bytes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be a TCP port, 0 to 65535 (0 = any free one), not {self.port}")


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


def canonical_origin(text: str) -> str | None:
    """`text` as browsers write an Origin: `scheme://host[:port]`, lower case, the default port left out;
    None when it is not an http(s) origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query
            or parts.fragment or parts.username is not None):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 80 if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class APIError(Exception):
    """A refused request, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class CrossSiteGuard:
    """Refuses what a web page could make a visitor's browser send to this server.

    Any page may POST here cross-site (forms and text/plain need no CORS preflight; their bodies are refused
    elsewhere, by Content-Type) and, by DNS rebinding, may even get its own name to resolve to 127.0.0.1 so
    that its requests count as same-origin. So: a request carrying an Origin other than the server's own
    (as its Host names it) or one of `allowed_origins` is refused, and a server bound to loopback answers only
    Host names of loopback at its own port. Bound off loopback, Host is not checked: the API key protects.
    """

    def __init__(self, bind_host: str, allowed_origins: Sequence[str]):
        self.check_host = is_loopback(bind_host)
        self.host_names = {"localhost", "127.0.0.1", "[::1]", f"[{bind_host}]" if ":" in bind_host else bind_host}
        self.any_origin = "*" in allowed_origins
        self.allowed_origins = set(allowed_origins)

    def __call__(self, request: Request) -> None:
        """The dependency of every route."""
        port = (request.scope.get("server") or (None, None))[1]  # the local port this connection reached
        self.check(request.url.scheme, request.headers.get("host"), request.headers.get("origin"), port)

    def check(self, scheme: str, host: str | None, origin: str | None, port: int | None) -> None:
        """Raise the APIError refusing a request to `scheme`://`host` (the Host header) from `origin` (the
        Origin header, None when absent) that reached local port `port`."""
        own = canonical_origin(f"{scheme}://{host}") if host else None
        if self.check_host:
            loopback = {canonical_origin(f"{scheme}://{name}:{port}") for name in self.host_names} if port else set()
            if own is None or own not in loopback:
                raise APIError(403, f"Host '{host}' is refused: this server listens on loopback and answers only "
                                    f"localhost, 127.0.0.1 or [::1] at port {port}, so that a web page cannot "
                                    "reach it by pointing its own name at 127.0.0.1 (DNS rebinding).",
                               code="host_not_allowed")
        if origin is None or self.any_origin:
            return
        sender = canonical_origin(origin)
        if sender is None or (sender != own and sender not in self.allowed_origins):
            fix = (f"Start the server with --allowed_origins {sender} to let that page in." if sender else
                   "A page without an origin of its own (a local file, a sandboxed frame) is let in by "
                   "--allowed_origins '*' only.")
            raise APIError(403, f"Requests from the web page at '{origin}' are refused: only this server's own "
                                f"page and the origins in --allowed_origins may call it from a browser. {fix}",
                           code="origin_not_allowed")


class APIKeyCheck:
    """The dependency of every API route: with a key set, `Authorization: Bearer KEY` must carry it."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key

    def __call__(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' (the key the "
                                f"server was started with via --api_key or {API_KEY_ENV}).", code="invalid_api_key")


async def read_json(request: Request, schema: type[BaseModel], max_bytes: int):
    """The body as `schema`, or the APIError refusing it."""
    # Forms and text/plain are what any web page may POST cross-site without asking first (no preflight).
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"The body must be sent as 'Content-Type: application/json', not "
                            f"'{media_type or 'none'}'.", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"Request body larger than {max_bytes} bytes.", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        data = json.loads(body)
    except ValueError as err:
        raise APIError(400, f"The body is not valid JSON ({err}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_json")
    try:
        # strict: "8", 8.5 or true is not a max_tokens (lax validation coerced them, and bool passed as an int);
        # from JSON, so that nested objects still validate as their models
        return schema.model_validate_json(bytes(body), strict=True)
    except ValidationError as err:
        raise invalid_value(err.errors()) from None


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


async def api_error(request: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(request: Request, err: HTTPException):
    # Unknown routes and methods get the same error shape as everything else.
    return JSONResponse(APIError(err.status_code, str(err.detail), code=None).body(), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def server_error(request: Request, err: Exception):
    logger.error("request failed", exc_info=err)
    failure = APIError(500, f"The server failed to answer: {type(err).__name__}: {err}", type="server_error")
    return JSONResponse(failure.body(), status_code=500)


def prepare_reply(service: ChatService, prompt: list[dict] | list[int], overrides: dict,
                  stop: Sequence[str] = ()) -> PreparedReply:
    """The service's prompt and generation config for one request, or the APIError refusing it. `prompt`:
    the messages of a chat, or the token ids of a raw prompt."""
    try:
        config = service.generation_config(**overrides)
    except ReplyTooLong as err:
        raise APIError(400, f"max_tokens must be between 1 and {err.limit} for this model, not {err.asked}.",
                       param="max_tokens", code="invalid_value") from None
    chat = bool(prompt) and isinstance(prompt[0], dict)
    try:
        prepared = service.prepare(prompt, config, stop) if chat else service.prepare_prompt(prompt, config, stop)
    except PromptTooLong as err:
        what = "the last message alone needs" if chat else "the prompt has"
        raise APIError(400, f"This model's maximum context length is {service.context_length} tokens; {what} "
                            f"{err.prompt_tokens} tokens and the prompt may use {err.budget} with max_tokens "
                            f"{config.max_new_tokens}. Shorten the {'message' if chat else 'prompt'} or lower "
                            "max_tokens.", param="messages" if chat else "prompt",
                       code="context_length_exceeded") from None
    if prepared.trimmed:
        logger.info("conversation trimmed to its newest turns to fit %d prompt tokens", prepared.budget)
    return prepared


def usage_of(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def completion_body(reply: Reply, completion_id: str, model_id: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": usage_of(reply)}


async def completion_events(service: ChatService, prepared: PreparedReply, completion_id: str, model_id: str,
                            include_usage: bool, chat: bool = True) -> AsyncIterator[str]:
    """Server-sent events of one reply: a role chunk (chat), content chunks, the finish chunk, [DONE]."""
    def event(delta: dict, finish_reason=None, usage=None) -> str:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish_reason} if chat else
                  {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason})
        chunk = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": int(time.time()), "model": model_id, "choices": [choice]}
        if usage is not None:
            chunk["choices"], chunk["usage"] = [], usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    # Leaving the block early (Starlette cancels this generator when the client disconnects) stops generating.
    async with service.stream(prepared) as stream:
        try:
            if chat:
                yield event({"role": "assistant", "content": ""})
            async for piece in stream:
                yield event({"content": piece})
            yield event({}, finish_reason=stream.reply.finish_reason)
            if include_usage:
                yield event({}, usage=usage_of(stream.reply))
            yield "data: [DONE]\n\n"
        except Exception as err:  # the status line is sent already: the error can only travel as an event
            logger.exception("generation failed")
            failure = APIError(500, f"Generation failed: {type(err).__name__}: {err}", type="server_error")
            yield f"data: {json.dumps(failure.body(), ensure_ascii=False)}\n\n"


def prompt_ids(service: ChatService, prompt: str | list[int]) -> list[int]:
    """A completion prompt as token ids (text is tokenized as the tokenizer does by default), or the APIError
    refusing it."""
    ids = service.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    vocab = service.model.config.vocab_size
    if not ids or not all(0 <= token < vocab for token in ids):
        raise APIError(400, f"A prompt must be non-empty text or token ids, each id in 0..{vocab - 1}.",
                       param="prompt", code="invalid_value")
    return ids


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


async def text_completion(service: ChatService, body: CompletionRequest, ids: list[int],
                          disconnected: Callable[[], Awaitable[bool]]) -> tuple[dict, Reply | None]:
    """One choice of a text completion of `ids` and the reply (None when `max_tokens` is 0: nothing is
    generated); `logprobs` scores prompt and reply in one forward pass."""
    reply = None
    if body.max_tokens != 0:
        prepared = prepare_reply(service, ids, body.decoding_overrides(), body.stop_strings())
        reply = await service.complete(prepared, disconnected)
    elif len(ids) > service.context_length:
        raise APIError(400, f"This model's maximum context length is {service.context_length} tokens; the prompt "
                            f"has {len(ids)}.", param="prompt", code="context_length_exceeded")
    text = (service.tokenizer.decode(ids) if body.echo else "") + (reply.text if reply else "")
    logprobs = None
    if body.logprobs is not None:
        generated = reply.text_token_ids(service.tokenizer) if reply else []
        scores = await service.score(ids + generated, body.logprobs)
        logprobs = logprobs_body(service.tokenizer, ids, generated, scores, body.echo)
    return {"text": text, "logprobs": logprobs, "finish_reason": reply.finish_reason if reply else "length"}, reply


def create_app(model, tokenizer, args: ServeArguments, decoding: DecodingOptions | None = None):
    """The FastAPI application serving `model`. `decoding` holds the server's defaults; request fields
    (max_tokens, temperature, top_p, top_k, repetition_penalty, num_beams) override them per request."""
    service = ChatService(model, tokenizer, decoding, max_concurrent=args.max_concurrent, batched=args.batching)
    model_id = args.served_model_name or Path(args.model_name_or_path).resolve().name
    accepted_ids = {model_id, args.model_name_or_path}
    created = int(time.time())
    require_key = Depends(APIKeyCheck(args.api_key or os.environ.get(API_KEY_ENV) or None))
    app = FastAPI(title="zhlm", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(CrossSiteGuard(args.host, args.allowed_origins))])
    if args.allowed_origins:
        # Pages at those origins may call the API; their browser asks first (preflight) when they send the key.
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for error, handler in ((APIError, api_error), (HTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(error, handler)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    @app.get("/v1/models", dependencies=[require_key])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "zhlm",
                                            "context_length": service.context_length}]}

    async def read_request(request: Request, schema: type[DecodingRequest]):
        """The body of a completion request, for the served model, or the APIError refusing it."""
        body = await read_json(request, schema, args.max_body_bytes)
        if body.model not in accepted_ids:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")
        return body

    def event_stream(body: DecodingRequest, prepared: PreparedReply, completion_id: str, chat: bool):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(completion_events(service, prepared, completion_id, model_id, include_usage, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=[require_key])
    async def chat_completions(request: Request):
        body = await read_request(request, ChatCompletionRequest)
        if not body.messages:
            raise APIError(400, "'messages' must contain at least one message.", param="messages",
                           code="empty_messages")
        prepared = prepare_reply(service, body.conversation(), body.decoding_overrides(), body.stop_strings())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return event_stream(body, prepared, completion_id, chat=True)
        reply = await service.complete(prepared, request.is_disconnected)
        return completion_body(reply, completion_id, model_id)

    @app.post("/v1/completions", dependencies=[require_key])
    async def completions(request: Request):
        body = await read_request(request, CompletionRequest)
        prompts = [prompt_ids(service, prompt) for prompt in body.prompts()]
        if not prompts:
            raise APIError(400, "'prompt' must hold at least one prompt.", param="prompt", code="invalid_value")
        for name, asked in (("echo", body.echo), ("logprobs", body.logprobs is not None)):
            if asked and service.seq2seq:
                raise APIError(400, f"'{name}' needs a decoder-only model (Llama): an encoder-decoder (T5) does not "
                                    "give its prompt log-probabilities.", param=name, code="unsupported_value")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 asks for nothing; it is allowed with echo (score the prompt only).",
                           param="max_tokens", code="invalid_value")
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            if len(prompts) > 1 or body.echo or body.logprobs is not None:
                raise APIError(400, "Streaming takes one prompt, without echo or logprobs.", param="stream",
                               code="invalid_value")
            prepared = prepare_reply(service, prompts[0], body.decoding_overrides(), body.stop_strings())
            return event_stream(body, prepared, completion_id, chat=False)
        # Concurrent prompts share batches.
        answers = await asyncio.gather(*(text_completion(service, body, ids, request.is_disconnected)
                                         for ids in prompts))
        completion_tokens = sum(reply.completion_tokens for _, reply in answers if reply)
        prompt_tokens = sum(map(len, prompts))
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": index, **choice} for index, (choice, _) in enumerate(answers)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/api/chat", dependencies=[require_key])
    async def legacy_chat(request: Request):
        body = await read_json(request, LegacyChatRequest, args.max_body_bytes)
        if not body.input_txt.strip():
            raise APIError(400, "'input_txt' is empty.", param="input_txt", code="empty_messages")
        prepared = prepare_reply(service, [{"role": "user", "content": body.input_txt}], {})
        reply = await service.complete(prepared, request.is_disconnected)
        return {"response": reply.text.strip()}

    app.state.model_id, app.state.service = model_id, service
    return app


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` for uvicorn to listen on (port 0 picks a free one). Bound before the
    model loads, so that a port in use, or a host that is not this machine's, is one error at once (uvicorn
    would exit with status 3 after the model had loaded)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server is listening there)", field="port",
                            fix="stop that server, or choose another --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})", field="host",
                        fix="pass an address of this machine (127.0.0.1, 0.0.0.0, ::) and a port you may use "
                            "(1024 and above without root)") from None
    return sock


@contextlib.contextmanager
def running_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` with uvicorn from a background thread (notebooks, tests) and yield its base URL;
    port 0 picks a free port. The server stops when the block ends."""
    import uvicorn

    sock = bound_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread ended before it started serving")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args, decoding = parse_config([ServeArguments, DecodingOptions], argv, default_recipe=recipe_path("serve"),
                                  description=__doc__)
    import uvicorn

    sock = bound_socket(args.host, args.port)
    model, tokenizer = load_for_inference(args.model_name_or_path, device=args.device, dtype=args.dtype)
    try:
        app = create_app(model, tokenizer, args, decoding)
    except ReplyTooLong as err:
        raise err.as_user_error() from None
    keyed = bool(args.api_key or os.environ.get(API_KEY_ENV))
    if not is_loopback(args.host) and not keyed:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model, "
                       "and off loopback Host is not checked, so a web page can reach it by DNS rebinding; "
                       "set --api_key or %s", args.host, API_KEY_ENV)
    logger.info("serving %s (%s) as '%s' on http://%s:%d/ | API key %s | %d generations at once%s | web origins: %s",
                args.model_name_or_path, type(model).__name__, app.state.model_id, args.host, sock.getsockname()[1],
                "required" if keyed else "off", args.max_concurrent, ", batched" if args.batching else "",
                ", ".join(["own page", *args.allowed_origins]))
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    run_main(main)
