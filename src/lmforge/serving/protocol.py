"""The OpenAI wire format: request models, errors and response bodies.

The sampling fields of the requests are made from `GenerationConfig`, the one definition
of every generation setting (names, defaults, ranges), so the server accepts exactly
what `lmforge generate` does, under the same names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from lmforge.inference.generation import GenerationConfig, generation_settings


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
    ignore_eos: bool = False  # vLLM's extension: write on past the end-of-sequence token (benchmarks)

    def generation_config(self, max_new_tokens: int, stop: list[str]) -> GenerationConfig:
        settings = {name: getattr(self, name) for name, *_, api in generation_settings() if api}
        return GenerationConfig(
            max_new_tokens=max_new_tokens, stop=tuple(stop), stop_at_eot=not self.ignore_eos, **settings
        )


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


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; a few clients send the object


class ToolCall(BaseModel):
    """A call an assistant message made (sent back in later requests of the conversation)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = Field(
        default=None,
        description="The message's text (text parts of a list are used). Required, except in an assistant "
        "message that makes tool_calls.",
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="The calls an assistant message made (sent back in later requests)."
    )
    tool_call_id: str | None = Field(
        default=None, description="In a tool message: the id of the call whose result it is."
    )

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message that makes "
                             f"tool_calls may leave it out)")  # fmt: skip
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates see it (developer is system)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ToolName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolName


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError(
                'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}'
            )
        return self


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools the model may call in this reply (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]


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
    drafted: int = 0  # speculative decoding's drafted tokens, and how many the model kept
    accepted: int = 0


def usage(prompt_tokens: int, completion_tokens: int, drafted: int = 0, accepted: int = 0) -> dict:
    """OpenAI's usage object; speculative decoding's kept and refused drafted tokens as OpenAI reports
    those of a predicted output (`completion_tokens_details`)."""
    used: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if drafted:
        used["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        }
    return used


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

    def usage_chunk(
        self, prompt_tokens: int, completion_tokens: int, drafted: int = 0, accepted: int = 0
    ) -> dict:
        return {
            **self.envelope([], True),
            "usage": usage(prompt_tokens, completion_tokens, drafted, accepted),
        }
