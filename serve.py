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
Each request gets its own stream; at most --max_concurrent generate at once (the rest wait in line), in one
continuous batch on a worker thread (--batching, the default: a request joins the running batch at its next
step and leaves it when its reply ends) or each in a thread of its own, and a reply stops when its client
disconnects. A batched reply equals the reply its request gets alone.

The HTTP layer is `model/serving/` (schema, guards, app, listening); the work it calls is
`model.inference.service.ChatService`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from model.inference.generation import load_for_inference
from model.inference.service import DecodingOptions, ReplyTooLong
from model.serving.app import ServeArguments, create_app
from model.serving.guards import API_KEY_ENV, is_loopback
from model.serving.listening import bound_socket
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.logging import setup_logging

logger = logging.getLogger("serve")


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
    keyed = args.key() is not None
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
