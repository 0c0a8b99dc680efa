"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) and the web chat page.

    GET  /health               liveness and queue length (no API key needed)
    GET  /v1/models            the one model served
    POST /v1/completions       text completion; `echo` + `logprobs` score the prompt itself
    POST /v1/chat/completions  chat, formatted with the checkpoint's chat template
    GET  /                     the web chat page

Both completion endpoints stream with `"stream": true` (server-sent events ending in
`data: [DONE]`; `stream_options.include_usage` adds a usage chunk before it). Errors
are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}. The wire format
(request models, response bodies) is in protocol.py; the model runs in engine.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.chat import chat_prompt, chat_stop_strings
from lmforge.errors import UserError
from lmforge.families import family_of
from lmforge.inference.generation import start_ids
from lmforge.inference.structured import check_grammar, json_schema_grammar, lark_grammar
from lmforge.serving.engine import Done, Engine, Failed, QueueFull, Sequence, Token, prompt_logprobs
from lmforge.serving.metrics import ServingMetrics
from lmforge.serving.protocol import (
    APIError,
    AttentionRequest,
    ChatRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    NamedToolChoice,
    RenderRequest,
    RequestBase,
    ResponseShape,
    TokenizeRequest,
    error_body,
    sse,
    usage,
)
from lmforge.serving.tools import messages_for_template, read_tool_calls, template_takes_tools, tool_call_lark


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    # Host headers accepted: a server on loopback answers only to loopback names, so that a web page
    # elsewhere cannot reach it through DNS rebinding. ("*" = any, for a server bound to all addresses.)
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]", "::1")
    max_tokens_cap: int = 2048  # the most new tokens one choice may ask for
    max_n: int = 8  # the most choices one request may ask for
    max_body_bytes: int = 1 << 20
    max_batch: int = 8  # sequences decoded together (1 = no dynamic batching)
    max_queue: int = 64  # sequences waiting; beyond it requests get 503
    sampling_defaults: dict | None = (
        None  # the checkpoint's recommended sampling (the web chat starts from it)
    )
    task: str = "translation"  # an encoder–decoder's task: its decoding defaults (seq2seq.task_defaults)
    context_length: int = 0  # the longest prompt + reply served (0 = the model's context)


def create_app(model, tokenizer, settings: ServerSettings, chat_template: str) -> FastAPI:
    """The FastAPI application serving `model`; its engine starts with the app."""
    engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue)
    engine.metrics = metrics = ServingMetrics(engine)
    context = min(model.block_size, settings.context_length or model.block_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()  # on shutdown: stop the worker thread

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    _add_limits_and_auth(app, settings)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # outermost: counts every byte received
    requests = _Requests(engine, tokenizer, settings, context)
    created = int(time.time())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Requests, tokens, queue, batch occupancy, latencies and prefix-cache reuse for Prometheus."""
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and what the web chat needs to start: the context and the recommended sampling."""
        return {"status": "ok", "model": settings.model_name, "queued": engine.queued(),
                "context_length": context, "sampling": settings.sampling_defaults or {}}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lmforge",
                    "context_length": context,
                }
            ],
        }

    _add_tokenizer_routes(app, context, tokenizer, chat_template)

    @app.post("/v1/attention", responses=ERROR_RESPONSES)
    async def attention(body: AttentionRequest) -> dict:
        """What the last (assistant) message attended to: one row per reply token over every token of
        the conversation, averaged over heads (and layers unless `layer` is given). The web chat shows it."""
        return await reply_attention_of(model, tokenizer, chat_template, body)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("lmforge.serving").joinpath("chat.html").read_text("utf-8")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_page() -> str:
        """The routes of /openapi.json with their fields, an example body each, and a button that sends it
        (one page of lmforge's own: no CDN, unlike FastAPI's Swagger UI)."""
        return resources.files("lmforge.serving").joinpath("api.html").read_text("utf-8")

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest):
        metrics.requests.labels("/v1/completions").inc()
        return await requests.completion(body)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatRequest):
        metrics.requests.labels("/v1/chat/completions").inc()
        return await requests.chat(body, chat_template)

    app.openapi = lambda: _openapi(app, settings, tokenizer.vocab_size)
    return app


