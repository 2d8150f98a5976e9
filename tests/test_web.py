"""The chat page served at / by serve.py, in real headless Chromium (Debian's `chromium`, driven by
playwright with executable_path; `make install` installs it): it asks for the API key, streams a reply
in, keeps the conversation, and Reset starts a new one. A screenshot is left in the test's tmp dir.

Chromium missing is a failure, not a skip: the page is part of what we ship."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import openai
import pytest
import torch
from conftest import served_copy
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from model.inference.generation import load_for_inference
from model.inference.service import DecodingOptions
from model.serving.app import ServeArguments, create_app
from model.serving.listening import running_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.browser]

KEY = "sk-web-test"
CHROMIUM = os.environ.get("ZHLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags Chromium needs as root in a container, without network side traffic.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def end_ids(model_dir) -> list[int]:
    ends = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return ends if isinstance(ends, list) else [ends]


@contextmanager
def serving(model_dir, target, never: list[int]):
    """serve.py's app in a thread on a copy of `model_dir` that never emits `never`; yields (url, client)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only add waiting on a busy machine
    served = served_copy(model_dir, target, never)
    model, tokenizer = load_for_inference(str(served))
    app = create_app(model, tokenizer, ServeArguments(model_name_or_path=str(served), served_model_name="tiny",
                                                      api_key=KEY), DecodingOptions(max_new_tokens=24))
    try:
        with running_in_thread(app) as url:
            yield url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    # The tiny Llama may end its reply at once; the page must show a reply filling in piece by piece.
    with serving(tiny_llama, tmp_path_factory.mktemp("web_served") / "model", end_ids(tiny_llama)) as served:
        yield served


@pytest.fixture
def page(tmp_path):
    assert os.access(CHROMIUM, os.X_OK), (
        f"Chromium not found at {CHROMIUM}: run `make install` (apt-get install -y chromium) or set ZHLM_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # A fresh profile per test (launch_persistent_context is playwright's way to pass --user-data-dir).
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 900, "height": 700})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_chat(page, url: str) -> None:
    """Open the page and give it the API key it asks for."""
    page.goto(url + "/")
    page.wait_for_selector("#keybar.shown")  # the server wants a key: the page asks for it
    page.fill("#key", KEY)
    page.click("#savekey")
    page.wait_for_function("document.getElementById('model').textContent === 'model: tiny'")


def send_message(page, text: str) -> str:
    """Type `text`, wait for the reply to finish streaming; returns what its bubble shows."""
    count = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {count + 1} && "
                           "!document.querySelector('.msg.assistant.streaming')", timeout=60_000)
    return page.locator(".msg.assistant").last.text_content()


def test_page_streams_replies_keeps_history_and_resets(server, page, tmp_path):
    url, client = server

    def expected(messages):
        reply = client.chat.completions.create(model="tiny", messages=messages)
        return reply.choices[0].message.content

    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    open_chat(page, url)
    # Record every text the reply bubble is given, to see it fill in piece by piece. Each mutation record keeps
    # the text node it added, so every update counts even when several arrive in one network read and the
    # observer runs once for all of them: what is checked is the events the page handled, not their timing.
    page.evaluate("""() => {
        window.shown = [];
        new MutationObserver(records => {
            for (const record of records)
                if (record.target.matches && record.target.matches('.msg.assistant'))
                    for (const node of record.addedNodes) window.shown.push(node.textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true});
    }""")

    def send(text):
        return send_message(page, text)

    first = send("春天的早晨")
    assert first == expected([{"role": "user", "content": "春天的早晨"}])
    steps = page.evaluate("window.shown")
    assert len({s for s in steps if s}) > 2 and first.startswith(steps[len(steps) // 2].strip()), \
        "the reply fills in piece by piece"
    assert sent[-1]["stream"] is True

    history = [{"role": "user", "content": "春天的早晨"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "小明每天骑自行车"}]
    second = send("小明每天骑自行车")
    assert sent[-1]["messages"] == history  # the page keeps the conversation
    assert second == expected(history)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 5000

    page.click("#reset")
    assert page.locator(".msg").count() == 0
    third = send("小明每天骑自行车")
    assert sent[-1]["messages"] == [{"role": "user", "content": "小明每天骑自行车"}]
    assert third == expected(sent[-1]["messages"])


def test_page_says_why_a_reply_is_empty(tiny_llama, page, tmp_path):
    """A model that writes only special tokens (decoded away) until the server's limit, or ends its turn at
    once: the bubble says so instead of staying empty."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    vocab, ends = range(AutoConfig.from_pretrained(tiny_llama).vocab_size), end_ids(tiny_llama)
    only_special = [i for i in vocab if i not in tokenizer.all_special_ids or i in ends]
    with serving(tiny_llama, tmp_path / "special", only_special) as (url, _):
        open_chat(page, url)
        assert send_message(page, "春天的早晨") == \
            "(empty reply: the model wrote only special tokens or blank space until the limit of 24 new tokens)"
    with serving(tiny_llama, tmp_path / "end", [i for i in vocab if i not in ends]) as (url, _):
        open_chat(page, url)
        assert send_message(page, "春天的早晨") == "(empty reply: the model ended its turn at once)"
    assert page.locator(".msg.assistant.empty").count() == 1
