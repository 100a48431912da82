"""The web chat page (GET /) in a real headless Chromium, against live servers on tiny models.

Playwright for Python drives Debian's `chromium` (never `playwright install`, which downloads a
browser). The servers run in this process (uvicorn on a background thread, 127.0.0.1, a free port):
one on a tiny random GPT (streamed text must equal a greedy API call), one on a scripted model whose
reply is fixed text chosen by the user's message (for script injection, Markdown and the stop button),
and one that needs an API key and whose model loads only when the test says so.

Set PICOCHAT_SCREENSHOTS=DIR to keep the desktop and phone screenshots (DIR/picochat-page-*.png).
"""
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from picochat.model.config import ModelConfig
from picochat.engine.engine import Engine
from picochat.model.gpt import GPT, KVCache
from picochat.tokenizer.bpe import Tokenizer

from helpers import LiveServer


def _find_chromium() -> str | None:
    for name in (os.environ.get("PICOCHAT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _missing(message):
    if os.environ.get("CI"):  # CI installs chromium and playwright: missing is a failure there
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


CHROMIUM = _find_chromium()
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Plain prose, so the tiny model's greedy reply has no Markdown in it and the page shows it as it is.
TEXT = "hello there how are you today the weather is nice and the sky is blue so we walk to town " * 30

XSS = ("Here: <script>window.pwned=1</script> <img src=x onerror=\"window.pwned=2\"> **bold** and `code`\n"
       "```python\nprint(1)\n```")
DEMO = ("Here is a function that reverses a string:\n\n"
        "```python\ndef reverse(s: str) -> str:\n    return s[::-1]\n```\n\n"
        "- **Slicing** with a step of `-1` walks the string backwards.\n"
        "- It works for *any* sequence, lists included.\n\n"
        "See [the Python tutorial](https://docs.python.org/3/tutorial/) for more.")
HELLO = "Hello! I am a scripted model."
# The scripted model's reply is chosen by the user's last message: (text, seconds per token).
SCRIPTS = {"xss": (XSS, 0.0), "demo": (DEMO, 0.01), "count": (" ".join(map(str, range(1, 3000))), 0.03)}


# ------------------------------------------------------------------ a model that says what it is told
class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT under the server's Batcher: each row's reply is the script its prompt picks.

    Like a real model it keeps each sequence's state in the KV cache: every fed token id is written at its
    position (keys of layer 0, first value), so a row the Batcher moves, or reuses for a prompt with the
    same prefix, still knows its whole history: the reply picked by the last user message, and how much of
    it has been said since the last <|assistant|>.
    """

    def __init__(self, config, tokenizer, scripts, default):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        end = tokenizer.token_to_id("<|end|>")
        self.assistant = tokenizer.token_to_id("<|assistant|>")
        self.names = list(scripts)
        self.scripts = [tokenizer.encode(text) + [end] for text, _ in scripts.values()] + [tokenizer.encode(default) + [end]]
        self.delays = [delay for _, delay in scripts.values()] + [0.0]

    def new_kv_cache(self, batch_size=1, max_len=None):
        return KVCache.allocate(self.config.replace(n_layer=1), batch_size, max_len or self.config.max_seq_len,
                                torch.float32)

    def pick(self, prompt_ids) -> int:
        last_user = self.tokenizer.decode(prompt_ids).rsplit("<|user|>", 1)[-1].split("<|end|>")[0].strip()
        return self.names.index(last_user) if last_user in self.names else len(self.names)

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        history = kv_cache.k[0][:, 0, :, 0]  # (rows, positions): the token fed at each position
        rows = 1 if last_only else T          # row j: the next token after fed token j
        logits = torch.full((B, rows, self.config.vocab_size), -1e9)  # certain at any temperature
        picked = []
        for b in range(B):
            start = int(kv_cache.lengths[b])
            history[b, start:start + T] = idx[b].float()
            for j in range(rows):
                tokens = history[b, :start + T - rows + j + 1].long().tolist()
                if self.assistant not in tokens:  # a long prompt's first chunks: nothing to say yet
                    continue
                prompt_end = len(tokens) - tokens[::-1].index(self.assistant)  # just after the last <|assistant|>
                script = self.pick(tokens[:prompt_end])
                step = len(tokens) - prompt_end
                logits[b, j, self.scripts[script][min(step, len(self.scripts[script]) - 1)]] = 0.0
                picked.append(script)
        kv_cache.lengths += T
        time.sleep(max((self.delays[s] for s in picked), default=0.0))
        return logits, None


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=128, max_seq_len=256, initializer_range=0.3)
    server = LiveServer(lambda: Engine(GPT(config), tokenizer), "tiny")
    server.wait_loaded()
    yield server
    server.close()


def scripted_engine(tokenizer):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=16,
                         intermediate_size=16, max_seq_len=8192)
    return Engine(ScriptedModel(config, tokenizer, SCRIPTS, HELLO), tokenizer)


@pytest.fixture(scope="module")
def scripted(tokenizer):
    server = LiveServer(lambda: scripted_engine(tokenizer), "scripted")
    server.wait_loaded()
    yield server
    server.close()


# ------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _missing("Playwright for Python is not installed: pip install playwright")
    if CHROMIUM is None:
        _missing("no chromium found (apt-get install -y chromium, or set PICOCHAT_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(server, width=1280, height=800) -> a page on a fresh browser profile (empty localStorage)."""
    contexts = []

    def open_page(server, width=1280, height=800):
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        page.goto(server.url + "/")
        return page
    yield open_page
    for context in contexts:
        context.close()


def send(page, text):
    """Type a message, press Enter, wait for the reply to finish; returns the reply's element."""
    before = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("n => document.querySelectorAll('.msg.assistant').length > n"
                           " && !document.querySelector('.msg.streaming')", arg=before)
    return page.locator(".msg.assistant").last


def set_settings(page, **fields):
    page.click("#open-settings")
    for field, value in fields.items():
        page.fill(f"#{field}", str(value))
    page.click("#close-settings")


def stored(page) -> list:
    return page.evaluate("JSON.parse(localStorage.getItem('picochat.conversations'))")


def screenshot(page, tmp_path, name) -> Path:
    folder = Path(os.environ.get("PICOCHAT_SCREENSHOTS") or tmp_path)
    path = folder / f"picochat-page-{name}.png"
    page.screenshot(path=str(path))
    return path


# ------------------------------------------------------------------ tests
def test_page_loads_offline_without_console_errors(browser, tiny):
    context = browser.new_context()
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(tiny.url + "/")
    expect(page.locator("#model")).to_have_attribute("data-state", "ready")
    expect(page.locator("#model-name")).to_have_text("tiny")  # from GET /v1/models
    send(page, "hello")
    context.close()
    assert errors == []
    outside = [u for u in requests if not u.startswith(tiny.url + "/") and not u.startswith("data:")]
    assert outside == [] and any(u.endswith("/v1/chat/completions") for u in requests)


def test_streamed_reply_equals_a_greedy_api_call(open_page, tiny):
    page = open_page(tiny)
    set_settings(page, temperature=0, **{"max-tokens": 24})
    reply = send(page, "Hello there")
    api = tiny.chat([{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=24)
    text = api["choices"][0]["message"]["content"]
    assert len(text) > 10 and not set("*_`#>[-") & set(text)  # the seed gives a reply Markdown leaves alone
    assert stored(page)[0]["messages"][1]["content"] == text
    assert " ".join(reply.locator(".content").inner_text().split()) == " ".join(text.split())
    tokens = api["usage"]["completion_tokens"]
    assert re.fullmatch(rf"{tokens} tokens · [\d.]+ tok/s · first token \d+ ms", reply.locator(".meta").inner_text())


def test_a_reply_cannot_inject_script_or_html(open_page, scripted):
    page = open_page(scripted)
    reply = send(page, "xss")
    page.wait_for_timeout(300)  # time for an injected <img> to fail to load and fire onerror
    assert page.evaluate("window.pwned") is None
    content = reply.locator(".content")
    assert '<script>window.pwned=1</script> <img src=x onerror="window.pwned=2">' in content.inner_text()
    assert content.locator("script, img").count() == 0
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("p code")).to_have_text("code")
    expect(reply.locator(".code-block .lang")).to_have_text("python")
    expect(reply.locator(".code-block pre code")).to_have_text("print(1)")
    assert stored(page)[0]["messages"][1]["content"] == XSS
    page.reload()  # rendered again from localStorage: still text
    expect(page.locator(".msg.assistant strong")).to_have_text("bold")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_markdown_renderer(open_page, scripted):
    page = open_page(scripted)
    cases = {
        "# Title\n\npara **b** *i* _j_ `c`\nnext line":
            "<h1>Title</h1><p>para <strong>b</strong> <em>i</em> <em>j</em> <code>c</code><br>next line</p>",
        "- a\n- b\n  - c\n\n3. x\n4. y":
            "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul><ol start=\"3\"><li>x</li><li>y</li></ol>",
        "[ok](https://example.com/a) [no](javascript:alert(1)) see http://x.org/p.":
            '<p><a href="https://example.com/a" target="_blank" rel="noopener noreferrer">ok</a>'
            ' [no](javascript:alert(1)) see <a href="http://x.org/p" target="_blank" rel="noopener noreferrer">'
            "http://x.org/p</a>.</p>",
        "```js\nlet a = '<b>';":  # a fence still open while the reply streams
            '<div class="code-block"><div class="code-head"><span class="lang">js</span>'
            '<button class="copy" type="button">Copy</button></div>'
            "<pre><code class=\"language-js\">let a = '&lt;b&gt;';</code></pre></div>",
        "> quoted <i>x</i>\n\n---\nsnake_case_name": "<blockquote><p>quoted &lt;i&gt;x&lt;/i&gt;</p></blockquote>"
                                                     "<hr><p>snake_case_name</p>",
    }
    for source, html in cases.items():
        rendered = page.evaluate("s => { const d = document.createElement('div');"
                                 " d.append(picochat.renderMarkdown(s)); return d.innerHTML; }", source)
        assert rendered == html, source


def test_history_survives_reload_and_new_chat_clears(open_page, scripted):
    page = open_page(scripted)
    send(page, "first question")
    page.reload()
    expect(page.locator(".msg.user")).to_have_text("first question")
    expect(page.locator(".msg.assistant .content")).to_have_text(HELLO)
    expect(page.locator(".conversation")).to_have_count(1)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#title")).to_have_text("New chat")
    send(page, "second question")
    page.reload()
    expect(page.locator(".conversation .open")).to_have_text(["second question", "first question"])
    page.click(".conversation:nth-child(2) .open")
    expect(page.locator(".msg.user")).to_have_text("first question")
    page.click(".conversation.active .delete")
    expect(page.locator(".conversation .open")).to_have_text(["second question"])
    assert [c["title"] for c in stored(page)] == ["second question"]


def test_stop_button_aborts_and_the_server_stops_generating(open_page, scripted):
    page = open_page(scripted)
    page.fill("#input", "count")
    page.press("#input", "Enter")
    content = page.locator(".msg.assistant .content")
    page.wait_for_function("() => document.querySelector('.msg.assistant .content').textContent.length > 20")
    seen = len(content.text_content())
    page.wait_for_function("n => document.querySelector('.msg.assistant .content').textContent.length > n", arg=seen)
    page.click("#stop")  # the text grew while streaming; now stop it
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".msg.assistant .meta")).to_contain_text("stopped")
    deadline = time.time() + 15  # generous: a loaded CI machine notices the disconnect late
    while scripted.state.batcher.busy or scripted.state.batcher.waiting:
        assert time.time() < deadline, "the server kept generating after the client went away"
        time.sleep(0.05)
    text = content.text_content()
    page.wait_for_timeout(300)
    assert content.text_content() == text and text.startswith("1 2 3 4 5") and len(text) < 2000
    reply = stored(page)[0]["messages"][1]
    assert reply["stopped"] is True and reply["content"].strip() == text and "error" not in reply


def test_loading_errors_and_api_key(open_page, tokenizer):
    loaded = threading.Event()

    def load_engine():
        loaded.wait(30)
        return scripted_engine(tokenizer)
    server = LiveServer(load_engine, "gated", api_key="sekrit")
    try:
        page = open_page(server)
        expect(page.locator("#banner")).to_contain_text("model loading…")
        expect(page.locator("#model-name")).to_have_text("model loading…")
        expect(send(page, "hi").locator(".error")).to_contain_text("API key")  # 401: no key yet
        set_settings(page, **{"api-key": "sekrit"})
        expect(send(page, "hi").locator(".error")).to_contain_text("still loading")  # 503
        loaded.set()
        expect(page.locator("#model-name")).to_have_text("gated")
        expect(page.locator("#banner")).to_be_hidden()
        set_settings(page, **{"max-tokens": 100000})
        expect(send(page, "hi").locator(".error")).to_contain_text("context")  # a 400 error object
        set_settings(page, **{"max-tokens": ""})
        reply = send(page, "hi")
        expect(reply.locator(".content")).to_have_text(HELLO)
        expect(reply.locator(".error")).to_have_count(0)
        assert page.evaluate("localStorage.getItem('picochat.apiKey')") == "sekrit"
    finally:
        loaded.set()
        server.close()


def test_phone_and_desktop_layouts(open_page, scripted, tmp_path):
    page = open_page(scripted, 1280, 800)
    set_settings(page, system="You are a helpful assistant.")
    send(page, "demo")
    expect(page.locator(".msg.assistant .code-block .lang")).to_have_text("python")
    expect(page.locator("#sidebar")).to_be_in_viewport()
    screenshot(page, tmp_path, "desktop")

    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)  # the drawer's slide-out transition
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 0, "on a phone the sidebar is a closed drawer"
    composer = page.locator("#composer").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    screenshot(page, tmp_path, "phone")
    page.click("#menu")
    expect(page.locator("#sidebar")).to_be_in_viewport()
    page.wait_for_timeout(300)
    screenshot(page, tmp_path, "phone-drawer")
    page.click(".conversation .open")
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] < 0  # picking a conversation closes the drawer