def _add_tokenizer_routes(app: FastAPI, context: int, tokenizer, chat_template: str) -> None:
    """The small routes around the model: tokenizer access (vLLM's shapes, which lm-evaluation-harness
    uses), Markdown rendering for the web chat, and the page's icon."""

    @app.post("/v1/render", responses=ERROR_RESPONSES)
    async def render(body: RenderRequest) -> dict:
        """A reply's Markdown as HTML for the web chat (CommonMark and tables; raw HTML in the text is
        escaped, and links to javascript:/data: are refused, so the result is safe to insert)."""
        return {"html": await asyncio.to_thread(render_markdown, valid_text(body.text, "text"))}

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> dict:
        """Token ids of a text, as the served model sees it (vLLM's shape; lm-eval probes for it)."""
        ids = await asyncio.to_thread(tokenizer.encode, valid_text(body.prompt, "prompt"))
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """What a client needs to tokenize as the server does (vLLM's shape; lm-evaluation-harness's
        remote tokenizer reads it): special tokens, the chat template, the context length."""
        end = tokenizer.end_ids[0] if tokenizer.end_ids else None
        eos = tokenizer.hf.id_to_token(end) if end is not None else None
        # The model's declared beginning-of-text token; lmforge's own models start texts from <|endoftext|>.
        start = getattr(tokenizer, "bos_id", None)
        start = tokenizer.eot_id if start is None else start
        bos = tokenizer.hf.id_to_token(start) if start is not None else None
        return {"eos_token": eos, "bos_token": bos, "pad_token": eos, "chat_template": chat_template,
                "model_max_length": context, "tokenizer_class": "lmforge"}  # fmt: skip

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> dict:
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {tokenizer.vocab_size}).", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}


# A small "lm" mark, so that browsers showing the chat page get an icon instead of a 404.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
           b'fill="#1f6feb"/><text x="16" y="22" font-size="16" text-anchor="middle" fill="#fff" '
           b'font-family="sans-serif">lm</text></svg>')  # fmt: skip
ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
ERROR_RESPONSES = {
    400: {
        "description": "Invalid request (bad JSON, a value out of range, a prompt beyond the context)",
        **ERROR,
    },
    401: {"description": "Missing or wrong API key", **ERROR},
    413: {"description": "Request body too large", **ERROR},
    503: {"description": "Queue full: retry after the Retry-After header's seconds", **ERROR},
}


def _openapi(app: FastAPI, settings: ServerSettings, vocab_size: int) -> dict:
    """The OpenAPI document as the server behaves: errors are OpenAI-shaped 400s (FastAPI would
    say 422), completions can stream as server-sent events, `n` has the server's limit and token ids
    the vocabulary's range."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))  # (ErrorDetail beside it, where its reference points)
    components["ErrorResponse"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
            ok = operation["responses"].get("200", {}).get("content")
            if ok is not None and operation.get("requestBody"):
                ok["text/event-stream"] = {"schema": {"type": "string", "description": 'with "stream": true'}}
    for model in ("CompletionRequest", "ChatRequest"):
        if model in components:
            components[model]["properties"]["n"]["maximum"] = settings.max_n
    token_ids = [components.get("CompletionRequest", {}).get("properties", {}).get("prompt"),
                 components.get("DetokenizeRequest", {}).get("properties", {}).get("tokens")]  # fmt: skip
    for node in token_ids:
        _bound_token_ids(node, vocab_size)
    app.openapi_schema = schema
    return schema


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    """Give every integer inside a (nested) schema node the range of the vocabulary's token ids."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["minimum"], node["maximum"] = 0, vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


