"""The OpenAI-compatible server, tested with the official `openai` client on a loopback port."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # the [dev] extra installs these: a missing one fails, never skips
import openai
import pytest
import torch
import uvicorn

from lmforge.chat import chat_template_of, terminal_chat  # noqa: E402
from lmforge.checkpoint import load_checkpoint  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.evaluation.perplexity import token_nll  # noqa: E402
from lmforge.inference.generation import GenerationConfig, generate  # noqa: E402
from lmforge.serving.engine import Done, Engine, QueueFull, Sequence  # noqa: E402
from lmforge.serving.server import ServerSettings, create_app  # noqa: E402
from lmforge.training.trainer import train  # noqa: E402

from .conftest import SHAKESPEARE, tiny_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app):
        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    data = folder / "excerpt.txt"
    data.write_text(SHAKESPEARE.read_text("utf-8")[:60000], encoding="utf-8")
    config = tiny_config(folder / "run", data, **{"train.max_iters": 60, "model.block_size": 128})
    train(config, log=lambda _: None)
    return folder / "run"


@pytest.fixture(scope="module")
def served(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    app = create_app(
        model, tokenizer, ServerSettings(model_name="tiny", max_tokens_cap=50), chat_template_of(checkpoint)
    )
    server = RunningServer(app)
    server.model, server.tokenizer, server.checkpoint = model, tokenizer, checkpoint
    yield server
    server.stop()


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0


def test_completion_matches_lmforge_generate_and_counts_usage(served):
    prompt = "ROMEO:\nI"
    response = served.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    expected = generate(
        served.model, served.tokenizer, prompt, GenerationConfig(max_new_tokens=12, temperature=0)
    )[0]
    choice = response.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(served.tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12

    # A stop string cuts the text before it and ends with finish_reason "stop".
    stop = expected[3:5]
    stopped = served.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_echo_returns_the_prompts_own_logprobs(served):
    prompt = "First Citizen:\nBefore we proceed"
    ids = served.tokenizer.encode(prompt)
    response = served.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = response.choices[0].logprobs
    assert response.choices[0].text == prompt
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    expected = -token_nll(served.model, ids, context=128, stride=128)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), expected, atol=1e-4)
    assert len(lp.top_logprobs[1]) == 1 and lp.text_offset[:2] == [0, 1]

    # max_tokens 1 (lm-evaluation-harness's request): the prompt's scores, then one generated token's.
    one = served.client().completions.create(
        model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    scores = one.choices[0].logprobs.token_logprobs
    assert len(scores) == len(ids) + 1
    assert scores[:-1] == pytest.approx(lp.token_logprobs)


def test_chat_streaming_equals_non_streaming_with_the_same_seed(served):
    client = served.client()
    messages = [
        {"role": "system", "content": "Speak like a king."},
        {"role": "user", "content": "Who goes there?"},
    ]
    settings = dict(model="tiny", messages=messages, max_tokens=30, temperature=0.9, seed=7)
    whole = client.chat.completions.create(**settings)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    chunks = list(
        client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True})
    )
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    two = client.chat.completions.create(**{**settings, "n": 2})
    assert [c.index for c in two.choices] == [0, 1]


def test_streaming_completion_ends_with_done(served):
    with httpx.stream(
        "POST",
        served.url + "/v1/completions",
        json={"prompt": "KING:", "max_tokens": 5, "stream": True, "temperature": 0},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_bad_requests_get_openai_shaped_errors(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 125, max_tokens=10)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 128" in e.value.message
    with pytest.raises(openai.BadRequestError, match="this server allows at most 50"):
        client.completions.create(model="tiny", prompt="x", max_tokens=51)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature="hot")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    bad = httpx.post(
        served.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (
        bad.status_code == 400
        and bad.json()["error"]["message"] == "The request body is not valid JSON (in UTF-8)."
    )
    huge = httpx.post(
        served.url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]


def test_api_key_is_required_when_set(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    server = RunningServer(
        create_app(
            model,
            tokenizer,
            ServerSettings(model_name="tiny", api_key="s3cret"),
            chat_template_of(checkpoint),
        )
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("s3cret").models.list().data[0].id == "tiny"
        assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key
    finally:
        server.stop()


def test_sixteen_concurrent_clients_are_batched_and_all_served(served):
    engine = served.app.state.engine
    before = dict(engine.stats)

    def one_client(i: int) -> str:
        stream = served.client().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Tell me a tale, {i}"}],
            max_tokens=20,
            temperature=0.8,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    start = time.time()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one_client, range(16)))
    assert len(replies) == 16 and time.time() - start < 60
    assert engine.stats["sequences"] - before["sequences"] == 16
    assert engine.stats["batches"] - before["batches"] < 16  # requests that arrived together shared batches
    assert engine.stats["max_batch_seen"] > 1


def test_sequences_join_a_running_batch_and_leave_it_when_done(checkpoint):
    """Continuous batching: sequences submitted while another runs join it at the next step
    (into a rebuilt cache, or into spare rows of the running one), one that ends leaves at
    once, and each greedy text equals the one it gets alone."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    prompts = ["KING:", "Who goes there? Stand and unfold", "O", "Ay"]
    lengths = [40, 8, 20, 25]
    alone = [
        generate(model, tokenizer, p, GenerationConfig(max_new_tokens=n, temperature=0))[0]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    engine = Engine(model, tokenizer, max_batch=4)

    async def run() -> tuple[list[str], list[int]]:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in prompts]
        configs = [GenerationConfig(max_new_tokens=n, temperature=0) for n in lengths]
        configs[3] = GenerationConfig(max_new_tokens=25, temperature=1.0, top_k=5)  # beside greedy rows
        sequences = [
            Sequence(tokenizer.encode(p), c, 0, q, loop)
            for p, c, q in zip(prompts, configs, queues, strict=True)
        ]
        texts, finished_order, tokens_of_first = [""] * 4, [], [0]
        engine.submit(sequences[:1])

        async def collect(i: int) -> None:
            while True:
                event = await queues[i].get()
                if isinstance(event, Done):
                    finished_order.append(i)
                    return
                texts[i] += event.text
                if i == 0 and event.token_id is not None:
                    tokens_of_first[0] += 1
                    if tokens_of_first[0] == 1:
                        engine.submit([sequences[1], sequences[3]])  # a longer prompt: rebuilt cache
                    elif tokens_of_first[0] == 5:
                        engine.submit([sequences[2]])  # a short one: written into a spare row

        await asyncio.gather(*(collect(i) for i in range(4)))
        return texts, finished_order

    try:
        texts, order = asyncio.run(run())
    finally:
        engine.close()
    assert [texts[i] for i in (0, 1, 2)] == [
        alone[i] for i in (0, 1, 2)
    ]  # other rows and padding change nothing
    assert texts[3]
    assert order.index(1) < order.index(0)  # the short one left before the long one ended
    assert engine.stats["batches"] == 3 and engine.stats["rebuilds"] == 2  # the third joined without one
    assert engine.stats["max_batch_seen"] == 4
    assert engine.stats["steps"] <= 41 + 1  # run together: not 40 + 8 + 20 + 25 steps one after another


