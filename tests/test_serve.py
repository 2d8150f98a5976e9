"""serve.py through the official `openai` client against a server on 127.0.0.1: replies (plain and
streamed) equal direct generation, the API key is enforced, bad requests get OpenAI-style errors,
32 concurrent streams each get their own text, a client that disconnects stops its generation, and
what a foreign web page could make a browser send (forms, text/plain, other origins, rebound Host
names) is refused."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
from conftest import SENTENCES, served_copy
from transformers import AutoTokenizer

from model.inference.generation import context_length, load_for_inference
from model.inference.service import DecodingOptions
from model.inference.streaming import generate_reply
from model.serving.app import ServeArguments, create_app
from model.serving.listening import running_in_thread

pytestmark = pytest.mark.slow

KEY = "sk-test-key"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads (and OpenMP's waiting slows them on busy machines)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def start(path, **settings):
    model, tokenizer = load_for_inference(str(path))
    args = ServeArguments(model_name_or_path=str(path), **settings)
    return model, tokenizer, create_app(model, tokenizer, args, DecodingOptions(max_new_tokens=16))


@pytest.fixture(scope="module")
def llama_server(tiny_llama):
    """Llama behind an API key, 4 generations at once, 16 new tokens by default."""
    model, tokenizer, app = start(tiny_llama, served_model_name="tiny-llama", api_key=KEY, max_concurrent=4,
                                  max_body_bytes=4096)
    with running_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, app=app, model=model, tokenizer=tokenizer, client=client)


@pytest.fixture(scope="module")
def t5_server(tiny_t5, tmp_path_factory):
    """T5 without an API key (the default), named after its directory.

    The tiny T5 is pretrained on span corruption only, and the tokenizer merges each sentence of the tiny
    corpus into a token or two, so it answers every prompt as a span-corruption target ends, `<extra_id_0></s>`:
    an empty reply. The served copy never emits the sentinels or `</s>`, so its replies run to `max_tokens`
    (or `<|end|>`), which streaming and cancellation need."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    sentinels = [i for t, i in tokenizer.get_vocab().items() if t.startswith("<extra_id_")]
    model, tokenizer, app = start(served_copy(tiny_t5, tmp_path_factory.mktemp("t5_served") / "model",
                                              sentinels + [tokenizer.eos_token_id]))
    with running_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, app=app, model=model, tokenizer=tokenizer, client=client)


def direct_reply(server, messages, max_new_tokens=16, **options):
    """The reply generated in-process, without the server."""
    config = DecodingOptions(max_new_tokens=max_new_tokens, **options).generation_config(server.model.generation_config)
    # The whole conversation: these prompts are far shorter than the context.
    ids = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert len(ids) + max_new_tokens <= context_length(server.model, server.tokenizer)
    return generate_reply(server.model, server.tokenizer, ids, config)


