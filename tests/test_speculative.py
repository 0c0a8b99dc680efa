"""Speculative decoding (speculative.py): prompt-lookup and draft-model drafts checked in one step of
the native decoder (a chain of tokens of one sequence) or the forward pass; greedy text identical to
plain decoding, sampled tokens distributed as plain sampling's; the CLI and the server use it."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from lmforge.chat import chat_template_of
from lmforge.inference.generation import GenerationConfig, generate, stream
from lmforge.inference.loading import load_for_inference
from lmforge.inference.native.decoding import NativeDecoder, chain_logits, step_logits
from lmforge.inference.speculative import DraftSchedule, PromptLookup, SpeculationStats, verify
from lmforge.serving.server import ServerSettings, create_app
from lmforge.training.trainer import train
from tests.test_native_decoding import VARIANTS, checkpoint, int8_model
from tests.test_serve import RunningServer

from .conftest import SHAKESPEARE, tiny_config


def test_prompt_lookup_drafts_what_followed_the_latest_match_of_the_last_tokens():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    #        0  1  2  3  4  5  6  7  8  9
    ids = [7, 8, 9, 1, 7, 8, 4, 5, 6, 7, 8]
    assert lookup.propose(ids, 3) == [4, 5, 6]  # "7 8" last seen at 4..5, then 4 5 6
    assert lookup.propose(ids, 1) == [4]
    assert lookup.propose([1, 2, 3, 4], 3) == []  # no earlier "3 4"
    assert lookup.propose([5, 6, 5, 6], 5) == [5, 6]  # up to the end of the text
    assert PromptLookup(min_ngram=1).propose([1, 2, 3, 1], 2) == [2, 3]


def test_the_draft_length_is_the_one_that_yields_most_per_step_at_this_acceptance():
    """Cheap checks and drafts that are kept: long drafts. Checks that cost as much as their tokens, or
    drafts that are refused: none, with a one-token probe every 16 steps."""
    cheap = [1.0 + 0.1 * k for k in range(9)]
    schedule = DraftSchedule(8, cheap)
    for _ in range(5):
        schedule.update(8, 8)  # every drafted token kept
    assert schedule.acceptance > 0.95 and schedule.next(room=100) == 8 and schedule.next(room=3) == 3
    for _ in range(60):
        schedule.update(4, 0)  # refused at once, again and again
    assert schedule.acceptance < 0.1
    drafts = [schedule.next(room=100) for _ in range(32)]
    assert drafts.count(0) == 30 and drafts[15] == drafts[31] == 1  # probes
    costly = DraftSchedule(8, [1.0 + k for k in range(9)])  # a check costs its tokens: never worth it
    for _ in range(5):
        costly.update(8, 8)
    assert costly.next(room=100) == 0
    middle = DraftSchedule(8, [1.0, 1.1, 1.3, 1.6, 1.8, 2.2, 2.5, 2.8, 3.0])  # int8 on a Zen 3 (about)
    for _ in range(10):
        middle.update(3, 2)  # two of three kept: a = 2/3
    assert 1 <= middle.next(room=100) <= 3


def test_draft_costs_are_timed_once_per_shape_and_interpolated_between_timed_lengths(tmp_path, monkeypatch):
    from lmforge.inference import timing_cache
    from lmforge.inference.speculative import TIMED_DRAFTS, check_costs

    model, _ = load_for_inference(checkpoint(tmp_path, **VARIANTS["llama-like"]))
    costs = check_costs(model, 10)
    assert len(costs) == 11 and costs[0] == 1.0 and all(c > 0 for c in costs)
    with timing_cache.lock:
        keys = sorted(k for k in timing_cache.load() if k.startswith("draft-check"))
    assert len(keys) == 1 + len([k for k in TIMED_DRAFTS if k <= 12])  # k = 0 … 12 (12: the line to 10)
    assert check_costs(model, 10) == costs  # the second time from the cache
    # Between timed lengths, a straight line: checks timed at 2 + k ms give (2 + k) / 2 steps, k = 5 too.
    timed = []

    def remembered(key, seconds):
        timed.append(key)
        return 0.002 + 0.001 * int(key.rsplit("=", 1)[1])

    monkeypatch.setattr(timing_cache, "remembered", remembered)
    assert check_costs(model, 10) == pytest.approx([(2 + k) / 2 for k in range(11)])
    assert not any(key.endswith("k=5") for key in timed) and any(key.endswith("k=6") for key in timed)


@pytest.mark.parametrize("variant", ["gpt2-like", "llama-like"])
@torch.inference_mode()
def test_a_native_chain_step_equals_one_token_steps(variant):
    """The check of a draft: consecutive tokens of one sequence in one native call give each place
    the logits, keys and values of one native step at a time (the same products; a product over several
    rows may sum in another order, so equal to float rounding)."""
    model = int8_model(**VARIANTS[variant])
    model.native_decoder = NativeDecoder(model)
    prompt = torch.tensor([[5, 9, 12, 40, 2, 33]])
    chained, stepped = model.new_cache(1, 16), model.new_cache(1, 16)
    for cache in (chained, stepped):
        model(prompt, cache=cache)
    tokens = [7, 50, 3, 3, 21]
    got = chain_logits(model, tokens, 6, chained)
    expected = torch.cat([step_logits(model, torch.tensor([t]), torch.tensor([6 + i]), stepped)
                          for i, t in enumerate(tokens)])  # fmt: skip
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert chained.length == stepped.length == 11
    for mine, theirs in ((chained.k, stepped.k), (chained.v, stepped.v)):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    chained.truncate(8)  # refused drafts are forgotten: the next step writes over them
    assert chained.length == 8 and not chained.valid[0, 8:].any()
    model.native_decoder = None  # the forward pass: the same logits within float tolerance
    reference = model.new_cache(1, 16)
    model(prompt, cache=reference)
    assert torch.allclose(chain_logits(model, tokens, 6, reference), expected, atol=1e-4)


def test_verify_keeps_the_models_distribution():
    """The rejection rule with a draft sure of its guess: a token is `drafted` with probability p(d),
    else drawn from p without d; over many draws every token comes with the model's probability."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    cfg = GenerationConfig(temperature=1.0)
    probs = logits.softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    n = 20000
    for drafted in (0, 3):
        counts = torch.zeros(5)
        kept = 0
        for _ in range(n):
            token, same = verify(logits, drafted, cfg, generator)
            counts[token] += 1
            kept += same
            assert same == (token == drafted)
        assert torch.allclose(counts / n, probs, atol=0.012), (counts / n, probs)
        assert abs(kept / n - float(probs[drafted])) < 0.012
    greedy = GenerationConfig(temperature=0)
    assert verify(logits, 0, greedy, None) == (0, True) and verify(logits, 2, greedy, None) == (0, False)


