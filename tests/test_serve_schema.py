"""schemathesis against the server's own OpenAPI document: generated requests (valid and
invalid) on every operation, a fixed number each; no answer may be a 5xx, and every status
code must be one the document declares."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from lmforge.chat import chat_template_of
from lmforge.checkpoint import load_checkpoint
from lmforge.serving.server import ServerSettings, create_app
from lmforge.training.trainer import train

from .conftest import SHAKESPEARE, tiny_config


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("schema")
    (folder / "text.txt").write_text(SHAKESPEARE.read_text("utf-8")[:20000], encoding="utf-8")
    train(tiny_config(folder / "run", folder / "text.txt", **{"train.max_iters": 5, "model.block_size": 64}),
          log=lambda _: None)  # fmt: skip
    model, tokenizer, _ = load_checkpoint(folder / "run")
    # A small token cap keeps each generated request quick.
    settings = ServerSettings(model_name="tiny", max_tokens_cap=4, max_n=2, allowed_hosts=("testserver",))
    return create_app(model, tokenizer, settings,
                      chat_template_of(folder / "run"))  # fmt: skip


def test_no_server_errors_and_only_declared_status_codes(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance])

        check()


def test_every_reference_in_the_openapi_document_resolves(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        document = client.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(document))
    assert "#/components/schemas/ErrorResponse" in found and "#/components/schemas/ErrorDetail" in found
    for ref in found:
        target = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]


def test_the_openapi_document_states_the_token_id_range_and_the_message_rules(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
        vocab = client.post("/tokenize", json={"prompt": "a"}).json()
    schemas = document["components"]["schemas"]

    def integers(node):
        if isinstance(node, dict):
            yield from ([node] if node.get("type") == "integer" else [])
            for value in node.values():
                yield from integers(value)
        elif isinstance(node, list):
            for value in node:
                yield from integers(value)

    bounds = [
        (n["minimum"], n["maximum"]) for n in integers(schemas["CompletionRequest"]["properties"]["prompt"])
    ]
    bounds += [
        (n["minimum"], n["maximum"]) for n in integers(schemas["DetokenizeRequest"]["properties"]["tokens"])
    ]
    size = app.state.engine.tokenizer.vocab_size
    assert len(bounds) == 3 and set(bounds) == {(0, size - 1)} and vocab["tokens"]
    message = schemas["ChatMessage"]["properties"]
    assert "except in an assistant message that makes tool_calls" in message["content"]["description"]
    assert "id of the call" in message["tool_call_id"]["description"]