def exchange(url, body: bytes | None = None, method="POST", key=KEY, headers=None):
    """(status, response headers, parsed JSON or text) of a raw request, for what the openai client cannot send;
    a body goes as application/json unless `headers` say otherwise."""
    request = urllib.request.Request(url, data=body, method=method, headers={
        **({"Content-Type": "application/json"} if body is not None else {}),
        **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, received, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, received, raw = err.code, err.headers, err.read()
    return status, received, json.loads(raw) if received.get_content_type() == "application/json" else raw.decode()


def post(url, body: bytes, key=KEY, headers=None):
    """(status, parsed JSON) of a raw POST."""
    status, _, answer = exchange(url, body, key=key, headers=headers)
    return status, answer


@pytest.mark.parametrize("which", ["llama_server", "t5_server"])
def test_plain_and_streamed_replies_equal_direct_generation(request, which):
    server = request.getfixturevalue(which)
    model_id = server.client.models.list().data[0].id
    assert model_id == ("tiny-llama" if which == "llama_server" else "model")
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "春天的早晨"},
                {"role": "assistant", "content": "河边的柳树"}, {"role": "user", "content": "小明每天"}]
    expected = direct_reply(server, messages, max_new_tokens=12)

    plain = server.client.chat.completions.create(model=model_id, messages=messages, max_tokens=12)
    assert plain.choices[0].message.content == expected.text  # whole and streamed replies are not stripped
    assert plain.choices[0].finish_reason == expected.finish_reason
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          expected.completion_tokens)

    chunks = list(server.client.chat.completions.create(model=model_id, messages=messages, max_tokens=12,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens

    # Request fields override the server's decoding defaults.
    beams = server.client.chat.completions.create(model=model_id, messages=messages[-1:], max_tokens=8,
                                                  extra_body={"num_beams": 3, "repetition_penalty": 1.0})
    assert beams.choices[0].message.content == direct_reply(server, messages[-1:], 8, num_beams=3,
                                                            repetition_penalty=1.0).text


def test_chatlm_api_chat_route(llama_server):
    status, body = post(llama_server.url + "/api/chat", json.dumps({"input_txt": "你好"}).encode())
    assert status == 200
    assert body == {"response": direct_reply(llama_server, [{"role": "user", "content": "你好"}]).text.strip()}


def test_api_key_is_required_on_every_route_but_the_page(llama_server):
    wrong = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    for call in (wrong.models.list,
                 lambda: wrong.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}]),
                 lambda: wrong.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                                       stream=True)):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    for key in (None, "sk-wrong"):
        for path, body in (("/v1/chat/completions", b'{"model": "tiny-llama", "messages": []}'),
                           ("/api/chat", b'{"input_txt": "x"}')):
            status, answer = post(llama_server.url + path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(llama_server.url + "/v1/models", timeout=30)
    assert caught.value.code == 401
    with urllib.request.urlopen(llama_server.url + "/", timeout=30) as page:  # the page asks for the key itself
        assert page.status == 200 and "/v1/chat/completions" in page.read().decode()


@pytest.mark.parametrize("case, status, code, param", [
    ("unknown model", 404, "model_not_found", "model"),
    ("empty messages", 400, "empty_messages", "messages"),
    ("unknown role", 400, "invalid_value", "messages.0.role"),
    ("prompt longer than the context", 400, "context_length_exceeded", "messages"),
    ("max_tokens 0", 400, "invalid_value", "max_tokens"),
    ("max_tokens beyond the context", 400, "invalid_value", "max_tokens"),
    ("temperature out of range", 400, "invalid_value", "temperature"),
    ("max_tokens as text", 400, "invalid_value", "max_tokens"),  # was read as 8
    ("max_tokens true", 400, "invalid_value", "max_tokens"),  # was read as 1: bool is not an int
    ("max_tokens not whole", 400, "invalid_value", "max_tokens"),
    ("stream as text", 400, "invalid_value", "stream"),
])
def test_bad_requests_get_openai_errors(llama_server, case, status, code, param):
    request = {"model": "tiny-llama", "messages": [{"role": "user", "content": "你好"}]}
    request.update({
        "unknown model": {"model": "gpt-4o"},
        "empty messages": {"messages": []},
        "unknown role": {"messages": [{"role": "robot", "content": "你好"}]},
        "prompt longer than the context": {"messages": [{"role": "user", "content": "春" * 400}]},
        "max_tokens 0": {"max_tokens": 0},
        "max_tokens beyond the context": {"max_tokens": 256},
        "temperature out of range": {"temperature": 3},
        "max_tokens as text": {"max_tokens": "8"},
        "max_tokens true": {"max_tokens": True},
        "max_tokens not whole": {"max_tokens": 8.5},
        "stream as text": {"stream": "false"},
    }[case])
    with pytest.raises(openai.APIStatusError) as caught:
        llama_server.client.chat.completions.create(**request)
    assert caught.value.status_code == status
    error = caught.value.body
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert error["message"]


def test_bad_json_and_large_bodies_are_refused(llama_server):
    url = llama_server.url + "/v1/chat/completions"
    status, body = post(url, b'{"model": "tiny-llama", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post(url, b'["not", "an", "object"]')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    large = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "长" * 5000}]}).encode()
    status, body = post(url, large)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Without Content-Length (chunked upload) the limit holds too.
    connection = http.client.HTTPConnection(*llama_server.url.removeprefix("http://").split(":"), timeout=60)
    connection.request("POST", "/v1/chat/completions", body=iter([large[:3000], large[3000:]]),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_32_concurrent_streams_each_get_their_own_reply(llama_server):
    # Different prompts and reply lengths: the tiny model says similar things to similar prompts, the
    # lengths make every expected reply distinct, so text crossing between streams cannot go unnoticed.
    requests = [(SENTENCES[i % len(SENTENCES)][:4 + i // len(SENTENCES)], 8 + i) for i in range(32)]
    expected = [direct_reply(llama_server, [{"role": "user", "content": p}], n).text.strip() for p, n in requests]
    assert len(set(expected)) >= 28, "the check needs replies that differ"

    def stream(request):
        prompt, max_tokens = request
        chunks = llama_server.client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

    llama_server.app.state.service.peak_active = 0
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(stream, requests))
    assert replies == expected
    service = llama_server.app.state.service
    assert 2 <= service.peak_active <= 4  # concurrent, and bounded by --max_concurrent
    assert service.active == 0
    assert service.batcher.largest >= 2, "concurrent streams were generated in batches"


def wait_for_reply(app, count_before, timeout=30):
    deadline = time.monotonic() + timeout
    while len(app.state.service.recent) == count_before or app.state.service.active:
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.05)
    return app.state.service.recent[-1]


def test_a_client_that_disconnects_stops_its_generation(t5_server):
    app, host, port = t5_server.app, *t5_server.url.removeprefix("http://").split(":")
    request = {"model": "model", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 1000}
    # A stream: read the first content chunk, then hang up.
    before = len(app.state.service.recent)
    stream = t5_server.client.chat.completions.create(**request, stream=True)
    next(stream), next(stream)
    stream.close()
    reply = wait_for_reply(app, before)
    assert reply.finish_reason == "cancelled" and reply.completion_tokens < 1000

    # A plain request: hang up while it is being generated.
    before = len(app.state.service.recent)
    body = json.dumps(request).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body))
        deadline = time.monotonic() + 30
        while app.state.service.active == 0:
            assert time.monotonic() < deadline, "the request did not start generating"
            time.sleep(0.01)
    reply = wait_for_reply(app, before)
    assert reply.finish_reason == "cancelled" and reply.completion_tokens < 1000


def test_the_command_serves_on_loopback_with_the_key_from_the_environment(tiny_t5):
    import os
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ZHLM_API_KEY": "sk-from-env", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "serve.py", "--config", "config/serve.yaml", "--model_name_or_path",
                                str(tiny_t5), "--port", str(port), "--max_new_tokens", "4"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-from-env", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert client.models.list().data[0].id == "model"
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "serve.py did not come up"
                time.sleep(0.2)
        reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "你好"}])
        assert reply.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-other", max_retries=0).models.list()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/ | API key required" in output


