"""`lmforge serve` on models that read text and do not write it:

    an encoder (BERT, DistilBERT, RoBERTa, lmforge's own masked-LM encoder)
        POST /v1/embeddings   OpenAI's route: each input's hidden states, mean-pooled over its tokens
                              and normalised to length 1 (the usual sentence embedding of an encoder)
    a text classifier (lmforge's own, or a Hugging Face ...ForSequenceClassification)
        POST /v1/classify     {"input": text or texts} -> each text's label and the probability of every label

Both answer GET /health and GET /v1/models, and share the generative server's limits, API key, Host
check and error shapes (serving/server.py). Requests are small and computed at once (no queue): the
work of one request is one forward pass of its texts.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

from lmforge.serving.protocol import APIError
from lmforge.serving.server import (
    ERROR_RESPONSES,
    BodyLimit,
    ServerSettings,
    _add_error_handlers,
    _add_limits_and_auth,
)

MAX_INPUTS = 2048  # OpenAI's limit of inputs in one embeddings request


class EmbeddingRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ClassifyRequest(BaseModel):
    input: str | list[str]
    model: str | None = None


def _texts_or_ids(given, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each input (texts framed by the tokenizer's special tokens, as the encoder was
    trained; token ids as given), or an APIError naming what is wrong."""
    if isinstance(given, str):
        given = [given]
    if not given:
        raise APIError(400, "input must not be empty.", param="input")
    if len(given) > MAX_INPUTS:
        raise APIError(
            400, f"input holds {len(given)} items; at most {MAX_INPUTS} are allowed.", param="input"
        )
    if all(isinstance(item, int) for item in given):
        given = [given]
    if all(isinstance(item, str) for item in given):
        if any(not text for text in given):
            raise APIError(400, "input must not hold an empty string.", param="input")
        return tokenizer.encode_framed(given, max_length)
    vocab = tokenizer.vocab_size
    for ids in given:
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise APIError(
                400, f"every token id must be in 0..{vocab - 1}, and no list empty.", param="input"
            )
        if len(ids) > max_length:
            raise APIError(400, f"an input of {len(ids)} tokens is longer than the model reads ({max_length}).",
                           param="input")  # fmt: skip
    return given


@torch.inference_mode()
def embed(model, rows: list[list[int]]) -> torch.Tensor:
    """Mean-pooled, unit-length embeddings (N, width) of the token-id rows (the classifiers' padding
    and mean pooling, classification/model.py)."""
    from lmforge.classification.inference import pad_right
    from lmforge.classification.model import pool

    ids, lengths = pad_right(rows, next(model.parameters()).device)
    pooled = pool(model.features(ids, lengths).float(), lengths, "mean")
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def _base_app(settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_limits_and_auth(app, settings)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "lmforge"}
        return {"object": "list", "data": [card]}

    return app


def create_embeddings_app(model, tokenizer, settings: ServerSettings) -> FastAPI:
    """The embeddings server of an encoder."""
    app = _base_app(settings)
    longest = model.block_size

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES)
    def embeddings(request: EmbeddingRequest) -> dict:
        """OpenAI's embeddings: one mean-pooled, normalised vector per input (`dimensions`: its first
        that many numbers, normalised again)."""
        rows = _texts_or_ids(request.input, tokenizer, longest)
        vectors = embed(model, rows)
        if request.dimensions is not None:
            if request.dimensions > vectors.shape[1]:
                raise APIError(400, f"dimensions must be at most {vectors.shape[1]}, the model's width.",
                               param="dimensions")  # fmt: skip
            vectors = torch.nn.functional.normalize(vectors[:, : request.dimensions], dim=-1)
        data = []
        for index, vector in enumerate(vectors.tolist()):
            if request.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(len(r) for r in rows)
        return {"object": "list", "data": data, "model": settings.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    return app


def create_classifier_app(model, tokenizer, labels: list[str], settings: ServerSettings) -> FastAPI:
    """The classification server of a text classifier."""
    from lmforge.classification.inference import predict

    app = _base_app(settings)

    @app.post("/v1/classify", responses=ERROR_RESPONSES)
    def classify(request: ClassifyRequest) -> dict:
        """Each text's most likely label and the probability of every label."""
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or any(not t.strip() for t in texts) or len(texts) > MAX_INPUTS:
            raise APIError(400, f"input must hold 1 to {MAX_INPUTS} non-empty texts.", param="input")
        probabilities = predict(model, tokenizer, texts).tolist()
        data = []
        for index, row in enumerate(probabilities):
            best = max(range(len(labels)), key=row.__getitem__)
            data.append({"index": index, "label": labels[best],
                         "probabilities": {label: round(p, 6) for label, p in zip(labels, row, strict=True)}})  # fmt: skip
        return {"object": "list", "data": data, "model": settings.model_name}

    return app