@pytest.fixture
def cheap_checks(monkeypatch):
    """Checks as cheap as on a large model (a tiny model's check of k tokens costs nearly k steps, so
    its schedule would rarely draft): the tests of exactness need drafts."""
    import lmforge.inference.speculative as speculative
    import lmforge.serving.engine as engine

    def cheap(model, drafter, most):
        return [1.0 + 0.01 * k for k in range(most + 1)]

    monkeypatch.setattr(speculative, "draft_costs", cheap)
    monkeypatch.setattr(engine, "draft_costs", cheap)


@pytest.mark.filterwarnings("ignore:--quantize int8 measures")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_speculative_text_is_plain_decodings_text(tmp_path, quantize, cheap_checks):
    model, tokenizer = load_for_inference(checkpoint(tmp_path, **VARIANTS["llama-like"]), quantize=quantize)
    assert model.native_decoder is not None
    prompts = ["abcabc", "hello, hel"]  # (room for the prompt, the new tokens and a draft in 24 tokens)
    for settings in ({}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 4}):
        plain = GenerationConfig(max_new_tokens=8, temperature=0, stop_at_eot=False, num_assistant_tokens=2,
                                 **settings)  # fmt: skip
        expected = generate(model, tokenizer, prompts, plain)
        stats = SpeculationStats()
        lookup = GenerationConfig(**{**plain.__dict__, "prompt_lookup_num_tokens": 4})
        assert generate(model, tokenizer, prompts, lookup, stats=stats) == expected
        assert "".join(stream(model, tokenizer, prompts[1], lookup)) == expected[1]
        assert stats.drafted > 0
        itself = SpeculationStats()  # the model as its own draft: without penalties (which a draft does
        assert generate(model, tokenizer, prompts, plain, draft=model, stats=itself) == expected  # not apply)
        assert itself.drafted > 0 and (itself.accepted == itself.drafted) == (not settings)  # all is kept
    other, _ = load_for_inference(checkpoint(tmp_path / "other", **VARIANTS["gpt2-like"]), quantize=quantize)
    greedy = GenerationConfig(max_new_tokens=30, temperature=0)  # past the 24-token context: plain decoding
    assert generate(model, tokenizer, prompts, greedy, draft=other) == generate(
        model, tokenizer, prompts, greedy
    )


def test_the_prompt_is_read_whole_as_plain_decoding_reads_it(tmp_path, cheap_checks, monkeypatch):
    """The forward pass reads the whole prompt (its last token too), as plain decoding does, and checks
    read a draft after it: a prompt's last token read by the native step instead differs
    in the 6th digit, enough to flip a near tie (SmolLM2 int8 re-writing code: 'tuple' against 'list',
    logits 1.6e-5 apart) and make speculative greedy text differ from plain greedy text."""
    import lmforge.inference.speculative as speculative

    model, tokenizer = load_for_inference(checkpoint(tmp_path, **VARIANTS["llama-like"]))
    checks = []
    real = speculative.check_draft
    monkeypatch.setattr(speculative, "check_draft", lambda m, c, token, position, draft: checks.append(
        (token, position, c.length)) or real(m, c, token, position, draft))  # fmt: skip
    prompt = tokenizer.encode("abcabc")
    cfg = GenerationConfig(max_new_tokens=6, temperature=0, stop_at_eot=False, prompt_lookup_num_tokens=3)
    stats = SpeculationStats()
    generate(model, tokenizer, "abcabc", cfg, stats=stats)
    # the prompt whole in the cache, then the prompt's draft ('abc' after 'bc') read after it
    assert checks[0] == (tokenizer.encode("a")[0], len(prompt), len(prompt)) and stats.drafted > 0