def test_a_busy_port_is_refused_before_the_model_loads(tiny_t5):
    """uvicorn exited with status 3 once the model had loaded; the port is now taken first: one error, status 2."""
    from conftest import run_script

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("serve.py", "--model_name_or_path", str(tiny_t5), "--port", str(port), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: field 'port': port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--port" in result.stderr and "Loading weights" not in result.stderr  # before the model
    # an address of no machine here (TEST-NET-1, kept for documentation): nothing can listen on it
    result = run_script("serve.py", "--model_name_or_path", str(tiny_t5), "--host", "192.0.2.1", check=False)
    assert result.returncode == 2 and "error: field 'host': cannot listen on 192.0.2.1:8000" in result.stderr


CHAT = json.dumps({"model": "model", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}).encode()


@contextlib.contextmanager
def another_server(server, path, host="127.0.0.1", **settings):
    """A second app over `server`'s model with other settings, configured as if bound to `host`; yields its URL.
    It listens on 127.0.0.1 whatever `host` says: what `host` changes is the app's checks, and a test server is
    never reachable from off this machine."""
    args = ServeArguments(model_name_or_path=str(path), host=host, **settings)
    app = create_app(server.model, server.tokenizer, args, DecodingOptions(max_new_tokens=4))
    with running_in_thread(app) as url:
        yield url


def test_keyless_server_refuses_forms_text_plain_and_foreign_origins(t5_server):
    """What any web page can make a visitor's browser send to 127.0.0.1 without a CORS preflight."""
    url, before = t5_server.url, len(t5_server.app.state.service.recent)
    form = urllib.parse.urlencode({"input_txt": "你好"}).encode()
    for path, body, content_type in (
            ("/v1/chat/completions", CHAT, "text/plain"),  # <form enctype="text/plain"> or fetch(no-cors)
            ("/v1/chat/completions", CHAT, "text/plain;charset=UTF-8"),
            ("/api/chat", form, "application/x-www-form-urlencoded"),
            ("/api/chat", b'--x\r\nContent-Disposition: form-data; name="input_txt"\r\n\r\nhi\r\n--x--\r\n',
             "multipart/form-data; boundary=x")):
        status, answer = post(url + path, body, key=None, headers={"Content-Type": content_type})
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type", (path, content_type)
        assert "application/json" in answer["error"]["message"]
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
        status, answer = post(url + "/v1/chat/completions", CHAT, key=None, headers={"Origin": origin})
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed", origin
        fix = "--allowed_origins '*'" if origin == "null" else f"--allowed_origins {origin}"
        assert fix in answer["error"]["message"]
        status, _, answer = exchange(url + "/v1/models", method="GET", key=None, headers={"Origin": origin})
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed"
    assert len(t5_server.app.state.service.recent) == before, "a refused request generated"


def test_own_origin_with_json_is_served(t5_server):
    port = t5_server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        for origin in (None, f"http://{host}"):
            status, received, answer = exchange(t5_server.url + "/v1/chat/completions", CHAT, key=None,
                                                headers={"Host": host, **({"Origin": origin} if origin else {})})
            assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", (host, origin)
            assert "access-control-allow-origin" not in received  # no CORS without --allowed_origins
    status, answer = post(t5_server.url + "/api/chat", json.dumps({"input_txt": "你好"}).encode(), key=None,
                          headers={"Content-Type": "application/json; charset=utf-8", "Origin": t5_server.url})
    assert status == 200 and "response" in answer
    # The official client (no Origin, JSON bodies) is unaffected.
    reply = t5_server.client.chat.completions.create(model="model", messages=[{"role": "user", "content": "你好"}],
                                                     max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_loopback_server_refuses_foreign_host_names(t5_server):
    """DNS rebinding: evil.example first resolves to the attacker, then to 127.0.0.1, and its page, now
    "same-origin", reads this server. Bound to loopback, the server answers only loopback names at its port."""
    url, port = t5_server.url, int(t5_server.url.rsplit(":", 1)[1])
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", f"[::2]:{port}",
                 f"localhost.evil.example:{port}", f"evil@127.0.0.1:{port}", f"127.0.0.1:{port}/x"):
        for method, path, body in (("GET", "/", None), ("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", CHAT)):
            status, _, answer = exchange(url + path, body, method=method, key=None,
                                         headers={"Host": host, "Origin": f"http://{host}"})
            assert status == 403 and answer["error"]["code"] == "host_not_allowed", (host, path)
            assert "DNS rebinding" in answer["error"]["message"]


def test_allowed_origins_are_served_with_cors(t5_server, tiny_t5):
    page = "http://localhost:5173"
    with another_server(t5_server, tiny_t5, allowed_origins=[page + "/"], api_key=KEY) as url:
        # The browser's preflight for a POST with the key and a JSON body, then the request itself.
        status, received, _ = exchange(url + "/v1/chat/completions", method="OPTIONS", key=None, headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert status == 200 and received["access-control-allow-origin"] == page
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                      received["access-control-allow-headers"].split(",")}
        assert "POST" in received["access-control-allow-methods"]
        status, received, answer = exchange(url + "/v1/chat/completions", CHAT, headers={"Origin": page})
        assert status == 200 and answer["object"] == "chat.completion"
        assert received["access-control-allow-origin"] == page
        status, _, answer = exchange(url + "/v1/chat/completions", CHAT, key=None, headers={"Origin": page})
        assert status == 401  # an allowed page still needs the key
        # Another port of the same host is another origin.
        status, received, _ = exchange(url + "/v1/chat/completions", method="OPTIONS", key=None, headers={
            "Origin": "http://localhost:5174", "Access-Control-Request-Method": "POST"})
        assert status == 400 and "access-control-allow-origin" not in received
        status, _, answer = exchange(url + "/v1/chat/completions", CHAT, headers={"Origin": "http://localhost:5174"})
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed"
    with another_server(t5_server, tiny_t5, allowed_origins=["*"]) as url:
        status, received, answer = exchange(url + "/v1/chat/completions", CHAT, key=None,
                                            headers={"Origin": "https://anywhere.example"})
        assert status == 200 and received["access-control-allow-origin"] == "*"
        status, _, answer = exchange(url + "/v1/models", method="GET", key=None, headers={"Host": "evil.example"})
        assert status == 403 and answer["error"]["code"] == "host_not_allowed"  # '*' opens origins, not Host


def test_off_loopback_the_key_protects_and_host_is_not_checked(t5_server, tiny_t5):
    with another_server(t5_server, tiny_t5, host="0.0.0.0", api_key=KEY) as url:
        status, _, answer = exchange(url + "/v1/models", method="GET", headers={"Host": "my-server.lan:8000"})
        assert status == 200 and answer["data"][0]["id"] == "model"
        status, _, answer = exchange(url + "/v1/models", method="GET", key=None, headers={"Host": "my-server.lan"})
        assert status == 401
        status, _, answer = exchange(url + "/v1/chat/completions", CHAT, headers={
            "Host": "my-server.lan:8000", "Origin": "http://other.lan:8000"})
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed"
        status, _, answer = exchange(url + "/v1/chat/completions", CHAT, headers={
            "Host": "my-server.lan:8000", "Origin": "http://my-server.lan:8000"})
        assert status == 200


def test_allowed_origins_are_checked_and_written_as_browsers_send_them():
    args = ServeArguments(allowed_origins=["HTTP://LocalHost:5173/", "https://chat.example:443", "*"])
    assert args.allowed_origins == ["http://localhost:5173", "https://chat.example", "*"]
    for bad in ("localhost:5173", "http://localhost:5173/chat", "file:///tmp/page.html", "null"):
        with pytest.raises(ValueError, match="--allowed_origins"):
            ServeArguments(allowed_origins=[bad])
    for port in (-1, 70000):  # bind() raised OverflowError, a traceback
        with pytest.raises(ValueError, match="--port must be a TCP port"):
            ServeArguments(port=port)


def test_stop_strings_cut_whole_and_streamed_replies_alike(llama_server):
    client, messages = llama_server.client, [{"role": "user", "content": "春天的早晨"}]
    full = direct_reply(llama_server, messages, 16, repetition_penalty=1.0).text
    stop = full[4:6]  # from the middle of the reply: the reply ends before its first occurrence
    assert len(full) > 8 and stop.strip()
    cut = full[:full.find(stop)]
    plain = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16,
                                           stop=[stop, "不会出现"], extra_body={"repetition_penalty": 1.0})
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, stop=stop,
                                                 stream=True, extra_body={"repetition_penalty": 1.0}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    absent = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, stop="不" * 40,
                                            extra_body={"repetition_penalty": 1.0})
    assert absent.choices[0].message.content == full  # a stop string that never appears (any length) cuts nothing


