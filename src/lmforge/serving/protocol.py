"""The OpenAI wire format: request models, errors and response bodies.

The sampling fields of the requests are made from `GenerationConfig`, the one definition
of every generation setting (names, defaults, ranges), so the server accepts exactly
what `lmforge generate` does, under the same names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from lmforge.generation import GenerationConfig, generation_settings


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every error looks like (OpenAI's shape)."""

    error: ErrorDetail


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestBase(BaseModel):
    """The fields every generation request has besides the sampling settings."""

    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logit_bias, ...) are accepted

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None

    def generation_config(self, max_new_tokens: int, stop: list[str]) -> GenerationConfig:
        settings = {name: getattr(self, name) for name, *_, api in generation_settings() if api}
        return GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop), **settings)


def _sampling_fields() -> dict[str, Any]:
    return {
        name: (kind, Field(default=default, description=help, **bounds))
        for name, kind, default, help, bounds, api in generation_settings()
        if api
    }


# temperature, top_p, top_k, min_p, penalties and seed, as GenerationConfig defines them
SamplingFields = create_model("SamplingFields", __base__=RequestBase, **_sampling_fields())


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ContentPart(BaseModel):
    """One part of a message's content; text parts are used, others (images, audio) ignored."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Named so that they are refused out loud rather than ignored: this server has no tool calling and
    # no constrained decoding yet.
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for a feature this request needs that the server does not have."""
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            return ("response_format", f"response_format {kind!r} needs constrained decoding, which this server "
                    f"does not do yet; leave response_format out (or use type text) and ask for JSON in the prompt.")  # fmt: skip
        if self.tools and self.tool_choice != "none":
            return ("tools", "This server does not do tool calling yet; send the request without tools "
                    "(or with tool_choice none).")  # fmt: skip
        return None


class AttentionRequest(BaseModel):
    """A conversation whose last message is the assistant reply to look into."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=2)
    layer: int | None = Field(default=None, ge=0, description="one layer (default: the mean over layers)")


class RenderRequest(BaseModel):
    text: str


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------


@dataclass
class Choice:
    """One finished choice, as the collecting path gathers it from the engine's events."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class ResponseShape:
    """How one endpoint wraps choices: `text_completion` or `chat.completion`."""

    object: str  # "text_completion" or "chat.completion"
    id: str
    created: int
    model: str

    @property
    def chat(self) -> bool:
        return self.object == "chat.completion"

    def envelope(self, choices: list[dict], streaming: bool) -> dict:
        kind = self.object + (".chunk" if streaming and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def opening_chunk(self, index: int) -> dict | None:
        """Chat streams open each choice with the assistant's role."""
        if not self.chat:
            return None
        return self.envelope(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            True,
        )

    def chunk(self, index: int, text: str, finish_reason: str | None = None) -> dict:
        if self.chat:
            delta = {"content": text} if finish_reason is None else {}
            return self.envelope(
                [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], True
            )
        return self.envelope(
            [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}], True
        )

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self.envelope([], True), "usage": usage(prompt_tokens, completion_tokens)}
