"""The FastAPI application over the inference service: the OpenAI routes, ChatLM-mini-Chinese's /api/chat and
the chat page. Each route is HTTP only: read the body (`guards.read_json`), call `ChatService`, frame the
reply (`schema`); refusals are `APIError`s.

    app = create_app(model, tokenizer, ServeArguments(model_name_or_path="model_save"), DecodingOptions())
    with running_in_thread(app) as url: ...                        # model.serving.listening
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from model.inference.generation import InferenceArguments
from model.inference.reply import Reply
from model.inference.service import ChatService, DecodingOptions, PreparedReply, PromptTooLong, ReplyTooLong
from model.serving.guards import API_KEY_ENV, APIKeyCheck, CrossSiteGuard, canonical_origin, read_json
from model.serving.schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DecodingRequest,
    LegacyChatRequest,
    chunk_event,
    completion_body,
    data_event,
    logprobs_body,
    text_completion_body,
    usage_of,
)
from utils.config import REPO_ROOT

logger = logging.getLogger("serve")
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
        "help": "Generate concurrent requests together in one continuous batch (one worker thread; much more "
                "throughput with many clients). false = each request in a thread of its own."})
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

    def key(self) -> str | None:
        """The API key: --api_key, else the environment's, else none."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


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
        what = f"{err.what} needs" if chat else "the prompt has"
        raise APIError(400, f"This model's maximum context length is {service.context_length} tokens; {what} "
                            f"{err.prompt_tokens} tokens and the prompt may use {err.budget} with max_tokens "
                            f"{config.max_new_tokens}. Shorten the {'message' if chat else 'prompt'} or lower "
                            "max_tokens.", param="messages" if chat else "prompt",
                       code="context_length_exceeded") from None
    if prepared.trimmed:
        logger.info("conversation trimmed to its newest turns to fit %d prompt tokens", prepared.budget)
    return prepared


def completion_prompts(service: ChatService, body: CompletionRequest) -> list[list[int]]:
    """The prompts of a text completion as token ids (text is tokenized as the tokenizer does by default),
    or the APIError refusing the request."""
    vocab = service.model.config.vocab_size
    prompts = [service.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in body.prompts()]
    if not all(ids and all(0 <= token < vocab for token in ids) for ids in prompts):
        raise APIError(400, f"A prompt must be non-empty text or token ids, each id in 0..{vocab - 1}.",
                       param="prompt", code="invalid_value")
    if not prompts:
        raise APIError(400, "'prompt' must hold at least one prompt.", param="prompt", code="invalid_value")
    for name, asked in (("echo", body.echo), ("logprobs", body.logprobs is not None)):
        if asked and service.seq2seq:
            raise APIError(400, f"'{name}' needs a decoder-only model (Llama): an encoder-decoder (T5) does not "
                                "give its prompt log-probabilities.", param=name, code="unsupported_value")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 asks for nothing; it is allowed with echo (score the prompt only).",
                       param="max_tokens", code="invalid_value")
    if body.stream and (len(prompts) > 1 or body.echo or body.logprobs is not None):
        raise APIError(400, "Streaming takes one prompt, without echo or logprobs.", param="stream",
                       code="invalid_value")
    return prompts


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


async def completion_events(service: ChatService, prepared: PreparedReply, completion_id: str, model_id: str,
                            include_usage: bool, chat: bool = True) -> AsyncIterator[str]:
    """Server-sent events of one reply: a role chunk (chat), content chunks, the finish chunk, [DONE]."""
    def event(delta: dict, **ending) -> str:
        return chunk_event(completion_id, model_id, delta, chat=chat, **ending)

    # Leaving the block early (Starlette cancels this generator when the client disconnects) stops generating.
    async with service.stream(prepared) as stream:
        try:
            if chat:
                yield event({"role": "assistant", "content": ""})
            async for piece in stream:
                yield event({"content": piece})
            yield event({}, finish_reason=stream.reply.finish_reason)
            if include_usage:
                yield event({}, usage=usage_of([stream.reply]))
            yield data_event("[DONE]")
        except Exception as err:  # the status line is sent already: the error can only travel as an event
            logger.exception("generation failed")
            yield data_event(APIError(500, f"Generation failed: {type(err).__name__}: {err}",
                                      type="server_error").body())


def create_app(model, tokenizer, args: ServeArguments, decoding: DecodingOptions | None = None) -> FastAPI:
    """The FastAPI application serving `model`. `decoding` holds the server's defaults; request fields
    (max_tokens, temperature, top_p, top_k, repetition_penalty, num_beams) override them per request."""
    service = ChatService(model, tokenizer, decoding, max_concurrent=args.max_concurrent, batched=args.batching)
    model_id = args.served_model_name or Path(args.model_name_or_path).resolve().name
    accepted_ids = {model_id, args.model_name_or_path}
    created = int(time.time())
    require_key = Depends(APIKeyCheck(args.key()))
    app = FastAPI(title="zhlm", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(CrossSiteGuard(args.host, args.allowed_origins))])
    if args.allowed_origins:
        # Pages at those origins may call the API; their browser asks first (preflight) when they send the key.
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for error, handler in ((APIError, api_error), (HTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(error, handler)

    async def read_request(request: Request, schema: type[DecodingRequest]):
        """The body of a completion request, for the served model, or the APIError refusing it."""
        body = await read_json(request, schema, args.max_body_bytes)
        if body.model not in accepted_ids:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")
        return body

    def event_stream(body: DecodingRequest, prepared: PreparedReply, completion_id: str, chat: bool):
        events = completion_events(service, prepared, completion_id, model_id, body.include_usage(), chat)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    @app.get("/v1/models", dependencies=[require_key])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "zhlm",
                                            "context_length": service.context_length}]}

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
        prompts = completion_prompts(service, body)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            prepared = prepare_reply(service, prompts[0], body.decoding_overrides(), body.stop_strings())
            return event_stream(body, prepared, completion_id, chat=False)
        answers = await asyncio.gather(*(text_completion(service, body, ids, request.is_disconnected)
                                         for ids in prompts))  # concurrent prompts share the batch
        usage = usage_of([reply for _, reply in answers if reply], prompt_tokens=sum(map(len, prompts)))
        return text_completion_body([choice for choice, _ in answers], usage, completion_id, model_id)

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
