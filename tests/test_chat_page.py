"""The chat page at GET /, driven in headless Chromium: a message sent from the page streams its reply
into the conversation in pieces, the reply equals the API's, and Stop aborts a reply mid-stream.

The model is a tiny random one (its replies are noise) behind an engine that waits 50 ms per chunk, so
a stream takes long enough to watch and to stop. Set JAXGPT_CHAT_SCREENSHOT=path to keep a screenshot.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import jax
import pytest
import uvicorn

from browser import Browser, find_chromium
from jaxgpt import config
from jaxgpt.api import LanguageModel
from jaxgpt.data import tokenizers
from jaxgpt.model import init_params
from jaxgpt.serve import create_app
from jaxgpt.serve.engines import LiveEngine

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive the chat page: install one with "
                                "`apt-get install chromium` (Debian/Ubuntu) to run this test")
LAST = "[...document.querySelectorAll('.msg.assistant')].at(-1)"
REPLY = f"({LAST}?.firstChild?.data ?? '')"


class SlowEngine(LiveEngine):
    """50 ms per chunk (continuous and dynamic batching): a stream lasts long enough to see it grow and to stop it."""

    def stream(self, *args, **kwargs):
        for piece in super().stream(*args, **kwargs):
            time.sleep(0.05)
            yield piece

    def slots(self, *args, **kwargs):
        slots = super().slots(*args, **kwargs)
        step = slots.step
        slots.step = lambda: time.sleep(0.05) or step()
        return slots


@pytest.fixture(scope="module")
def base_url():
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64})
    tok = tokenizers.CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:!?'\n"))
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, init_params(cfg.model, jax.random.key(1)))
    app = create_app(SlowEngine(LanguageModel(cfg, params, tok, 0)), "tiny-chat", chunk=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def _open(browser, base_url, temperature: float, max_tokens: int) -> None:
    browser.goto(f"{base_url}/")
    browser.wait_for("document.getElementById('model').textContent.startsWith('tiny-chat')")
    browser.eval(f"document.getElementById('temperature').value = '{temperature}'; "
                 f"document.getElementById('max_tokens').value = '{max_tokens}'")
    browser.eval("document.getElementById('input').focus()")


def test_page_streams_the_reply(browser, base_url):
    body = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 14}
    expected = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    assert len(expected["message"]["content"]) > 10  # the fixture's model says enough to stream in pieces

    _open(browser, base_url, temperature=0, max_tokens=14)
    browser.type_text("Hello")
    browser.press_enter()
    browser.wait_for("document.body.dataset.state === 'streaming'")
    seen = set()
    while browser.eval("document.body.dataset.state") == "streaming":
        seen.add(browser.eval(REPLY))
    final = browser.eval(REPLY)
    partial = {text for text in seen if text and text != final}
    assert partial and all(final.startswith(text) for text in partial), (seen, final)  # it grew in pieces
    assert final == expected["message"]["content"]
    assert browser.eval("document.querySelector('.msg.user').textContent") == "Hello"
    assert browser.eval("document.getElementById('input').value") == ""
    assert not browser.eval("document.getElementById('send').disabled")

    # The second turn sends the whole conversation: the reply continues it as the API would.
    history = body["messages"] + [{"role": "assistant", "content": final}, {"role": "user", "content": "More"}]
    expected2 = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "messages": history},
                           timeout=120).json()["choices"][0]["message"]["content"]
    browser.type_text("More")
    browser.press_enter()
    browser.wait_for("document.querySelectorAll('.msg.assistant').length === 2 && "
                     "document.body.dataset.state === 'idle'")
    assert browser.eval(REPLY) == expected2

    # A third turn no longer fits the 64-token context: the server's error shows, the turn is not kept.
    browser.type_text("Again")
    browser.press_enter()
    error = browser.wait_for("document.querySelector('.msg.error')?.textContent")
    assert "this model takes at most 63" in error
    assert browser.eval("[...document.querySelectorAll('.msg.user')].at(-1).textContent") == "Again(not sent)"
    assert browser.eval("document.querySelectorAll('.msg.assistant').length") == 2


def test_stop_aborts_the_stream(browser, base_url):
    _open(browser, base_url, temperature=0, max_tokens=2000)
    browser.type_text("Tell me a long story")
    browser.press_enter()
    browser.wait_for(f"{REPLY}.length > 4")
    shot = os.environ.get("JAXGPT_CHAT_SCREENSHOT")
    if shot:  # mid-conversation, the reply still streaming
        browser.screenshot(shot)
    browser.eval("document.getElementById('stop').click()")
    browser.wait_for("document.body.dataset.state === 'idle'", timeout=10)
    stopped = browser.eval(REPLY)
    assert browser.eval(f"{LAST}.querySelector('.note').textContent") == "(stopped)"
    time.sleep(0.3)  # six more chunks' time: nothing more arrives
    assert browser.eval(REPLY) == stopped and len(stopped) < 2000
    health = httpx.get(f"{base_url}/health", timeout=10).json()
    assert health["pending"] == 0
