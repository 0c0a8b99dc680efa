"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) and the web chat page.

    GET  /health               liveness and queue length (no API key needed)
    GET  /v1/models            the one model served
    POST /v1/completions       text completion; `echo` + `logprobs` score the prompt itself
    POST /v1/chat/completions  chat, formatted with the checkpoint's chat template
    GET  /                     the web chat page

Both completion endpoints stream with `"stream": true` (server-sent events ending in
`data: [DONE]`; `stream_options.include_usage` adds a usage chunk before it). Errors
are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.chat import chat_prompt, chat_stop_strings
from lmforge.generation import start_ids
from lmforge.serving.engine import Engine, QueueFull, Sampling, Sequence, prompt_logprobs


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_tokens_cap: int = 2048  # the most new tokens one choice may ask for
    max_n: int = 8  # the most choices one request may ask for
    max_body_bytes: int = 1 << 20
    max_batch: int = 8  # sequences decoded together (1 = no dynamic batching)
    max_queue: int = 64  # sequences waiting; beyond it requests get 503


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request shapes ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logit_bias, ...) are accepted

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # lmforge's extra sampling options (as in `lmforge generate`)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


# ---- the app ---------------------------------------------------------------------------------------


def create_app(model, tokenizer, settings: ServerSettings, chat_template: str) -> FastAPI:
    """The FastAPI application serving `model`; its engine starts with the app."""
    engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()  # on shutdown: stop the worker thread

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    block_size = model.block_size
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
        else:
            message = "Invalid request: " + "; ".join(problems) + "."
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.middleware("http")
    async def limits_and_auth(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(error_body(f"The request body is larger than {settings.max_body_bytes} bytes.",
                                           "invalid_request_error"), status_code=413)
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
                return JSONResponse(error_body("Invalid or missing API key (send Authorization: Bearer KEY).",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "queued": engine.queued()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge", "context_length": block_size}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("lmforge.serving").joinpath("chat.html").read_text("utf-8")

    # ---- shared helpers ----

    def max_new(body: SamplingFields, requested: int | None, default: int) -> int:
        n = default if requested is None else requested
        if n > settings.max_tokens_cap:
            raise APIError(400, f"max_tokens is {n}; this server allows at most {settings.max_tokens_cap}.",
                           param="max_tokens")
        if body.n > settings.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {settings.max_n}.", param="n")
        return n

    def check_context(prompt_ids: list[int], new_tokens: int) -> None:
        if len(prompt_ids) + new_tokens > block_size:
            raise APIError(400, f"This model's maximum context length is {block_size} tokens, but the prompt has "
                                f"{len(prompt_ids)} tokens and max_tokens asks for {new_tokens} more; shorten the "
                                f"prompt or lower max_tokens.", param="max_tokens", code="context_length_exceeded")

    def sampling_of(body: SamplingFields, group: int) -> Sampling:
        return Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, seed=body.seed,
                        group=group if body.seed is not None else 0)

    def stops_of(body: SamplingFields) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop may hold at most 4 strings.", param="stop")
        return stop

    def start(prompts: list[list[int]], body: SamplingFields, new_tokens: int, stop: list[str],
              logprobs: int | None) -> tuple[asyncio.Queue, list[Sequence]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sampling = sampling_of(body, engine.new_group())
        sequences = [Sequence(ids, new_tokens, sampling, stop, index, events, loop, logprobs)
                     for index, ids in enumerate(p for p in prompts for _ in range(body.n))]
        if new_tokens > 0:
            try:
                engine.submit(sequences)
            except QueueFull as e:
                raise APIError(503, f"The server is busy ({e}); retry shortly.", "server_busy",
                               headers={"Retry-After": "1"}) from None
        return events, sequences

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def collect(events: asyncio.Queue, count: int) -> list[dict]:
        """Wait for every sequence: text, tokens, logprobs and finish reason of each."""
        results = [{"text": "", "tokens": [], "logprobs": [], "top": [], "finish_reason": None, "count": 0}
                   for _ in range(count)]
        remaining = count
        while remaining:
            index, kind, *rest = await events.get()
            r = results[index]
            if kind == "token":
                text, token, lp, top = rest
                r["text"] += text
                if token is not None:
                    r["tokens"].append(token)
                    r["logprobs"].append(lp)
                    r["top"].append(top or [])
            elif kind == "done":
                r["finish_reason"], r["count"] = rest
                remaining -= 1
            else:
                raise APIError(500, rest[0], "server_error")
        return results

    def piece(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    def logprob_block(tokens: list[int], logprobs: list, tops: list, offset: int) -> dict:
        text_offset, position = [], offset
        for t in tokens:
            text_offset.append(position)
            position += len(piece(t))
        return {"tokens": [piece(t) for t in tokens], "token_logprobs": logprobs,
                "top_logprobs": [({piece(i): v for i, v in top} if top else None) for top in tops],
                "text_offset": text_offset}

    async def guarded(stream: AsyncIterator[str], sequences: list[Sequence]) -> AsyncIterator[str]:
        try:
            async for chunk in stream:
                yield chunk
        finally:  # the client went away (or we finished): stop generating for it
            for s in sequences:
                s.cancelled = True

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # ---- /v1/completions ----

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        raw = body.prompt
        if isinstance(raw, str):
            texts: list[str | list[int]] = [raw]
        elif raw and isinstance(raw[0], int):
            texts = [raw]  # one prompt given as token ids
        else:
            texts = list(raw) or [""]
        prompts: list[list[int]] = []
        for p in texts:
            if isinstance(p, list):
                if any(not 0 <= t < tokenizer.vocab_size for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size}).", param="prompt")
                prompts.append(list(p) or start_ids(tokenizer))
            else:
                prompts.append(tokenizer.encode(p) if p else start_ids(tokenizer))
        new_tokens = max_new(body, body.max_tokens, 16)
        for ids in prompts:
            check_context(ids, new_tokens)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported together with stream.", param="echo")
        stop = stops_of(body)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        events, sequences = start(prompts, body, new_tokens, stop, body.logprobs)
        prompt_tokens = sum(len(p) for p in prompts)

        if body.stream:
            async def stream() -> AsyncIterator[str]:
                total, remaining = 0, len(sequences)
                while remaining:
                    index, kind, *rest = await events.get()
                    if kind == "token" and rest[0]:
                        yield sse({"id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
                                   "choices": [{"index": index, "text": rest[0], "logprobs": None,
                                                "finish_reason": None}]})
                    elif kind == "done":
                        remaining -= 1
                        total += rest[1]
                        yield sse({"id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
                                   "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": rest[0]}]})
                    elif kind == "error":
                        yield sse(error_body(rest[0], "server_error"))
                        remaining = 0
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
                               "choices": [], "usage": usage(prompt_tokens * body.n, total)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(guarded(stream(), sequences), media_type="text/event-stream")

        try:
            if new_tokens > 0:
                results = await collect(events, len(sequences))
            else:
                results = [{"text": "", "tokens": [], "logprobs": [], "top": [], "finish_reason": "length", "count": 0}
                           for _ in sequences]
            echoed: dict[int, tuple] = {}
            if body.echo and body.logprobs is not None:
                for i, ids in enumerate(prompts):
                    echoed[i] = await engine.run_in_worker(
                        lambda ids=ids: prompt_logprobs(model, ids, body.logprobs or 0))
        except QueueFull as e:
            raise APIError(503, f"The server is busy ({e}); retry shortly.", "server_busy",
                           headers={"Retry-After": "1"}) from None
        finally:
            for s in sequences:
                s.cancelled = True
        choices = []
        for index, r in enumerate(results):
            p = index // body.n
            prompt_text = texts[p] if isinstance(texts[p], str) else tokenizer.decode(prompts[p],
                                                                                       skip_special_tokens=False)
            text = (prompt_text + r["text"]) if body.echo else r["text"]
            lp = None
            if body.logprobs is not None:
                tokens, logprobs, tops = r["tokens"], r["logprobs"], r["top"]
                if body.echo:
                    given, given_tops = echoed[p]
                    tokens, logprobs, tops = prompts[p] + tokens, given + logprobs, given_tops + tops
                lp = logprob_block(tokens, logprobs, tops, 0)
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": r["finish_reason"]})
        return {"id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
                "choices": choices, "usage": usage(prompt_tokens * body.n, sum(r["count"] for r in results))}

    # ---- /v1/chat/completions ----

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = chat_prompt(chat_template, messages)
        except Exception as e:  # a template error is the request's (or the model's) problem, not a crash
            raise APIError(400, f"The chat template could not format these messages ({e}).",
                           param="messages") from None
        ids = tokenizer.encode(prompt)
        new_tokens = max_new(body, body.max_completion_tokens or body.max_tokens,
                             max(1, min(512, block_size - len(ids))))
        check_context(ids, new_tokens)
        stop = stops_of(body) + chat_stop_strings(chat_template)
        top = body.top_logprobs or 0
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        events, sequences = start([ids], body, new_tokens, stop, top if body.logprobs else None)

        if body.stream:
            async def stream() -> AsyncIterator[str]:
                base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name}
                for s in sequences:
                    yield sse({**base, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                total, remaining = 0, len(sequences)
                while remaining:
                    index, kind, *rest = await events.get()
                    if kind == "token" and rest[0]:
                        yield sse({**base, "choices": [{"index": index, "delta": {"content": rest[0]},
                                                        "logprobs": None, "finish_reason": None}]})
                    elif kind == "done":
                        remaining -= 1
                        total += rest[1]
                        yield sse({**base, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                        "finish_reason": rest[0]}]})
                    elif kind == "error":
                        yield sse(error_body(rest[0], "server_error"))
                        remaining = 0
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(len(ids) * body.n, total)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(guarded(stream(), sequences), media_type="text/event-stream")

        try:
            results = await collect(events, len(sequences)) if new_tokens > 0 else \
                [{"text": "", "tokens": [], "logprobs": [], "top": [], "finish_reason": "length", "count": 0}]
        finally:
            for s in sequences:
                s.cancelled = True
        choices = []
        for index, r in enumerate(results):
            lp = None
            if body.logprobs:
                lp = {"content": [
                    {"token": piece(t), "logprob": v, "bytes": list(piece(t).encode("utf-8")),
                     "top_logprobs": [{"token": piece(i), "logprob": x, "bytes": list(piece(i).encode("utf-8"))}
                                      for i, x in top_list]}
                    for t, v, top_list in zip(r["tokens"], r["logprobs"], r["top"], strict=True)]}
            choices.append({"index": index, "message": {"role": "assistant", "content": r["text"]},
                            "logprobs": lp, "finish_reason": r["finish_reason"]})
        return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
                "choices": choices, "usage": usage(len(ids) * body.n, sum(r["count"] for r in results))}

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", dtype: str = "float32", quantize: str | None = None, max_batch: int = 8,
          max_queue: int = 64, max_tokens_cap: int = 2048, log_level: str = "info",
          adapter: str | None = None) -> None:
    """Load `checkpoint` (with a LoRA `adapter` merged in, if given) and serve it until interrupted."""
    from pathlib import Path

    import uvicorn

    from lmforge.chat import chat_template_of
    from lmforge.inference import load_for_inference

    model, tokenizer = load_for_inference(checkpoint, device, dtype, quantize, adapter)
    settings = ServerSettings(model_name=Path(checkpoint).resolve().name, api_key=api_key, max_batch=max_batch,
                              max_queue=max_queue, max_tokens_cap=max_tokens_cap)
    app = create_app(model, tokenizer, settings, chat_template_of(checkpoint, adapter))
    print(f"Serving {settings.model_name} on http://{host}:{port} (OpenAI API under /v1, chat page at /).")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