def test_a_client_that_disconnects_stops_its_generation(served):
    engine = served.app.state.engine
    before = engine.stats["cancelled"]
    with httpx.stream(
        "POST",
        served.url + "/v1/completions",
        json={"prompt": "KING:", "max_tokens": 50, "stream": True, "temperature": 1.0},
    ) as response:
        next(response.iter_lines())
    deadline = time.time() + 10
    while engine.stats["cancelled"] == before:
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.05)


def test_bounded_queue_refuses_instead_of_stalling(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2)
    loop = asyncio.new_event_loop()
    try:
        engine.close()  # a stopped worker: the queue only fills
        make = lambda i: Sequence([1, 2], GenerationConfig(max_new_tokens=5), i, asyncio.Queue(), loop)  # noqa: E731
        engine.submit([make(0), make(1)])
        with pytest.raises(QueueFull):
            engine.submit([make(2)])
    finally:
        loop.close()

    # Over HTTP: a request that does not fit in the queue now gets 503 with Retry-After, at once;
    # one that could never fit (more sequences than the queue holds) gets 400: retrying is useless.
    server = RunningServer(
        create_app(
            model, tokenizer, ServerSettings(model_name="tiny", max_queue=2), chat_template_of(checkpoint)
        )
    )
    try:
        engine = server.app.state.engine
        engine.close()  # nothing drains the queue
        engine.submit([make(0), make(1)])  # (the Sequence objects are never run)
        busy = httpx.post(
            server.url + "/v1/completions", json={"prompt": "KING:", "max_tokens": 5, "n": 1}, timeout=10
        )
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_busy"
        never = httpx.post(
            server.url + "/v1/completions", json={"prompt": ["a"] * 3, "max_tokens": 5}, timeout=10
        )
        assert never.status_code == 400 and "queues at most 2 at once" in never.json()["error"]["message"]
    finally:
        server.stop()