def test_knowledge_base_switch_citation_links_and_decline(browser, open_page, tokenizer):
    from helpers import FakeEncoder, FakeKB
    from picochat.serve.app import Knowledge
    kb = FakeKB()
    knowledge = Knowledge(["shop"], open_kb=lambda name, encoder: kb, load_encoder=FakeEncoder)
    with LiveServer(lambda: scripted_engine(tokenizer), "scripted", knowledge=knowledge) as server:
        server.wait_loaded()
        page = open_page(server)
        page.click("#open-settings")
        expect(page.locator("#kb-field")).to_be_visible()
        assert page.locator("#kb option").all_inner_texts() == ["none: the model alone", "shop"]
        expect(page.locator("#kb")).to_have_value("shop")   # the server's knowledge base by default
        page.click("#close-settings")

        reply = send(page, "Can I return my boots?")
        link = reply.locator(".content a.cite").first        # [1] of the sources footer, as a link
        expect(link).to_have_text("[1]")
        assert "policies.md § Returns" in link.get_attribute("title")
        item = reply.locator(".sources li").first
        assert link.get_attribute("href") == "#" + item.get_attribute("id")
        expect(item).to_contain_text("Returns are accepted within 30 days.")
        assert "Sources: [1] policies.md § Returns" in reply.locator(".content").inner_text()

        declined = send(page, "Who won the world cup?")
        expect(declined.locator(".content")).to_have_text(kb.settings["handoff"])
        assert declined.locator(".sources").count() == 0

        page.click("#open-settings")
        page.select_option("#kb", "off")
        page.click("#close-settings")
        plain = send(page, "Can I return my boots?")
        assert plain.locator(".sources").count() == 0 and "Sources:" not in plain.locator(".content").inner_text()
        page.reload()   # the sources are kept with the conversation
        expect(page.locator(".msg.assistant").first.locator(".sources li").first).to_contain_text("30 days")


