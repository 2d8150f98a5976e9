"""What a request must pass before a route reads it: the API key, the cross-site checks (Origin, and Host on
loopback against DNS rebinding), and a body that is JSON of the route's schema within the size limit.

    app = FastAPI(dependencies=[Depends(CrossSiteGuard("127.0.0.1", allowed_origins=[]))])
    require_key = Depends(APIKeyCheck("sk-local"))                  # per API route
    body = await read_json(request, ChatCompletionRequest, max_bytes=1_000_000)

Each refusal is an `APIError` with OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Sequence
from urllib.parse import urlsplit

from fastapi import Request
from pydantic import BaseModel, ValidationError

from model.serving.schema import APIError, invalid_value

API_KEY_ENV = "ZHLM_API_KEY"


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