def test_logprobs_end_where_a_stop_string_cut_the_text(llama_server):
    """The tokens of the stop string (and any after it) were listed in logprobs though the text ended before it."""
    client, prompt = llama_server.client, "老师说："  # a reply of several tokens
    full = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, logprobs=0,
                                     extra_body={"repetition_penalty": 1.0}).choices[0]
    offsets = full.logprobs.text_offset + [len(full.text)]
    # a stop string that is a whole later token, first found where that token starts: the text ends before it
    j = next(j for j in range(1, len(offsets) - 1) if offsets[j] < offsets[j + 1]
             and full.text.find(full.text[offsets[j]:offsets[j + 1]]) == offsets[j] > 0)
    cut = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, logprobs=0,
                                    stop=full.text[offsets[j]:offsets[j + 1]],
                                    extra_body={"repetition_penalty": 1.0}).choices[0]
    assert (cut.text, cut.finish_reason) == (full.text[:offsets[j]], "stop")
    assert cut.logprobs.tokens == full.logprobs.tokens[:j] and cut.logprobs.text_offset == offsets[:j]
    assert cut.logprobs.token_logprobs == pytest.approx(full.logprobs.token_logprobs[:j], abs=1e-5)


def test_streamer_holds_back_what_may_begin_a_stop_string():
    from model.inference.detokenizer import ChineseTextStreamer

    streamer = ChineseTextStreamer(None, stop=["的早晨", "。"])
    for piece in ("春天", "的", "早", "上好", "的早", "晨还有"):
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert list(streamer) == ["春天", "的早上好"] and streamer.text == "春天的早上好" and streamer.stopped
    streamer = ChineseTextStreamer(None, stop=["的早晨"])
    for piece in ("春天", "的早"):
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)  # the reply ended: what was held back is text after all
    assert list(streamer) == ["春天", "的早"] and not streamer.stopped


