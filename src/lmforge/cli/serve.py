"""`lmforge serve`: the OpenAI-compatible HTTP API and the web chat page."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.cli.common import add_shared
from lmforge.errors import UserError


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page"
    )
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 requests (visible "
        "in `ps`: prefer $LMFORGE_API_KEY or --api-key-file)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="a Host name the server answers to (repeatable; default: loopback names when bound to "
                        "loopback, any otherwise)")  # fmt: skip
    add_shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (1 = no batching)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before answering 503")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="the most tokens one request may ask for")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (/v1/models, responses; default: the checkpoint's folder name)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=0,
        help="the longest prompt + reply served, in tokens (default 0: the model's context)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: the physical cores)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lmforge.serving.launch import serve
    except ImportError as e:
        raise UserError(
            f"Serving needs the [serve] extra (FastAPI, uvicorn, prometheus-client, ...; {e.name} is missing): "
            f"pip install 'lmforge[serve]'."
        ) from None
    if args.max_batch < 1 or args.max_queue < 1 or args.max_tokens_cap < 1:
        raise UserError("--max-batch, --max-queue and --max-tokens-cap must be at least 1.")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {args.port}.")
    if args.context_length < 0 or args.threads < 0:
        raise UserError(
            "--context-length and --threads must be at least 0 (0: the model's context, the cores)."
        )
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name must not be empty.")
    serve(
        args.checkpoint,
        args.host,
        args.port,
        api_key(args),
        args.device,
        args.dtype,
        args.quantize,
        args.max_batch,
        args.max_queue,
        args.max_tokens_cap,
        adapter=args.adapter,
        allowed_hosts=args.allowed_host,
        served_model_name=args.served_model_name,
        context_length=args.context_length,
        threads=args.threads,
    )
    return 0


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $LMFORGE_API_KEY (None: no key needed)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text("utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read the API key file {args.api_key_file} ({e}).") from None
        if not key or not key[0].strip():
            raise UserError(f"The API key file {args.api_key_file} is empty.")
        return key[0].strip()
    return args.api_key or os.environ.get("LMFORGE_API_KEY") or None