def test_sampled_speculative_text_is_reproducible_with_a_seed(tmp_path, cheap_checks):
    model, tokenizer = load_for_inference(checkpoint(tmp_path))
    cfg = GenerationConfig(
        max_new_tokens=15, temperature=1.0, seed=4, prompt_lookup_num_tokens=3, stop_at_eot=False
    )
    first = generate(model, tokenizer, "abcabcabc", cfg)
    assert generate(model, tokenizer, "abcabcabc", cfg) == first and len(first[0]) > 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speculative")
    data = folder / "excerpt.txt"
    data.write_text(SHAKESPEARE.read_text("utf-8")[:30000], encoding="utf-8")
    train(
        tiny_config(folder / "run", data, **{"train.max_iters": 40, "model.block_size": 128}),
        log=lambda _: None,
    )
    return folder / "run"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_with_a_draft_model_prints_plain_greedy_text_and_what_was_kept(trained, tmp_path):
    common = ["generate", str(trained), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40"]
    plain = lmforge(*common)
    drafted = lmforge(*common, "--draft", str(trained))
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    assert "lmforge: note: speculative decoding" in drafted.stderr and "speculative" not in plain.stderr
    looked_up = lmforge(*common, "--prompt-lookup-num-tokens", "5")
    assert looked_up.stdout == plain.stdout
    other = tmp_path / "other"
    train(tiny_config(other, SHAKESPEARE, **{"train.max_iters": 1, "data.tokenizer": "bpe", "data.vocab_size": 300}),
          log=lambda _: None)  # fmt: skip
    refused = lmforge(*common, "--draft", str(other))
    assert refused.returncode == 2 and "does not share the model's tokenizer" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_server_speculates_for_a_lone_request_and_reports_what_it_kept(trained, cheap_checks):
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(trained)
    settings = ServerSettings(model_name="tiny", max_tokens_cap=60)
    server = RunningServer(create_app(model, tokenizer, settings, chat_template_of(trained)))
    try:
        body = {"model": "tiny", "prompt": "ROMEO:\nThe the the", "max_tokens": 40, "temperature": 0}
        plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        speculative = httpx.post(server.url + "/v1/completions", json={**body, "prompt_lookup_num_tokens": 5},
                                 timeout=60).json()  # fmt: skip
        assert speculative["choices"][0]["text"] == plain["choices"][0]["text"]
        assert "completion_tokens_details" not in plain["usage"]
        details = speculative["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
        assert speculative["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        accepted = [
            line for line in metrics.splitlines() if line.startswith("lmforge_draft_tokens_accepted_total")
        ]
        assert float(accepted[0].split()[-1]) == details["accepted_prediction_tokens"]
        chunks = []  # streamed, with its usage: the same text and counts
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            **body, "prompt_lookup_num_tokens": 5, "stream": True, "stream_options": {"include_usage": True}
        }) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["choices"][0]["text"]
        assert chunks[-1]["usage"]["completion_tokens_details"] == details
    finally:
        server.stop()


def test_the_pipeline_takes_prompt_lookup_and_an_assistant_model(tmp_path, cheap_checks, monkeypatch):
    """transformers' names in lmforge's pipeline: `prompt_lookup_num_tokens=` and `assistant_model=`
    decode speculatively, with plain greedy decoding's text."""
    import lmforge
    import lmforge.inference.speculative as speculative

    drafters = []
    real = speculative.speculative_ids
    monkeypatch.setattr(
        speculative, "speculative_ids", lambda *a, **k: drafters.append(type(a[3]).__name__) or real(*a, **k)
    )

    pipe = lmforge.pipeline("text-generation", model=checkpoint(tmp_path, **VARIANTS["llama-like"]))
    plain = pipe("abcabc", max_new_tokens=8, do_sample=False, return_full_text=False)
    looked_up = pipe(
        "abcabc", max_new_tokens=8, do_sample=False, return_full_text=False, prompt_lookup_num_tokens=3
    )
    assisted = pipe("abcabc", max_new_tokens=8, do_sample=False, return_full_text=False, num_assistant_tokens=2,
                    assistant_model=pipe.model)  # fmt: skip
    assert looked_up == assisted == plain and len(plain[0]["generated_text"]) > 0
    assert drafters == ["PromptLookup", "DraftModel"]  # the plain call decoded without a drafter