def test_developer_role_is_a_system_message(llama_server):
    asked = [{"role": "developer", "content": "你是一个助手。"}, {"role": "user", "content": "小明每天"}]
    expected = direct_reply(llama_server, [{**asked[0], "role": "system"}, asked[1]], 8).text
    reply = llama_server.client.chat.completions.create(model="tiny-llama", messages=asked, max_tokens=8)
    assert reply.choices[0].message.content == expected


def test_completions_give_prompt_logprobs_as_lm_eval_reads_them(llama_server):
    """lm-evaluation-harness's local-completions scores a continuation with prompt=[token ids], echo, max_tokens
    1 and logprobs 1, and sums token_logprobs[ctxlen:-1]; is_greedy compares each with max(top_logprobs)."""
    model, tokenizer, client = llama_server.model, llama_server.tokenizer, llama_server.client
    context, continuation = tokenizer("湖泊里的学生骑着茶叶")["input_ids"], tokenizer("陶器在公里外说")["input_ids"]
    assert len(context) >= 3 and len(continuation) >= 3, "the check needs several tokens on each side"
    ids = context + continuation
    answer = client.completions.create(model="tiny-llama", prompt=[ids, ids[:5]], echo=True, max_tokens=1,
                                       logprobs=1, temperature=0, seed=1234)
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(ids) + 1 == len(logprobs.text_offset)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scored = logprobs.token_logprobs[len(context):-1]
    assert scored == pytest.approx([expected[i - 1, ids[i]].item() for i in range(len(context), len(ids))], abs=1e-4)
    is_greedy = all(lp == max(top.values()) for lp, top in zip(scored, logprobs.top_logprobs[len(context):-1]))
    assert is_greedy == all(expected[i - 1].argmax().item() == ids[i] for i in range(len(context), len(ids)))
    assert choice.text.startswith(tokenizer.decode(ids))
    assert logprobs.text_offset[:len(ids)] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert [c.index for c in answer.choices] == [0, 1] and len(answer.choices[1].logprobs.tokens) == 6
    assert answer.usage.prompt_tokens == len(ids) + 5 and answer.usage.completion_tokens == 2
    # max_tokens 0 with echo scores the prompt alone.
    only = client.completions.create(model="tiny-llama", prompt=ids, echo=True, max_tokens=0, logprobs=0)
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:-1], abs=1e-5)
    assert only.usage.completion_tokens == 0