class BodyLimit:
    """ASGI middleware: stop reading a request body once it passes `limit` bytes, whether it was
    announced with Content-Length or sent in chunks (a chunked upload is never read whole). It
    answers 413 itself and tells the application that the client went away."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received, started, refused = 0, False, False

        async def limited():
            nonlocal received, refused, started
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = True
                if not started:
                    started = True
                    text = f"The request body is larger than {self.limit} bytes."
                    await JSONResponse(error_body(text, "invalid_request_error"), 413)(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return  # the 413 has been sent: whatever the application answers is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked_send)
        except Exception as e:  # noqa: BLE001  (a bug: logged, answered in the API's shape, connection kept)
            if refused:
                return
            logging.getLogger("lmforge.serve").exception("request failed")
            if not started:
                text = f"Internal error ({type(e).__name__}); the server log has the details."
                await JSONResponse(error_body(text, "server_error"), 500)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # 404, 405, 413: in the API's shape
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, e: RecursionError) -> JSONResponse:
        return JSONResponse(
            error_body("The request body is nested too deeply.", "invalid_request_error"), 400
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON (in UTF-8)."
        else:
            message = "Invalid request: " + "; ".join(problems) + "."
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


def _add_limits_and_auth(app: FastAPI, settings: ServerSettings) -> None:
    @app.middleware("http")
    async def limits_and_auth(request: Request, call_next):
        host = request.headers.get("host", "")
        name = host if host.endswith("]") else host.rsplit(":", 1)[0]
        if "*" not in settings.allowed_hosts and name not in settings.allowed_hosts:
            return JSONResponse(error_body(f"Host {host!r} is not served here (the server answers to "
                                           f"{', '.join(settings.allowed_hosts)}; see lmforge serve --allowed-host).",
                                           "invalid_request_error"), status_code=400)  # fmt: skip
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(
                error_body(
                    f"The request body is larger than {settings.max_body_bytes} bytes.",
                    "invalid_request_error",
                ),
                status_code=413,
            )
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
                return JSONResponse(
                    error_body(
                        "Invalid or missing API key (send Authorization: Bearer KEY).",
                        "authentication_error",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                )
        return await call_next(request)


def valid_text(text: str, param: str) -> str:
    """`text`, or a 400 when it holds a lone surrogate (JSON can carry one; Unicode text cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} holds a lone surrogate (\\ud800-\\udfff), which is not text.",
                       param=param) from None  # fmt: skip
    return text


def _busy(e: QueueFull) -> APIError:
    return APIError(
        503, f"The server is busy ({e}); retry shortly.", "server_busy", headers={"Retry-After": "1"}
    )


