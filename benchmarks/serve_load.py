"""Serving under load: N concurrent streaming clients, with and without dynamic batching.

The server (`lmforge serve`'s app, on uvicorn in this process) serves a GPT-2-124M-shaped
model (12 layers, 12 heads, 768 wide, context 1,024; random weights, float32) with a
byte-level BPE tokenizer of 8,192 tokens trained on tiny Shakespeare (the vocabulary
is smaller than GPT-2's so that every generated id decodes). Each of `--clients`
clients sends `--requests` streaming chat requests one after the other (sampling,
`--max-tokens` new tokens, `ignore_eos`-like: the random model rarely ends early).
The baseline is the same server with `max_batch=1` (one sequence at a time).

Reported per setting: requests/s, generated tokens/s, time to first token and
inter-token latency (p50 / p99). Results: benchmarks/results/serve_load.json.

    pip install -e ".[serve]" && python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def build_model_and_tokenizer():
    import torch

    from lmforge.config import ModelConfig
    from lmforge.data.datasets import resolve_dataset
    from lmforge.inference import use_blocked_matvec
    from lmforge.models import build_model
    from lmforge.tokenizers import train_bpe_tokenizer

    text = resolve_dataset("tinyshakespeare").read_text("utf-8")
    tokenizer = train_bpe_tokenizer([text], vocab_size=8192)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            block_size=1024,
            n_layer=12,
            n_head=12,
            n_embd=768,
            activation="gelu_tanh",
        )
    )
    return use_blocked_matvec(model).eval(), tokenizer  # as `lmforge serve` loads a float32 model


class Server:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def one_request(client, url: str, i: int, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": f"Tell me the tale of the {i}th king."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - start if stamps else float("nan"),
        "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "tokens": tokens,
        "elapsed": time.perf_counter() - start,
    }


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:

        async def user(c: int) -> list[dict]:
            return [await one_request(client, url, c * requests + r, max_tokens) for r in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "generated_tokens": tokens,
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 1),
        "itl_p99_ms": round(1000 * percentile(gaps, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", default=str(RESULTS / "serve_load.json"))
    args = parser.parse_args()

    from lmforge.chat import DEFAULT_CHAT_TEMPLATE
    from lmforge.device import set_threads
    from lmforge.serving.server import ServerSettings, create_app

    set_threads(0)
    model, tokenizer = build_model_and_tokenizer()
    rows = []
    for name, max_batch in (
        ("no batching (max_batch=1)", 1),
        (f"dynamic batching (max_batch={args.clients})", args.clients),
    ):
        app = create_app(
            model,
            tokenizer,
            ServerSettings(model_name="gpt2-124m-shape", max_batch=max_batch, max_queue=4 * args.clients),
            DEFAULT_CHAT_TEMPLATE,
        )
        server = Server(app)
        try:
            row = {
                "setting": name,
                "max_batch": max_batch,
                **asyncio.run(
                    load(f"http://127.0.0.1:{server.port}", args.clients, args.requests, args.max_tokens)
                ),
            }
            row["engine"] = dict(app.state.engine.stats)
        finally:
            server.stop()
        rows.append(row)
        print(
            f"{name:>34}: {row['requests_per_s']:.2f} req/s  {row['tokens_per_s']:.1f} tok/s  "
            f"TTFT p50 {row['ttft_p50_s']:.2f}s p99 {row['ttft_p99_s']:.2f}s  "
            f"ITL p50 {row['itl_p50_ms']:.0f}ms p99 {row['itl_p99_ms']:.0f}ms",
            flush=True,
        )
    rows[1]["throughput_vs_no_batching"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "serve_load",
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "model": "GPT-2-124M shape (vocab 8,192), float32",
                "clients": args.clients,
                "requests_per_client": args.requests,
                "max_tokens": args.max_tokens,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