def test_web_chat_page_is_served(served):
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "<title>lmforge chat</title>" in page.text
    assert "/v1/chat/completions" in page.text


def chromium_path() -> str:
    # .ci/run installs Debian's chromium; a machine without it fails here rather than skipping the check.
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no chromium browser: install it (apt-get install chromium) to run the web chat tests"
    return path


def check_layout(page, shot, selectors=("#prompt", "#send", "#stop", "#log", "aside")) -> None:
    """Screenshot the page; everything that matters is visible, inside the window, and nothing
    makes the page scroll sideways."""
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    width = page.evaluate("() => window.innerWidth")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    for selector in selectors:
        box = page.locator(selector).bounding_box()
        assert page.is_visible(selector) and box and box["width"] > 20, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, selector


def stored(page, model="tiny") -> list[dict]:
    return page.evaluate(f"() => JSON.parse(localStorage.getItem('lmforge-chat:{model}')).history")


def test_web_chat_in_a_headless_browser(served, tmp_path):
    import playwright.sync_api as playwright

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(served.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.input_value("#max_tokens") == "64"  # from the model: half its 128-token context
        assert "128 tokens" in page.text_content("#context")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "10")
        page.fill("#prompt", "Hello there")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        conversation = stored(page)
        user = page.eval_on_selector(".user", "e => e.textContent")
        speed = page.text_content(".speed")
        send_enabled = page.is_enabled("#send")
        check_layout(page, tmp_path / "desktop.png")
        page.click(".attn-btn")  # the reply's attention over the conversation
        page.wait_for_selector(".attention[data-tokens]", timeout=30000)
        shown = page.eval_on_selector_all(".attention .tok", "spans => spans.map(s => s.textContent)")
        reply_spans = page.eval_on_selector_all(".attention .reply", "spans => spans.length")
        # A reload keeps the conversation (this browser's localStorage) and the settings.
        page.reload()
        page.wait_for_selector(".assistant[data-rendered='1']", timeout=30000)
        restored = page.eval_on_selector_all(".msg", "m => m.map(e => e.className)")
        assert page.input_value("#temperature") == "0" and page.input_value("#max_tokens") == "10"
        # A failed turn (max_tokens over the server's cap of 50) shows an error and is not kept.
        page.fill("#max_tokens", "500")
        page.fill("#prompt", "Too long a reply")
        page.click("#send")
        page.wait_for_selector(".error")
        assert "max_tokens" in page.text_content(".error") and stored(page) == conversation
        browser.close()
    reply = conversation[1]["content"]
    # The page streamed the same reply the API gives for the same conversation and settings.
    expected = (
        served.client()
        .chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello there"}],
            temperature=0,
            top_p=0.95,
            max_tokens=10,
        )  # fmt: skip
        .choices[0]
        .message.content
    )
    assert user == "Hello there" and reply == expected and len(reply) > 0
    assert conversation == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": reply},
    ]
    assert send_enabled and speed.startswith("10 tokens") and "tok/s" in speed
    assert restored == ["msg user", "msg assistant"]
    both = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": reply}]
    attention = httpx.post(served.url + "/v1/attention", json={"messages": both}).json()
    assert shown == attention["tokens"] and reply_spans == len(attention["attention"])


