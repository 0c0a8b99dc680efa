"""Structured output and tool calling through the chat endpoint, driven by the official `openai` client:
response_format json_object / json_schema with constrained decoding (llguidance), tools with
tool_choice auto / required / a named function, and the full message schema (assistant tool_calls with
no content, tool results). On a tiny model (constraints hold whatever the model) and on SmolLM2."""

from __future__ import annotations

import json

import openai
import pytest

from lmforge.chat import chat_prompt, chat_template_of
from lmforge.checkpoint import load_checkpoint, open_checkpoint
from lmforge.inference.structured import GrammarConstraint, json_schema_grammar, lark_grammar
from lmforge.serving.server import ServerSettings, create_app
from lmforge.serving.tools import messages_for_template, read_tool_calls, template_takes_tools, tool_call_lark
from lmforge.training.trainer import train

from .conftest import SHAKESPEARE, tiny_config
from .test_real_models import smollm2  # noqa: F401  (fixture)
from .test_serve import RunningServer, checkpoint, served  # noqa: F401  (fixtures)

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "grade": {"enum": ["low", "high"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "grade", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}  # fmt: skip


def conforms(value, schema) -> bool:
    """Enough of JSON-schema validation for SCHEMA (the test must not trust the library it tests)."""
    props = schema["properties"]
    return (isinstance(value, dict) and set(value) == set(props) and isinstance(value["ok"], bool)
            and value["grade"] in ("low", "high") and type(value["n"]) is int and 0 <= value["n"] <= 9)  # fmt: skip


@pytest.fixture(scope="module")
def served_bpe(tmp_path_factory):
    """A tiny byte-level BPE model that has seen only Shakespeare: it knows no JSON."""
    folder = tmp_path_factory.mktemp("bpe")
    data = folder / "excerpt.txt"
    data.write_text(SHAKESPEARE.read_text("utf-8")[:30000], encoding="utf-8")
    train(tiny_config(folder / "run", data, **{"train.max_iters": 10, "model.block_size": 1024,
                                               "data.tokenizer": "bpe", "data.vocab_size": 400}), log=lambda _: None)  # fmt: skip
    model, tokenizer, _ = load_checkpoint(folder / "run")
    server = RunningServer(create_app(model, tokenizer, ServerSettings(model_name="tiny"),
                                      chat_template_of(folder / "run")))  # fmt: skip
    server.tokenizer = tokenizer
    yield server
    server.stop()


def test_a_random_model_can_only_write_what_the_schema_allows(served_bpe):
    """The tiny model knows no JSON at all; constrained, every sample is a valid instance and ends."""
    client = served_bpe.client()
    messages = [{"role": "user", "content": "Report."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=1.0,
                                               seed=seed, response_format=fmt)  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        assert conforms(json.loads(reply.choices[0].message.content), SCHEMA)
    # Unconstrained, the same model writes no JSON: the grammar, not luck, made the difference.
    free = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=1.0, seed=0
    )
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_json_object_and_streaming_deltas_form_one_object(served_bpe):
    client = served_bpe.client()
    messages = [{"role": "user", "content": "Any object."}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)  # fmt: skip
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    text = "".join(pieces)
    if reasons[-1] == "stop":  # finished within max_tokens: a whole object
        assert isinstance(json.loads(text), dict)
    else:  # cut short by max_tokens: still the start of an object
        assert reasons[-1] == "length" and text.startswith("{")


def test_required_and_named_tool_choice_give_calls_with_valid_arguments(served_bpe):
    """Tools whose arguments are all bounded (no free strings), so even a random model's call must end."""
    client = served_bpe.client()
    alarm = {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "parameters": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    "repeat": {"enum": ["daily", "once"]},
                },
                "required": ["hour", "repeat"],
                "additionalProperties": False,
            },
        },
    }
    light = {"type": "function", "function": {"name": "switch_light", "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
        "additionalProperties": False}}}  # fmt: skip
    messages = [{"role": "user", "content": "Wake me up."}]
    names = []
    for seed, choice in enumerate(
        ["required"] * 4 + [{"type": "function", "function": {"name": "set_alarm"}}] * 2
    ):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=150, temperature=1.0,
                                               seed=seed, tools=[alarm, light], tool_choice=choice)  # fmt: skip
        made = reply.choices[0]
        assert made.finish_reason == "tool_calls" and made.message.content is None
        (call,) = made.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        names.append(call.function.name)
        if call.function.name == "set_alarm":
            assert set(arguments) == {"hour", "repeat"} and 0 <= arguments["hour"] <= 23
            assert arguments["repeat"] in ("daily", "once")
        else:
            assert call.function.name == "switch_light" and isinstance(arguments["on"], bool)
    assert names[4:] == ["set_alarm", "set_alarm"]  # the named function, whatever the model would pick