class _Requests:
    """The two generation endpoints: check the request, submit its sequences to the engine,
    then either stream their events or collect them into one response."""

    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings, block_size: int):
        self.engine, self.tokenizer, self.settings, self.block_size = engine, tokenizer, settings, block_size
        # An encoder–decoder's prompts (and a chat's last user message) are sources to transduce.
        self.transduces = family_of(engine.model.config.arch).transduces

    # ---- checks ----

    def max_new(self, body: RequestBase, requested: int | None, default: int) -> int:
        n = default if requested is None else requested
        if n > self.settings.max_tokens_cap:
            raise APIError(
                400,
                f"max_tokens is {n}; this server allows at most {self.settings.max_tokens_cap}.",
                param="max_tokens",
            )
        if body.n > self.settings.max_n:
            raise APIError(
                400, f"n is {body.n}; this server allows at most {self.settings.max_n}.", param="n"
            )
        return n

    def check_context(self, prompt_ids: list[int], new_tokens: int) -> None:
        if len(prompt_ids) + new_tokens > self.block_size:
            raise APIError(
                400,
                f"This model's maximum context length is {self.block_size} tokens, but the prompt "
                f"has {len(prompt_ids)} tokens and max_tokens asks for {new_tokens} more; shorten "
                f"the prompt or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    @staticmethod
    def stops_of(body: RequestBase) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop may hold at most 4 strings.", param="stop")
        return stop

    def prompts_of(self, raw) -> tuple[list[str | list[int]], list[list[int]]]:
        """(Runs in a worker thread: a long prompt must not hold up the event loop.)"""
        """The prompts as given (text or token ids) and as token ids."""
        if isinstance(raw, str):
            given: list[str | list[int]] = [raw]
        elif raw and isinstance(raw[0], int):
            given = [raw]  # one prompt given as token ids
        else:
            given = list(raw) or [""]
        ids = []
        for p in given:
            if isinstance(p, list):
                if any(not 0 <= t < self.tokenizer.vocab_size for t in p):
                    raise APIError(
                        400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size}).", param="prompt"
                    )
                ids.append(list(p) or start_ids(self.tokenizer))
            else:
                ids.append(self.encode(valid_text(p, "prompt")) if p else start_ids(self.tokenizer))
        return given, ids

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids; one that cannot fit the context whatever its tokens (a megabyte of text)
        is refused before it is tokenized, which would hold the process for seconds."""
        fewest = self.tokenizer.fewest_tokens(text)
        if fewest > self.block_size:
            raise APIError(
                400,
                f"This model's maximum context length is {self.block_size} tokens, but the prompt has at "
                f"least {fewest} tokens ({len(text)} characters); shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        return self.tokenizer.encode(text)

    # ---- running ----

    def start(
        self,
        prompts: list[list[int]],
        body: RequestBase,
        new_tokens: int,
        stop: list[str],
        logprobs: int | None,
        grammar: str | None = None,
    ) -> tuple[asyncio.Queue, list[Sequence]]:
        count = len(prompts) * body.n
        if count > self.engine.max_queue:  # could never be queued: retrying would not help
            raise APIError(400, f"This request asks for {count} sequences (prompts × n); this server queues at "
                                f"most {self.engine.max_queue} at once. Send fewer prompts or a smaller n.",
                           param="n")  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        config = body.generation_config(new_tokens, stop)
        group = self.engine.new_group() if body.seed is not None else 0
        sequences = [
            Sequence(ids, config, index, events, loop, group, logprobs, grammar=grammar)
            for index, ids in enumerate(p for p in prompts for _ in range(body.n))
        ]
        if new_tokens > 0:
            try:
                self.engine.submit(sequences)
            except QueueFull as e:
                raise _busy(e) from None
        return events, sequences

    @staticmethod
    async def collect(events: asyncio.Queue, sequences: list[Sequence], new_tokens: int) -> list[Choice]:
        """The collecting path: wait for every sequence's text, tokens, logprobs and finish reason."""
        choices = [Choice() for _ in sequences]
        if new_tokens == 0:
            for c in choices:
                c.finish_reason = "length"
            return choices
        remaining = len(sequences)
        try:
            while remaining:
                event = await events.get()
                c = choices[event.index]
                if isinstance(event, Token):
                    c.text += event.text
                    if event.token_id is not None:
                        c.tokens.append(event.token_id)
                        c.logprobs.append(event.logprob)
                        c.top.append(event.top or [])
                elif isinstance(event, Done):
                    c.finish_reason, c.completion_tokens = event.finish_reason, event.completion_tokens
                    c.drafted, c.accepted = event.drafted, event.accepted
                    remaining -= 1
                else:
                    raise APIError(500, event.message, "server_error")
        finally:
            for s in sequences:
                s.cancelled = True
        return choices

    @staticmethod
    async def stream(
        events: asyncio.Queue,
        sequences: list[Sequence],
        shape: ResponseShape,
        prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The streaming path: one server-sent event per settled piece of text."""
        try:
            for s in sequences:
                opening = shape.opening_chunk(s.index)
                if opening:
                    yield sse(opening)
            total, drafted, accepted, remaining = 0, 0, 0, len(sequences)
            while remaining:
                event = await events.get()
                if isinstance(event, Token) and event.text:
                    yield sse(shape.chunk(event.index, event.text))
                elif isinstance(event, Done):
                    remaining -= 1
                    total += event.completion_tokens
                    drafted, accepted = drafted + event.drafted, accepted + event.accepted
                    yield sse(shape.chunk(event.index, "", event.finish_reason))
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error"))
                    remaining = 0
            if include_usage:
                yield sse(shape.usage_chunk(prompt_tokens, total, drafted, accepted))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): stop generating for it
            for s in sequences:
                s.cancelled = True

    def respond(self, body: RequestBase, shape: ResponseShape, events, sequences, prompt_tokens: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            self.stream(events, sequences, shape, prompt_tokens, include_usage),
            media_type="text/event-stream",
        )

    # ---- endpoints ----

    async def completion(self, body: CompletionRequest):
        if self.transduces:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not all(isinstance(p, str) for p in prompts):
                raise APIError(
                    400, "An encoder–decoder model takes text prompts, not token ids.", param="prompt"
                )
            return await self.transduced(body, [valid_text(p, "prompt") for p in prompts], "text_completion")
        given, prompts = await asyncio.to_thread(self.prompts_of, body.prompt)
        new_tokens = self.max_new(body, body.max_tokens, 16)
        # With echo, a prompt longer than the context is still scored whole (in sliding windows,
        # as lm-evaluation-harness needs), and any new tokens follow its last tokens that fit.
        generate_from = prompts
        if body.echo and new_tokens < self.block_size:
            generate_from = [ids[-(self.block_size - new_tokens) :] for ids in prompts]
        for ids in generate_from:
            self.check_context(ids, new_tokens)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported together with stream.", param="echo")
        stop = self.stops_of(body)
        shape = ResponseShape(
            "text_completion", f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.settings.model_name
        )
        events, sequences = self.start(generate_from, body, new_tokens, stop, body.logprobs)
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        if body.stream:
            return self.respond(body, shape, events, sequences, prompt_tokens)
        results = await self.collect(events, sequences, new_tokens)
        echoed: dict[int, tuple] = {}
        if body.echo and body.logprobs is not None:
            model = self.engine.model
            try:
                for i, ids in enumerate(prompts):
                    echoed[i] = await self.engine.run_in_worker(
                        lambda ids=ids: prompt_logprobs(model, ids, body.logprobs or 0)
                    )
            except QueueFull as e:
                raise _busy(e) from None
        choices = []
        for index, r in enumerate(results):
            p = index // body.n
            prompt_text = (
                given[p]
                if isinstance(given[p], str)
                else self.tokenizer.decode(prompts[p], skip_special_tokens=False)
            )
            lp = None
            if body.logprobs is not None:
                tokens, logprobs, tops = r.tokens, r.logprobs, r.top
                if body.echo:
                    given_lp, given_tops = echoed[p]
                    tokens, logprobs, tops = prompts[p] + tokens, given_lp + logprobs, given_tops + tops
                lp = self.logprob_block(tokens, logprobs, tops)
            choices.append(
                {
                    "index": index,
                    "text": (prompt_text + r.text) if body.echo else r.text,
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                }
            )
        return {
            **shape.envelope(choices, False),
            "usage": results_usage(prompt_tokens, results),
        }

    def chat_prompt_of(self, body: ChatRequest, chat_template: str, tools: list[dict]) -> str:
        messages = [m.for_template() for m in body.messages]
        for m in messages:
            valid_text(m["content"], "messages")
        takes_tools = template_takes_tools(chat_template)
        messages = messages_for_template(messages, tools, takes_tools)
        try:
            return chat_prompt(chat_template, messages, tools=tools if takes_tools and tools else None)
        except Exception as e:  # a template error is the request's (or the model's) problem, not a crash
            raise APIError(
                400, f"The chat template could not format these messages ({e}).", param="messages"
            ) from None

    def grammar_of(self, body: ChatRequest, tools: list[dict]) -> str | None:
        """The grammar the reply must follow: one tool call (tool_choice "required" or a named
        function), JSON (response_format), or none. (Runs in a worker thread: the first use builds
        the grammar library's view of the vocabulary.)"""
        param = "tool_choice"
        if not body.tools and body.tool_choice not in (None, "auto", "none"):  # (OpenAI answers 400 too)
            wanted = "required" if body.tool_choice == "required" else "a named function"
            raise APIError(400, f"tool_choice {wanted} needs tools: give the functions the model may call in "
                                f"`tools`, or leave tool_choice out.", param=param)  # fmt: skip
        try:
            if tools and body.tool_choice not in (None, "auto"):
                name = (
                    body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
                )
                if name is not None and name not in {t["function"]["name"] for t in tools}:
                    raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools.",
                                   param=param)  # fmt: skip
                grammar = lark_grammar(tool_call_lark(tools, name))
            elif body.response_format is not None and body.response_format.type != "text":
                param = "response_format"
                given = body.response_format.json_schema
                grammar = json_schema_grammar(given.json_schema if given is not None else None)
            else:
                return None
            check_grammar(self.tokenizer, grammar)
        except UserError as e:
            raise APIError(400, str(e), param=param) from None
        return grammar

    async def transduced(self, body: RequestBase, sources: list[str], kind: str):
        """An encoder–decoder model (translation, summarization): each prompt, or the chat's last user
        message, is a source; its output (beam search, 4 beams) is the reply. Streamed as one piece."""
        from lmforge.generation_config import GenerationConfig
        from lmforge.seq2seq.decoding import task_defaults, transduce

        model, tokenizer = self.engine.model, self.tokenizer
        if not sources or any(not s.strip() for s in sources):
            raise APIError(400, "Give a non-empty text to translate or summarize.", param="prompt")
        cfg = GenerationConfig(num_beams=4, max_new_tokens=min(body.max_tokens or 0, model.block_size - 1),
                               **task_defaults(self.settings.task))  # fmt: skip
        try:
            outputs = await self.engine.run_in_worker(lambda: transduce(model, tokenizer, sources, cfg))
        except QueueFull as e:
            raise _busy(e) from None
        shape = ResponseShape(kind, f"{'chatcmpl' if kind != 'text_completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                              int(time.time()), self.settings.model_name)  # fmt: skip
        choices = [{"index": i, "finish_reason": "stop", "logprobs": None,
                    **({"message": {"role": "assistant", "content": o}} if shape.chat else {"text": o})}
                   for i, o in enumerate(outputs)]  # fmt: skip
        used = usage(
            sum(len(tokenizer.of_sources.encode(s)) for s in sources),  # (the sources' own tokens)
            sum(len(tokenizer.encode(o)) for o in outputs),
        )
        if body.stream:
            return StreamingResponse(_replayed(shape, choices, body, used), media_type="text/event-stream")
        return {**shape.envelope(choices, False), "usage": used}

    async def chat(self, body: ChatRequest, chat_template: str):
        if self.transduces:
            users = [m.text() for m in body.messages if m.role == "user"]
            return await self.transduced(body, users[-1:], "chat.completion")
        tools = body.offered_tools()
        prompt = self.chat_prompt_of(body, chat_template, tools)
        grammar = await asyncio.to_thread(self.grammar_of, body, tools)
        ids = await asyncio.to_thread(self.encode, prompt)
        new_tokens = self.max_new(
            body, body.max_completion_tokens or body.max_tokens, max(1, min(512, self.block_size - len(ids)))
        )
        self.check_context(ids, new_tokens)
        stop = self.stops_of(body) + chat_stop_strings(chat_template)
        shape = ResponseShape(
            "chat.completion", f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.settings.model_name
        )
        top = body.top_logprobs or 0
        events, sequences = self.start([ids], body, new_tokens, stop, top if body.logprobs else None, grammar)
        if body.stream and not tools:
            return self.respond(body, shape, events, sequences, len(ids) * body.n)
        results = await self.collect(events, sequences, new_tokens)
        choices = [self.chat_choice(index, r, body, tools) for index, r in enumerate(results)]
        used = results_usage(len(ids) * body.n, results)
        if body.stream:  # with tools the reply is read whole (is it a call?), then sent as chunks
            return StreamingResponse(_replayed(shape, choices, body, used), media_type="text/event-stream")
        return {**shape.envelope(choices, False), "usage": used}

    def chat_choice(self, index: int, r: Choice, body: ChatRequest, tools: list[dict]) -> dict:
        message: dict = {"role": "assistant", "content": r.text}
        finish_reason = r.finish_reason
        if tools:
            content, calls = read_tool_calls(r.text, tools)
            if calls:
                message, finish_reason = (
                    {"role": "assistant", "content": content, "tool_calls": calls},
                    "tool_calls",
                )
        lp = None
        if body.logprobs:
            lp = {"content": [{"token": self.piece(t), "logprob": v, "bytes": list(self.tokenizer.token_bytes(t)),
                               "top_logprobs": [{"token": self.piece(i), "logprob": x,
                                                 "bytes": list(self.tokenizer.token_bytes(i))} for i, x in top_list]}
                              for t, v, top_list in zip(r.tokens, r.logprobs, r.top, strict=True)]}  # fmt: skip
        return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason}

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """The legacy completions format keys alternatives by their text: two tokens with the same
        text (parts of one UTF-8 character, special tokens) get distinct keys (the second its
        vocabulary entry) instead of one overwriting the other."""
        out: dict[str, float] = {}
        for token, value in top:
            key = self.piece(token)
            if key in out:
                key = self.tokenizer.hf.id_to_token(token) or key
            if key in out:
                key = f"<token {token}>"
            out[key] = value
        return out

    def logprob_block(self, tokens: list[int], logprobs: list, tops: list) -> dict:
        text_offset, position = [], 0
        for t in tokens:
            text_offset.append(position)
            position += len(self.piece(t))
        return {
            "tokens": [self.piece(t) for t in tokens],
            "token_logprobs": logprobs,
            "top_logprobs": [(self.top_dict(top) if top else None) for top in tops],
            "text_offset": text_offset,
        }


def results_usage(prompt_tokens: int, results: list[Choice]) -> dict:
    """The usage of a whole (collected) response."""
    return usage(prompt_tokens, sum(r.completion_tokens for r in results), sum(r.drafted for r in results),
                 sum(r.accepted for r in results))  # fmt: skip


async def _replayed(
    shape: ResponseShape, choices: list[dict], body: ChatRequest, used: dict
) -> AsyncIterator[str]:
    """Finished chat choices as a stream of chunks: the role, the content, the tool calls, the end."""
    for choice in choices:
        message, index = choice.get("message", {"content": choice.get("text")}), choice["index"]
        opening = shape.opening_chunk(index)
        if opening:
            yield sse(opening)
        if message["content"]:
            yield sse(shape.chunk(index, message["content"]))
        if message.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            delta = {"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
            yield sse(shape.envelope([delta], True))
        yield sse(shape.chunk(index, "", choice["finish_reason"]))
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**shape.envelope([], True), "usage": used})
    yield "data: [DONE]\n\n"