def test_web_chat_renders_markdown_safely_trims_history_and_fits_a_phone(served, tmp_path):
    import playwright.sync_api as playwright

    markdown = "Some **bold** code:\n\n```python\nprint(1)\n```\n\n<script>window.hacked = 1</script>"
    long_turns = []
    for i in range(3):  # more than the 128-token context holds with the reply
        long_turns += [
            {"role": "user", "content": f"question {i} " + "x" * 60},
            {"role": "assistant", "content": "y" * 40},
        ]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = phone.new_page()
        page.goto(served.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        history = [{"role": "user", "content": "Show code"}, {"role": "assistant", "content": markdown}]
        page.evaluate("h => localStorage.setItem('lmforge-chat:tiny', JSON.stringify({history: h, settings: {}}))",
                      history)  # fmt: skip
        page.reload()
        page.wait_for_selector(".assistant[data-rendered='1']")
        assert page.text_content(".assistant pre code") == "print(1)\n"
        assert page.text_content(".assistant strong") == "bold"
        assert "<script>window.hacked = 1</script>" in page.text_content(".assistant")  # shown, not run
        assert page.evaluate("() => window.hacked") is None
        # On a phone the conversations and settings wait behind one button, over the chat when open.
        check_layout(page, tmp_path / "phone.png", ("#prompt", "#send", "#stop", "#log", "#open-panel"))
        assert not page.is_visible("aside")
        page.tap("#open-panel")
        check_layout(
            page, tmp_path / "phone-settings.png", ("aside", "#temperature", "#max_tokens", "#reset")
        )
        page.tap("#close")
        assert not page.is_visible("aside")
        # A conversation longer than the context: the oldest turns are left out, and the reply comes.
        page.evaluate("h => localStorage.setItem('lmforge-chat:tiny', JSON.stringify({history: h, settings: "
                      "{max_tokens: '20', temperature: '0'}}))", long_turns)  # fmt: skip
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#prompt", "and now?")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        notice = page.text_content(".notice")
        errors = page.eval_on_selector_all(".error", "e => e.length")
        kept = stored(page)
        browser.close()
    assert "older messages left out to fit the model's context" in notice and errors == 0
    assert kept[:6] == long_turns and kept[6] == {"role": "user", "content": "and now?"} and len(kept) == 8


def conversations(page, model="tiny") -> list[dict]:
    return page.evaluate(f"() => JSON.parse(localStorage.getItem('lmforge-chat:{model}')).conversations")


def test_web_chat_conversations_regenerate_edit_live_markdown_and_themes(served, tmp_path):
    """The page's own features: a welcome screen with the model and its context; Markdown rendered
    while a reply streams; copy, regenerate and edit-and-resend; a list of conversations kept in the
    browser (switch, rename, delete, export as JSON); light and dark themes following the system."""
    import playwright.sync_api as playwright

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.goto(served.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        welcome = page.text_content("#welcome")
        light = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "50")
        page.fill("#prompt", "First question")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        live_renders = page.get_attribute(".assistant", "data-live-renders")
        first_reply = conversations(page)[0]["history"][1]["content"]
        page.click(".copy")
        copied = page.evaluate("() => navigator.clipboard.readText()")
        # Regenerate: the last reply is asked again (greedy: the same text), the conversation keeps its length.
        page.click(".regenerate")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        regenerated = conversations(page)[0]["history"]
        # Edit and resend: the question goes back to the box, the conversation is cut before it.
        page.click(".edit")
        edited_box = page.input_value("#prompt")
        cut = conversations(page)[0]["history"]
        page.fill("#prompt", "Second question")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        after_edit = conversations(page)[0]["history"]
        # A second conversation; the list switches between them, renames and deletes.
        page.click("#reset")
        assert page.is_visible("#welcome")
        page.fill("#prompt", "Another topic")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        titles = page.eval_on_selector_all(".conv .open", "bs => bs.map(b => b.textContent)")
        page.click(".conv:nth-child(2) .open")
        shown = page.eval_on_selector_all(".msg.user", "m => m.map(e => e.textContent)")
        page.once("dialog", lambda dialog: dialog.accept("Renamed"))
        page.click(".conv.current .rename")
        renamed = page.eval_on_selector_all(".conv .open", "bs => bs.map(b => b.textContent)")
        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text("utf-8"))
        page.once("dialog", lambda dialog: dialog.accept())
        page.click(".conv:not(.current) .delete")
        left = conversations(page)
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        reloaded = page.eval_on_selector_all(".msg.user", "m => m.map(e => e.textContent)")
        # Dark theme: the system's preference.
        page.emulate_media(color_scheme="dark")
        dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        page.screenshot(path=str(tmp_path / "dark.png"))
        browser.close()
    assert "tiny" in welcome and "Context: 128 tokens" in welcome
    assert live_renders is not None and int(live_renders) >= 1  # Markdown rendered before the reply ended
    assert copied == first_reply and len(first_reply) > 0
    assert regenerated == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": first_reply},
    ]
    assert edited_box == "First question" and cut == []
    assert [m["content"] for m in after_edit][0] == "Second question" and len(after_edit) == 2
    assert titles == ["Another topic", "Second question"] and shown == ["Second question"]
    assert renamed == ["Another topic", "Renamed"]
    assert exported["model"] == "tiny" and {c["title"] for c in exported["conversations"]} == {
        "Another topic",
        "Renamed",
    }
    assert [c["title"] for c in left] == ["Renamed"] and reloaded == ["Second question"]
    assert light != dark and dark == "rgb(22, 24, 28)"