def test_thumbs_and_edit_reach_the_feedback_store(open_page, tokenizer, tmp_path):
    from picochat.data.feedback import FeedbackStore
    db = tmp_path / "feedback.db"
    with LiveServer(lambda: scripted_engine(tokenizer), "scripted", feedback_db=db) as server:
        server.wait_loaded()
        page = open_page(server)
        reply = send(page, "hello?")
        good, bad = reply.get_by_role("button", name="Good reply"), reply.get_by_role("button", name="Bad reply")
        expect(good).to_have_attribute("aria-pressed", "false")
        bad.click()
        expect(bad).to_have_attribute("aria-pressed", "true")
        expect(good).to_have_attribute("aria-pressed", "false")

        reply.get_by_role("button", name="Edit this reply").click()
        editor = reply.locator(".editor textarea")
        expect(editor).to_have_value(HELLO)
        editor.fill("Hello! I am picochat: ask me anything.")
        reply.get_by_role("button", name="Save").click()
        expect(reply.locator(".content")).to_have_text("Hello! I am picochat: ask me anything.")
        expect(reply.locator(".edited-mark")).to_have_text("edited")
        expect(bad).to_have_attribute("aria-pressed", "true")
        [entry] = FeedbackStore(db).entries()
        assert (entry.rating, entry.edited, entry.reply) == ("down", "Hello! I am picochat: ask me anything.", HELLO)
        assert entry.messages == [{"role": "user", "content": "hello?"}] and entry.model == "scripted"
        assert entry.response_id == stored(page)[0]["messages"][1]["id"]

        page.reload()   # the rating and the edit are kept with the conversation
        reply = page.locator(".msg.assistant").last
        expect(reply.get_by_role("button", name="Bad reply")).to_have_attribute("aria-pressed", "true")
        expect(reply.locator(".edited-mark")).to_have_text("edited")
        server.state.replies.clear()   # as a restarted server: it no longer knows the reply
        reply.get_by_role("button", name="Good reply").click()
        expect(reply.locator(".feedback-error")).to_contain_text("no reply with the id")
        expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "false")
        expect(send(page, "xss").locator(".content strong")).to_have_text("bold")   # the page goes on