def test_bad_schemas_and_tool_choices_get_clear_400s(served):  # noqa: F811
    client = served.client()
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "objekt"),
        ({"response_format": {"type": "json_schema"}}, "needs \"json_schema\""),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "'nope', which is not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        # This character vocabulary has no '{': JSON cannot even begin (a 400, never a 500).
        ({"response_format": {"type": "json_object"}}, "no token that can begin text of this format"),
        ({"tool_choice": "required"}, "tool_choice required needs tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "a named function needs tools"),
    ]  # fmt: skip
    for extra, message in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **extra)
        assert message in str(refused.value), (extra, str(refused.value))
    # A user message without content is refused by name; an assistant message with tool calls is not.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": None}], max_tokens=4
        )
    assert "a user message needs content" in str(refused.value)


def test_the_prompt_carries_tools_calls_and_results_for_any_template():
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "22 C and sunny", "tool_call_id": "call_1"},
    ]  # fmt: skip
    plain = messages_for_template(history, [WEATHER], takes_tools=False)
    assert plain[0]["role"] == "system" and '"name": "get_weather"' in plain[0]["content"]
    assert plain[2] == {"role": "assistant", "content":
                        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}  # fmt: skip
    assert plain[3] == {"role": "user", "content": "<tool_response>\n22 C and sunny\n</tool_response>"}
    native = messages_for_template(history, [WEATHER], takes_tools=True)
    assert len(native) == 3 and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    # A template that renders tools itself gets them (and the calls) as Hugging Face passes them.
    template = ("{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                "CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}\n{% endfor %}")  # fmt: skip
    assert template_takes_tools(template) and not template_takes_tools("{{ messages }}")
    assert chat_prompt(template, native, tools=[WEATHER]) == (
        "TOOLS: get_weatheruser: Weather in Paris?assistant: CALL get_weather(Paris)tool: 22 C and sunny"
    )  # (compiled as Hugging Face does: the newline right after a block tag is dropped)
    # What the model writes back is read the same way.
    content, calls = read_tool_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                     '{"city": "Lyon"}}\n</tool_call>', [WEATHER])  # fmt: skip
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Lyon"}
    assert read_tool_calls('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', [WEATHER])[1] == []


def test_a_constraint_accepts_exactly_its_language(served_bpe):
    tokenizer = served_bpe.tokenizer
    grammar = lark_grammar(tool_call_lark([WEATHER]))
    good = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome","unit":"celsius"}}\n</tool_call>'
    constraint = GrammarConstraint(tokenizer, grammar)
    for token in tokenizer.encode(good):
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.complete
    wrong = GrammarConstraint(tokenizer, json_schema_grammar(SCHEMA))
    first = tokenizer.encode("[")[0]
    assert not wrong.allowed()[first] and wrong.allowed()[tokenizer.encode("{")[0]]


@pytest.fixture(scope="module")
def served_smollm2(smollm2):  # noqa: F811
    checkpoint = open_checkpoint(smollm2)
    model, _ = checkpoint.load()
    server = RunningServer(create_app(model.eval(), checkpoint.tokenizer(), ServerSettings(model_name="smollm2"),
                                      checkpoint.chat_template))  # fmt: skip
    yield server
    server.stop()


def test_smollm2_answers_in_the_schema_and_calls_a_tool_then_uses_its_result(served_smollm2):
    client = served_smollm2.client()
    city = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"], "additionalProperties": False}  # fmt: skip
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is the capital of France? Answer with the city and country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": city}})  # fmt: skip
    answer = json.loads(reply.choices[0].message.content)
    assert (
        set(answer) == {"city", "country"}
        and "Paris" in answer["city"]
        and answer["country"].lower() == "france"
    )

    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    reply = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=60,
                                           tools=[WEATHER], tool_choice="required")  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and "Paris" in arguments["city"]
    # The conversation goes on with the call (no content) and its result, as an agent loop sends it.
    follow = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 17, "sky": "hail"}'}]  # fmt: skip
    final = client.chat.completions.create(model="smollm2", messages=follow, temperature=0, max_tokens=40,
                                           tools=[WEATHER])  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length")
    assert "17" in (final.choices[0].message.content or "")  # the tool's result reached the model