def test_api_page_lists_the_routes_and_sends_a_request(served):
    """/docs: the routes of /openapi.json with their fields, and an example request sent from the page."""
    import playwright.sync_api as playwright

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        page = browser.new_page()
        page.goto(served.url + "/docs")
        page.wait_for_selector("body[data-ready='1']")
        routes = page.eval_on_selector_all(
            ".route", "r => r.map(e => e.dataset.method + ' ' + e.dataset.path)"
        )
        chat = page.locator(".route[data-path='/v1/chat/completions']")
        chat.locator("summary").click()
        fields = chat.locator("table").text_content()
        example = json.loads(chat.locator("textarea").input_value())
        chat.locator(".send").click()
        page.wait_for_selector(
            ".route[data-path='/v1/chat/completions'] .response[data-status]", timeout=30000
        )
        status = chat.locator(".response").get_attribute("data-status")
        answer = chat.locator(".response").text_content()
        browser.close()
    assert (
        "POST /v1/chat/completions" in routes
        and "POST /v1/completions" in routes
        and "GET /v1/models" in routes
    )
    assert "temperature" in fields and "messages *" in fields
    assert example["model"] == "tiny" and example["messages"][0]["role"] == "user"
    assert status == "200" and '"chat.completion"' in answer


def test_render_endpoint_escapes_html(served):
    answer = httpx.post(
        served.url + "/v1/render", json={"text": "# T\n<img src=x onerror=alert(1)> [a](javascript:x)"}
    )
    html = answer.json()["html"]
    assert "<h1>T</h1>" in html and "<img" not in html and 'href="javascript' not in html


def test_attention_of_a_reply(served):
    from lmforge.chat import chat_prompt
    from lmforge.models.gpt import recorded_attention

    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A king."}]
    answer = httpx.post(served.url + "/v1/attention", json={"messages": conversation})
    assert answer.status_code == 200
    data = answer.json()
    tokenizer, model = served.tokenizer, served.model
    prompt = chat_prompt(chat_template_of(served.checkpoint), conversation[:1])
    ids = tokenizer.encode(prompt + "A king.")
    assert data["reply_start"] == len(tokenizer.encode(prompt)) and len(data["tokens"]) == len(ids)
    rows = data["attention"]
    assert len(rows) == len(ids) - data["reply_start"] == len("A king.")  # one row per reply token (chars)
    for i, row in enumerate(rows):  # each row: a distribution over the tokens up to its own
        position = data["reply_start"] + i
        assert sum(row) == pytest.approx(1.0, abs=1e-3) and all(x == 0 for x in row[position + 1 :])
    with torch.no_grad(), recorded_attention() as recorded:
        model(torch.tensor([ids]))
    expected = torch.stack([m[0].mean(0) for m in recorded]).mean(0)[data["reply_start"]]
    assert rows[0] == pytest.approx(expected.tolist(), abs=1e-4)
    one_layer = httpx.post(served.url + "/v1/attention", json={"messages": conversation, "layer": 1}).json()
    assert one_layer["attention"][0] == pytest.approx(
        recorded[1][0].mean(0)[data["reply_start"]].tolist(), abs=1e-4
    )
    bad = httpx.post(served.url + "/v1/attention", json={"messages": conversation, "layer": 7})
    assert bad.status_code == 400 and "layer must be between 0 and 1" in bad.json()["error"]["message"]
    not_reply = httpx.post(served.url + "/v1/attention", json={"messages": conversation[::-1]})
    assert (
        not_reply.status_code == 400 and "must be the assistant reply" in not_reply.json()["error"]["message"]
    )