async def reply_attention_of(model, tokenizer, chat_template: str, body: AttentionRequest) -> dict:
    """The /v1/attention answer: the conversation's tokens, where the reply starts, and its rows."""
    if body.messages[-1].role != "assistant":
        raise APIError(400, "The last message must be the assistant reply to look into.", param="messages")
    messages = [m.for_template() for m in body.messages]
    for m in messages:
        valid_text(m["content"], "messages")
    try:
        prompt = chat_prompt(chat_template, messages[:-1])
    except Exception as e:
        raise APIError(400, f"The chat template could not format these messages ({e}).",
                       param="messages") from None  # fmt: skip
    start = len(await asyncio.to_thread(tokenizer.encode, prompt))
    ids = await asyncio.to_thread(tokenizer.encode, prompt + messages[-1]["content"])
    cut = max(0, len(ids) - model.block_size)  # the part of the conversation the model can see
    ids, start = ids[cut:], max(0, start - cut)
    if start >= len(ids):
        raise APIError(400, "The assistant reply is empty.", param="messages")
    from lmforge.explain import reply_attention

    try:  # (in a thread of its own: attention is recorded for that thread only, decoding goes on)
        rows = await asyncio.to_thread(reply_attention, model, ids, start, body.layer)
    except UserError as e:
        raise APIError(400, str(e), param="layer" if "layer" in str(e) else "model") from None
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return {"tokens": pieces, "reply_start": start, "truncated": cut,
            "attention": [[round(x, 5) for x in row] for row in rows]}  # fmt: skip


def render_markdown(text: str) -> str:
    """A reply as HTML: Markdown (markdown-it; raw HTML shown as text), fenced code highlighted by Pygments
    (its short class names; the page colours them). Works on a reply cut mid-way (while streaming)."""
    from markdown_it import MarkdownIt

    # A chat reply's line breaks are meant (poetry, lists of lines): "breaks" keeps them.
    options = {"html": False, "breaks": True, "highlight": highlight_code}
    return MarkdownIt("commonmark", options).enable("table").render(text)


def highlight_code(code: str, language: str, _attributes: str) -> str:
    """Code of a named language as Pygments' escaped, classed spans ("" leaves it to markdown-it's escaping)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    if not language:
        return ""
    try:
        lexer = get_lexer_by_name(language)
    except ClassNotFound:
        return ""
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


def _default_hosts(bind: str) -> tuple[str, ...]:
    """Loopback-bound: loopback names only (DNS-rebinding safe). Bound elsewhere: any name."""
    loopback = ("127.0.0.1", "localhost", "::1", "[::1]")
    return (*loopback, bind) if bind in loopback or bind.startswith("127.") else ("*",)