@pytest.mark.parametrize("which", ["llama_server", "t5_server"])
def test_text_completions_generate_from_the_raw_prompt(request, which):
    server = request.getfixturevalue(which)
    model_id = server.client.models.list().data[0].id
    ids = server.tokenizer("小明每天骑自行车")["input_ids"]
    config = DecodingOptions(max_new_tokens=10).generation_config(server.model.generation_config)
    expected = generate_reply(server.model, server.tokenizer, ids, config)
    answer = server.client.completions.create(model=model_id, prompt="小明每天骑自行车", max_tokens=10)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert answer.choices[0].logprobs is None and answer.usage.completion_tokens == expected.completion_tokens
    streamed = server.client.completions.create(model=model_id, prompt="小明每天骑自行车", max_tokens=10, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected.text


@pytest.mark.parametrize("which, body, param", [
    ("t5_server", {"prompt": "你好", "echo": True, "logprobs": 1}, "echo"),  # T5: no prompt log-probabilities
    ("t5_server", {"prompt": "你好", "logprobs": 1}, "logprobs"),
    ("t5_server", {"prompt": "你好", "max_tokens": 0}, "max_tokens"),
    ("t5_server", {"prompt": []}, "prompt"),
    ("t5_server", {"prompt": ""}, "prompt"),
    ("t5_server", {"prompt": [[5, 99999]]}, "prompt"),
    ("t5_server", {"prompt": "你好", "stop": ["a"] * 17}, "stop"),
    ("llama_server", {"prompt": [5, True]}, "prompt"),  # true is no token id (was 'prompt.str')
    ("llama_server", {"prompt": "你好", "logprobs": True}, "logprobs"),  # was read as 1
    ("llama_server", {"prompt": "春" * 300, "max_tokens": 8}, "prompt"),  # beyond the 256-position context
    ("llama_server", {"prompt": "春" * 300, "max_tokens": 0, "echo": True}, "prompt"),
])
def test_bad_completion_requests_name_the_field(request, which, body, param):
    server = request.getfixturevalue(which)
    model_id = "tiny-llama" if which == "llama_server" else "model"
    status, answer = post(server.url + "/v1/completions", json.dumps({"model": model_id, **body}).encode())
    assert (status, answer["error"]["param"]) == (400, param), answer
    if body.get("prompt") == [5, True]:
        assert "not one of str, list[str], list[int], list[list[int]]" in answer["error"]["message"]


def test_batched_t5_streams_equal_their_solo_replies_and_a_failed_batch_leaves_the_server_serving(t5_server):
    requests = [(SENTENCES[i][:3 + i % 4], 6 + i) for i in range(8)]
    expected = [direct_reply(t5_server, [{"role": "user", "content": p}], n).text for p, n in requests]

    def stream(request):
        prompt, max_tokens = request
        chunks = t5_server.client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    service = t5_server.app.state.service
    service.batcher.largest = 0
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(stream, requests)) == expected
    assert service.batcher.largest >= 2, "some streams shared the batch"

    import asyncio

    broken = service.prepare_prompt([service.model.config.vocab_size + 5], service.generation_config(max_new_tokens=2))
    with pytest.raises(IndexError):  # the embedding has no such row: the error reaches the caller
        asyncio.run(service.complete(broken))
    assert stream(requests[0]) == expected[0]