def test_terminal_chat_commands_and_history(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    lines = iter(["/temperature 0", "Hello", "/system Be brief.", "/bogus", "Again", "/reset", "/quit"])
    out: list[str] = []
    terminal_chat(
        model,
        tokenizer,
        chat_template_of(checkpoint),
        GenerationConfig(max_new_tokens=8),
        read=lambda _: next(lines),
        write=lambda *a, **k: out.append("".join(map(str, a))),
    )
    text = "\n".join(out)
    assert "(temperature 0)" in text and "(system prompt set)" in text
    assert "(unknown command /bogus" in text and "(conversation forgotten)" in text
    assert text.count("model> ") == 2


def test_terminal_chat_trims_a_long_message_with_a_notice_not_a_warning(checkpoint):
    import warnings

    model, tokenizer, _ = load_checkpoint(checkpoint)
    lines = iter(["/temperature 99", "/temperature inf", "KING " * 400, "/quit"])  # far over the 128 context
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw Python warning would fail the test
        terminal_chat(model, tokenizer, chat_template_of(checkpoint), GenerationConfig(max_new_tokens=8),
                      read=lambda _: next(lines), write=lambda *a, **k: out.append("".join(map(str, a))))  # fmt: skip
    text = "\n".join(out)
    assert text.count("(usage: /temperature 0.7 — a number from 0 to 5)") == 2  # out of range: a usage line
    assert "more than the context (128); only its last 128 tokens are used.)" in text  # one notice
    assert text.count("model> ") == 2  # the notice, then the reply on a fresh "model> "


# ---- the server cannot be knocked over by its clients -----------------------------------------------


def test_a_chunked_body_over_the_limit_is_cut_off_and_others_are_still_served(served):
    sent = []

    def five_megabytes():
        for _ in range(80):
            sent.append(1)
            yield b"x" * 65536

    start = time.perf_counter()
    big = httpx.post(served.url + "/v1/completions", content=five_megabytes(),
                     headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    assert "larger than 1048576 bytes" in big.json()["error"]["message"]
    assert time.perf_counter() - start < 10
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(served, monkeypatch):
    """Nearly a megabyte of text: 400 context_length_exceeded at once (no token stands for more characters
    than the longest vocabulary entry, so it cannot fit), without tokenizing it (seconds of held process)."""
    encoded = []
    real = served.tokenizer.encode
    monkeypatch.setattr(
        served.tokenizer, "encode", lambda text, *a, **k: encoded.append(len(text)) or real(text, *a, **k)
    )
    huge = "To be, or not to be " * 50000
    for route, body in (("/v1/completions", {"prompt": huge}), ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": huge}]})):  # fmt: skip
        answer = httpx.post(served.url + route, json={"model": "tiny", "max_tokens": 3, **body}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
        assert "at least" in answer.json()["error"]["message"]
    assert not any(n >= len(huge) for n in encoded)
    fits = httpx.post(
        served.url + "/v1/completions", json={"model": "tiny", "prompt": "KING:", "max_tokens": 3}
    )
    assert fits.status_code == 200 and encoded  # an ordinary prompt is tokenized as before
    longest = max(map(len, served.tokenizer.hf.get_vocab()))  # (<|endoftext|>: one token for 13 characters)
    assert longest == 13 and served.tokenizer.fewest_tokens("x" * 1000) == 1000 // 13


@pytest.mark.parametrize("body, param", [
    ({"prompt": "KING:", "top_p": 1e-46, "max_tokens": 3}, None),  # accepted and answered
    ({"prompt": "KING:", "repetition_penalty": 1e-300, "max_tokens": 3}, "repetition_penalty"),
    ({"prompt": "KING:", "seed": 2**64, "max_tokens": 3}, "seed"),
    ({"prompt": "KING:", "temperature": "hot", "max_tokens": 3}, "temperature"),
    ({"prompt": "KING:", "logprobs": 5, "max_tokens": 3}, None),
    ({"prompt": "K" * 10, "logprobs": 20, "echo": True, "max_tokens": 0}, None),
])  # fmt: skip
def test_strange_sampling_values_give_answers_or_400_never_500(served, body, param):
    reply = httpx.post(served.url + "/v1/completions", json=body, timeout=30)
    if param is None:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert reply.status_code == 400 and reply.json()["error"]["param"].endswith(param), reply.text


@pytest.mark.parametrize("raw, expected", [
    (b'{"prompt": "\\ud800 a lone surrogate", "max_tokens": 3}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "messages.0.content"),
    (b'{"prompt": "caf\\xe9"}'.replace(b"\\\\xe9", b"\\xe9"), "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, None),
])  # fmt: skip
def test_malformed_bodies_get_openai_shaped_400s(served, raw, expected):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    reply = httpx.post(
        served.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if expected:
        assert expected in error["message"] or expected == error["param"], error
    # the connection is still good for the next request
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200


def test_only_loopback_host_names_are_answered_by_a_loopback_server(served):
    evil = httpx.get(served.url + "/v1/models", headers={"host": "attacker.example"}, timeout=5)
    assert (
        evil.status_code == 400
        and "Host 'attacker.example' is not served here" in evil.json()["error"]["message"]
    )
    for name in ("localhost", f"localhost:{served.port}", f"127.0.0.1:{served.port}"):
        assert httpx.get(served.url + "/v1/models", headers={"host": name}, timeout=5).status_code == 200


def test_the_api_key_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from lmforge.cli import build_parser
    from lmforge.cli.serve import api_key

    parser = build_parser()
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    assert api_key(parser.parse_args(["serve", "x"])) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(parser.parse_args(["serve", "x", "--api-key-file", str(tmp_path / "key")])) == "from-file"
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert api_key(parser.parse_args(["serve", "x"])) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        api_key(parser.parse_args(["serve", "x", "--api-key-file", str(tmp_path / "empty")]))


def test_tokenize_detokenize_and_favicon(served):
    tok = httpx.post(served.url + "/tokenize", json={"prompt": "ROMEO: hi"}, timeout=10).json()
    assert tok["tokens"] == served.tokenizer.encode("ROMEO: hi") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == served.model.block_size
    back = httpx.post(served.url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=10).json()
    assert back == {"prompt": "ROMEO: hi"}
    bad = httpx.post(served.url + "/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    icon = httpx.get(served.url + "/favicon.ico", timeout=10)
    assert (
        icon.status_code == 200
        and icon.headers["content-type"] == "image/svg+xml"
        and b"<svg" in icon.content
    )


def test_terminal_chat_has_line_editing_and_keeps_history(checkpoint, tmp_path):
    """A person at a terminal (a pseudo-terminal here): the up arrow recalls the last line, and the
    lines are kept for the next session."""
    import os
    import pty
    import select
    import subprocess
    import sys

    env = {**os.environ, "LMFORGE_CACHE_DIR": str(tmp_path / "cache"), "TERM": "xterm"}
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", "3"],
        stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    transcript = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal transcript
        deadline = time.time() + 60
        while transcript.count(marker) < count and time.time() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    transcript += os.read(leader, 4096)
                except OSError:
                    return

    read_until(b"you> ", 1)
    os.write(leader, b"hello\r")
    read_until(b"you> ", 2)
    os.write(leader, b"\x1b[A\r")  # up arrow, then Enter: the same line again
    read_until(b"you> ", 3)
    os.write(leader, b"/quit\r")
    process.wait(timeout=30)
    os.close(leader)
    text = transcript.decode("utf-8", "replace")
    assert text.count("you> hello") == 2 and "^[[A" not in text
    # (readline keeps a repeated line once)
    assert (tmp_path / "cache" / "chat_history").read_text().split() == ["hello", "/quit"]


def test_served_name_context_length_and_threads(checkpoint, capsys):
    """--served-model-name names the model in the API, --context-length caps prompt + reply below the
    model's context, and the flags refuse nonsense in one sentence."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    settings = ServerSettings(model_name="shakespeare-small", context_length=40, max_tokens_cap=50)
    server = RunningServer(create_app(model, tokenizer, settings, chat_template_of(checkpoint)))
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["shakespeare-small"]
        assert httpx.get(server.url + "/health").json()["context_length"] == 40 < model.block_size
        reply = client.completions.create(model="shakespeare-small", prompt="ROMEO:", max_tokens=20)
        assert reply.model == "shakespeare-small"
        with pytest.raises(openai.BadRequestError, match="maximum context length is 40 tokens"):
            client.completions.create(model="shakespeare-small", prompt="ROMEO: " * 5, max_tokens=20)
    finally:
        server.stop()
    from lmforge.cli import main

    for flags, message in ((["--context-length", "-1"], "--context-length and --threads must be at least 0"),
                           (["--served-model-name", " "], "--served-model-name must not be empty")):  # fmt: skip
        assert main(["serve", str(checkpoint), *flags]) == 2
        assert message in capsys.readouterr().err


def test_metrics_in_prometheus_text_format(served):
    """/metrics parses with prometheus_client's own parser and counts what was served."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(served.url + "/metrics").text
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip

    before = scrape()
    client = served.client()
    client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    after = scrape()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("lmforge_requests_total[('route', '/v1/completions')]") == 1
    assert grew("lmforge_requests_total[('route', '/v1/chat/completions')]") == 1
    assert 2 <= grew("lmforge_generated_tokens_total[]") <= 8 and grew("lmforge_prompt_tokens_total[]") > 0
    assert grew("lmforge_time_to_first_token_seconds_count[]") == 2  # one per sequence
    assert grew("lmforge_inter_token_latency_seconds_count[]") == grew("lmforge_generated_tokens_total[]") - 2
    assert after["lmforge_queue_length[]"] == 0 and after["lmforge_running_sequences[]"] == 0
    assert "lmforge_batch_occupancy[]" in after and "lmforge_prefix_cache_reused_tokens_total[]" in after


def test_seeded_requests_batch_like_the_others_and_keep_their_text(checkpoint):
    """A seeded request samples with its own generator inside the shared batch: its text is the same
    alone and among 15 other requests (seeded or not) that run in the same batches, and 16 seeded
    clients share batches instead of running one after another."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    settings = ServerSettings(model_name="tiny", max_tokens_cap=50, max_batch=16)
    server = RunningServer(create_app(model, tokenizer, settings, chat_template_of(checkpoint)))
    engine = server.app.state.engine
    try:

        def ask(i: int, seed: int | None, n: int = 1) -> list[str]:
            reply = server.client().completions.create(model="tiny", prompt=f"KING {i}:", max_tokens=24,
                                                       temperature=1.0, seed=seed, n=n)  # fmt: skip
            return [c.text for c in reply.choices]

        alone = ask(0, seed=11, n=2)
        before = dict(engine.stats)
        with ThreadPoolExecutor(
            16
        ) as pool:  # every request seeded: before, each ran alone (16 batches of 1-2)
            together = list(pool.map(lambda i: ask(i, seed=11 if i == 0 else 100 + i, n=2 if i == 0 else 1),
                                     range(16)))  # fmt: skip
        assert together[0] == alone and alone[0] != alone[1]
        assert engine.stats["max_batch_seen"] >= 4 and engine.stats["batches"] - before["batches"] <= 8
        # The seeded ones among them are reproducible too, and never start from the prefix cache (a copied
        # prefix can round differently from a computed one): the same text whether it is warm or not.
        reused = engine.prefixes.reused
        assert ask(3, seed=103) == together[3] and engine.prefixes.reused == reused
        ask(3, seed=None)  # unseeded: its prompt's beginning comes from the cache
        assert engine.prefixes.reused > reused
    finally:
        server.stop()


def test_serve_without_the_serve_extra_names_what_is_missing(checkpoint, monkeypatch, capsys):
    import sys

    from lmforge.cli import main

    for name in [m for m in sys.modules if m.startswith("lmforge.serving")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # (an import of it fails)
    assert main(["serve", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "prometheus_client is missing" in err and "pip install 'lmforge[serve]'" in err


def test_a_client_that_trickles_its_headers_is_disconnected():
    """Headers sent a few bytes at a time (slowloris) do not hold a connection past the deadline;
    a request whose headers come at once is answered as ever."""
    from fastapi import FastAPI

    from lmforge.serving.http import HeaderDeadline

    class Quick(HeaderDeadline):
        header_timeout_s = 0.5

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=Quick))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/ping").json() == {"ok": True}
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start, closed = time.perf_counter(), False
            while time.perf_counter() - start < 3:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                    slow.settimeout(0.2)
                    closed = slow.recv(1024) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset by the server
                    closed = True
                if closed:
                    break
            assert closed and time.perf_counter() - start < 2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as quick:  # an idle keep-alive is timed
            quick.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # by uvicorn, not by the deadline
            answer = b""
            while b'{"ok":true}' not in answer and (part := quick.recv(4096)):  # (headers and body may
                answer += part  # come in two reads)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"ok":true}')
    finally:
        server.should_exit = True
        thread.join(timeout=10)
