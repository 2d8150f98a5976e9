"""A client of an OpenAI-compatible chat API (serve.py, vLLM, llama.cpp's server, ollama) through the `openai`
package, for the scripts that talk to a served model: rag_chat.py and distill_data.py. One place turns what
the server says into the toolkit's errors: a server that is away, a refused key, an option the model does not
take (each a `UserError` naming the flag), and a prompt over the model's context (`PromptOverContext`, which a
caller may catch to skip that prompt).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import openai

from utils.errors import UserError

T = TypeVar("T")
API_KEY_ENV = "ZHLM_API_KEY"  # serve.py's


class PromptOverContext(UserError):
    """The server refused a prompt longer than its model's context."""


class ChatAPI:
    """One server: `complete(messages, ...)` returns the server's ChatCompletion. `model` None: the first model
    the server lists (serve.py serves one). `context_field` / `context_fix`: the flag that makes prompts
    shorter, named in the error for a prompt over the context."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, *,
                 context_field: str | None = None, context_fix: str = "send a shorter prompt",
                 timeout: float = 600):
        self.base_url, self.context_field, self.context_fix = base_url, context_field, context_fix
        key = api_key or os.environ.get(API_KEY_ENV) or "none"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self.model = model or self.call(lambda: self.client.models.list().data[0].id)

    def complete(self, messages: list[dict], max_tokens: int, temperature: float | None = None,
                 seed: int | None = None):
        options = {key: value for key, value in (("temperature", temperature), ("seed", seed)) if value is not None}
        return self.call(lambda: self.client.chat.completions.create(model=self.model, messages=messages,
                                                                     max_tokens=max_tokens, **options))

    def call(self, request: Callable[[], T]) -> T:
        """The request's result; the server being away, refusing the key or the request as one error."""
        try:
            return request()
        except openai.APIConnectionError:
            raise UserError("no OpenAI-compatible server answers there", field="base_url", path=self.base_url,
                            fix="start one (python serve.py --model_name_or_path model_save) or pass --base_url "
                                "with its address, /v1 included") from None
        except openai.AuthenticationError:
            raise UserError("the server refused the API key", field="api_key",
                            fix=f"pass --api_key, or set {API_KEY_ENV}, to the key the server was started "
                                "with") from None
        except openai.BadRequestError as err:
            raise self.request_error(err) from None

    def request_error(self, err: openai.BadRequestError) -> UserError:
        """The server's refusal as the flag to change: a prompt over the context, a `max_tokens` or another
        option the model does not take."""
        body = err.body if isinstance(err.body, dict) else {}
        message = body.get("message") or err.message
        if err.code == "context_length_exceeded":
            return PromptOverContext(f"the server refused the prompt: {message}", field=self.context_field,
                                     fix=self.context_fix)
        flag = {"max_tokens": "max_tokens", "temperature": "temperature", "model": "model"}.get(err.param or "")
        return UserError(f"the server refused the request: {message}", field=flag,
                         fix=f"change --{flag}" if flag else "check the request settings against the server's")