def test_a_stream_that_leaves_its_batch_early_leaves_the_others_whole(llama_server):
    import asyncio

    from model.inference.service import ChatService

    service = ChatService(llama_server.model, llama_server.tokenizer, DecodingOptions(repetition_penalty=1.0),
                          max_concurrent=2, batched=True)
    leaving = service.prepare([{"role": "user", "content": SENTENCES[0][:6]}], service.generation_config(
        max_new_tokens=200))
    staying = [{"role": "user", "content": SENTENCES[1][:6]}]
    expected = direct_reply(llama_server, staying, 24, repetition_penalty=1.0)

    async def leave_once_the_other_streams(joined: asyncio.Event):
        async with service.stream(leaving) as stream:
            async for _ in stream:
                if joined.is_set():
                    break

    async def read_whole(joined: asyncio.Event):
        async with service.stream(service.prepare(staying, service.generation_config(max_new_tokens=24))) as stream:
            pieces = []
            async for piece in stream:
                pieces.append(piece)
                joined.set()
            return "".join(pieces), stream.reply

    async def both():
        joined = asyncio.Event()
        return (await asyncio.gather(leave_once_the_other_streams(joined), read_whole(joined)))[1]

    text, reply = asyncio.run(both())
    assert (text, reply) == (expected.text, expected)
    assert service.batcher.largest == 2, "the two streams shared a batch"
    deadline = time.monotonic() + 30
    while service.active:
        assert time.monotonic() < deadline, "the cancelled row did not end"
        time.sleep(0.01)
    cancelled = [r for r in service.recent if r.finish_reason == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].completion_tokens < 200
