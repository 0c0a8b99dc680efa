import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.inference.generation import (
    GenerationConfig,
    TextTracker,
    beam_search,
    decode_steps,
    filter_logits,
    generate,
    sample,
    sequence_logprob,
    stream,
)
from lmforge.inference.loading import BlockedMatvecLinear, Int8Linear, quantize_int8, use_blocked_matvec
from lmforge.models import build_model
from lmforge.pipelines import pipeline
from lmforge.tokenizers import train_bpe_tokenizer, train_char_tokenizer

TEXT = "To be, or not to be, that is the question: ünïcödé ✓ — 日本語\n" * 20


def make_model(pos="rope", block=24, seed=0, n_embd=32, **kw):
    torch.manual_seed(seed)
    tok = train_char_tokenizer([TEXT])
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        block_size=block,
        n_layer=2,
        n_head=2,
        n_embd=n_embd,
        pos_encoding=pos,
        **kw,
    )
    return build_model(cfg).eval(), tok


def steps(model, prompts, cfg, use_cache):
    return torch.stack(list(decode_steps(model, prompts, cfg, (), use_cache=use_cache)), dim=1)


def test_compiled_decoding_gives_the_eager_tokens_and_logits():
    """`--compile`: the compiled one-token step over a static cache (grouped-query attention,
    RoPE, SwiGLU) chooses exactly the eager greedy tokens with logits within fp32 tolerance.
    Batches (where it measured slower) and runs that outgrow the context take the eager path."""
    import lmforge.inference.compiled as compiled_module
    from lmforge.inference.compiled import static_capacity

    compiled_module.compiled_steps = 0
    model, tok = make_model("rope", block=300, n_kv_head=1, activation="swiglu", norm="rmsnorm")
    prompt = [tok.encode("To be, or not to be")]
    cfg = GenerationConfig(max_new_tokens=40, temperature=0)
    seen: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    runs = {}
    for compiled in (False, True):
        model.compile_decoding = compiled
        observe = seen[compiled].append
        tokens = decode_steps(model, prompt, cfg, (), observe=lambda logits, _, keep=observe: keep(logits))
        runs[compiled] = torch.stack(list(tokens), 1)
    assert torch.equal(runs[True], runs[False])
    assert compiled_module.compiled_steps == 40  # every step after the prompt ran compiled
    assert torch.allclose(torch.stack(seen[True]), torch.stack(seen[False]), atol=1e-4)
    two = prompt + [tok.encode("Ay")]
    assert torch.equal(steps(model, two, cfg, True)[:1], runs[False])  # a batch: eager, same tokens
    assert compiled_module.compiled_steps == 40
    # Past torch.compile's limit of specialisations (here 1: a second capacity would need another),
    # decoding goes on eagerly with the same tokens instead of failing.
    long_cfg = GenerationConfig(max_new_tokens=250, temperature=0)
    model.compile_decoding = False
    eager_long = steps(model, prompt, long_cfg, True)
    model.compile_decoding = True
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(UserWarning, match="decoding eagerly"):
        assert torch.equal(steps(model, prompt, long_cfg, True), eager_long)
    assert model.compile_decoding is False and compiled_module.compiled_steps == 40
    assert static_capacity(model, 60) == 256 and static_capacity(model, 280) == 300
    assert static_capacity(model, 301) is None  # beyond the context: the eager path (sliding window)


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal"])
def test_kv_cache_greedy_equals_recomputation_beyond_the_context(pos):
    model, tok = make_model(pos, block=16)
    prompt = tok.encode("To be, or not")
    cfg = GenerationConfig(max_new_tokens=30, temperature=0)  # runs well past the 16-token context
    assert torch.equal(steps(model, [prompt], cfg, True), steps(model, [prompt], cfg, False))


def test_cached_logits_match_full_forward():
    model, tok = make_model("rope", block=32, n_kv_head=1)
    ids = torch.tensor([tok.encode("To be, or not to be, that")])
    full, _ = model(ids)
    cache = model.new_cache(1)
    prefill, _ = model(ids[:, :10], cache=cache)
    pieces = [prefill]
    for t in range(10, ids.shape[1]):
        logits, _ = model(ids[:, t : t + 1], cache=cache)
        pieces.append(logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_prompts_with_padding_equal_each_alone(pos):
    model, tok = make_model(pos, block=24)
    prompts = [tok.encode(p) for p in ("To", "To be, or not to", "that is the question")]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    together = steps(model, prompts, cfg, True)
    for row, p in enumerate(prompts):
        assert torch.equal(together[row], steps(model, [p], cfg, True)[0])


def test_filters_never_sample_outside_their_sets():
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    gen = torch.Generator().manual_seed(0)
    for kwargs, allowed in [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1, 2}),
        ({"top_p": 0.35}, {0}),
        ({"min_p": 0.3}, {0, 1, 2}),
    ]:
        probs = filter_logits(logits, **kwargs).softmax(-1).expand(4000, -1)
        drawn = set(sample(probs, gen).tolist())
        assert drawn == allowed, kwargs
    # Within the kept set the proportions follow the renormalised probabilities.
    probs = filter_logits(logits, top_k=2).softmax(-1)
    assert probs[0, :2].tolist() == pytest.approx([0.4 / 0.65, 0.25 / 0.65])


@pytest.mark.parametrize(
    "scale", [0.3, 2.0, 8.0]
)  # flat to peaked: nuclei of thousands of tokens down to a few
@pytest.mark.parametrize("top_p", [0.2, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p_in_a_large_vocabulary(scale, top_p):
    """The nucleus is searched among the top k tokens, k growing: the same set as sorting the
    whole vocabulary (float64 here, so that no sum's rounding sits on the boundary)."""
    logits = torch.randn(3, 20000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * scale
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # the mass of the tokens more likely than each
    expected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before < top_p)
    kept = filter_logits(logits, top_p=top_p).isfinite()
    assert torch.equal(kept, expected)
    assert kept.sum(-1).min() >= 1


def test_sampling_follows_the_probabilities_and_never_draws_a_zero(monkeypatch):
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(1)
    drawn = sample(probs.repeat(20000, 1), gen).view(20000, 2)
    counts = torch.bincount(drawn[:, 0], minlength=7) / 20000
    assert counts.tolist() == pytest.approx([0, 0.2, 0, 0.5, 0.3, 0, 0], abs=0.012)
    assert drawn[:, 1].eq(6).all()
    # The largest uniform draw (1 - 2**-24), where rounding could reach the total, still lands on
    # the last possible token, never on the zeros after it.
    largest = torch.tensor(1 - 2**-24)
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None: largest.expand(*shape))
    assert sample(torch.tensor([[0.3, 0.1, 0.6, 0.0, 0.0]]), None).item() == 2


def test_seeds_reproduce_and_differ():
    model, tok = make_model()
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a = generate(model, tok, "To be", cfg)
    assert a == generate(model, tok, "To be", cfg)
    others = {generate(model, tok, "To be", GenerationConfig(max_new_tokens=20, seed=s))[0] for s in range(5)}
    assert len(others) > 1


def test_penalties_change_greedy_choice():
    model, tok = make_model()
    plain = generate(model, tok, "To be", GenerationConfig(max_new_tokens=30, temperature=0))[0]
    penalised = generate(
        model, tok, "To be", GenerationConfig(max_new_tokens=30, temperature=0, frequency_penalty=5.0)
    )[0]
    assert len(set(penalised)) >= len(set(plain))
    assert penalised != plain or len(set(plain)) == len(plain)


def test_beam_search_with_one_beam_is_greedy_and_more_beams_score_higher():
    model, tok = make_model("rope", block=48, seed=3)
    prompt = tok.encode("To be, or")
    greedy_cfg = GenerationConfig(max_new_tokens=12, temperature=0, stop_at_eot=False)
    greedy = generate(model, tok, "To be, or", greedy_cfg)[0]
    one = "".join(
        beam_search(model, tok, prompt, GenerationConfig(max_new_tokens=12, num_beams=1, stop_at_eot=False))
    )
    assert one == greedy
    cfg4 = GenerationConfig(max_new_tokens=12, num_beams=4, stop_at_eot=False, length_penalty=0.0)
    best = "".join(beam_search(model, tok, prompt, cfg4))
    score = lambda text: sequence_logprob(model, prompt, tok.encode(text))  # noqa: E731
    assert score(best) >= score(greedy) - 1e-6


def reference_beam_search(model, prompt, beams, max_new, ends, length_penalty):
    """Beam search as the docstrings define it, written plainly: no cache, one hypothesis at a time."""
    live, finished = [(0.0, [])], []
    for _ in range(max_new):
        candidates = []
        for score, seq in live:
            with torch.no_grad():
                logits, _ = model(torch.tensor([prompt + seq]))
            logprobs = torch.log_softmax(logits[0, -1].float(), -1)
            candidates += [(score + float(lp), seq, token) for token, lp in enumerate(logprobs)]
        candidates.sort(key=lambda c: -c[0])
        extended = []
        for score, seq, token in candidates[: 2 * beams]:
            if token in ends:
                finished.append((score / (len(seq) + 1) ** length_penalty, seq))
                continue
            extended.append((score, seq + [token]))
            if len(extended) == beams:
                break
        if not extended or len(finished) >= beams:
            break
        live = extended
    else:  # out of tokens: live hypotheses compete too
        finished += [(score / len(seq) ** length_penalty, seq) for score, seq in live]
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("arch,pos", [("gpt", "rope"), ("gpt", "learned"), ("lstm", "learned")])
def test_batched_beam_search_equals_each_prompt_alone_and_a_plain_reference(arch, pos):
    """Prompts of different lengths beam-searched in one left-padded batch (prompts leave the batch
    as their searches end) give each prompt's own result, and the one a cache-free reference gives."""
    model, tok = make_model(pos, block=40, seed=5, arch=arch)
    end = tok.encode("e")[0]
    tok.extra_end_ids = (end,)  # a frequent character ends hypotheses: searches end at different steps
    prompts = ["To", "To be, or not", "that is the q", "ü", "日本"]
    lengths = set()
    for length_penalty in (1.0, 0.0):
        cfg = GenerationConfig(max_new_tokens=12, num_beams=3, length_penalty=length_penalty)
        batched = generate(model, tok, prompts, cfg)
        alone = ["".join(beam_search(model, tok, tok.encode(p), cfg)) for p in prompts]
        reference = [tok.decode(reference_beam_search(model, tok.encode(p), 3, 12, tok.end_ids, length_penalty))
                     for p in prompts]  # fmt: skip
        assert batched == alone == reference
        lengths |= {len(text) for text in batched}
    assert len(lengths) > 1  # searches ended at different steps (not all at 12 tokens)


def test_stop_strings_cut_at_the_right_character_across_tokens():
    tok = train_char_tokenizer([TEXT])
    tracker = TextTracker(tok, ["not to"])
    pieces = []
    for t in tok.encode("To be, or not to be"):
        tracker.add(t)
        pieces.append(tracker.take_new())
        if tracker.stopped:
            break
    pieces.append(tracker.take_new(final=True))
    assert "".join(pieces) == "To be, or "
    assert "not" not in "".join(pieces[:-1]) and tracker.stopped


def test_streaming_equals_non_streaming_with_multibyte_characters():
    # Byte-level BPE splits multi-byte characters across tokens: streaming must hold them back.
    bpe = train_bpe_tokenizer([TEXT], vocab_size=270)
    assert any("\ufffd" in bpe.decode([i]) for i in bpe.encode("日本語"))
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vocab_size=bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, pos_encoding="rope"
        )
    ).eval()
    for stop in ([], ["e"], ["本語"]):
        cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=1, stop=stop)
        pieces = list(stream(model, bpe, "ünï", cfg))
        # Any character emitted too early (as U+FFFD) would make the concatenation differ.
        assert "".join(pieces) == generate(model, bpe, "ünï", cfg)[0]
    tracker = TextTracker(bpe, [])
    pieces = []
    for t in bpe.encode("日本語 ✓"):
        tracker.add(t)
        pieces.append(tracker.take_new())
    assert "".join(pieces) + tracker.take_new(final=True) == "日本語 ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_prompts_longer_than_the_context_warn_or_refuse():
    model, tok = make_model(block=16)
    long_prompt = "To be, or not to be, that is the question"
    warnings_seen = []
    out = generate(
        model, tok, long_prompt, GenerationConfig(max_new_tokens=3, temperature=0), warn=warnings_seen.append
    )
    assert len(out[0]) == 3 and "only its last 16 tokens are used" in warnings_seen[0]
    with pytest.raises(UserError, match="context is 16"):
        generate(model, tok, long_prompt, GenerationConfig(strict=True))
    empty = generate(model, tok, "", GenerationConfig(max_new_tokens=5, temperature=0))
    assert len(empty[0]) == 5


def test_int8_quantisation_is_close_to_float():
    model, tok = make_model()
    ids = torch.tensor([tok.encode("To be, or not to be")])
    reference, _ = model(ids)
    quantize_int8(model)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    quantized, _ = model(ids)
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [256, 259])  # 259: three rows left over after the blocks
def test_blocked_matvec_linear_equals_linear(bias, out_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, out_features, bias=bias)
    blocked = BlockedMatvecLinear(linear)
    for shape in [(1, 1, 48), (3, 1, 48), (8, 48), (2, 5, 48), (48,)]:  # 10 rows: the ordinary path
        x = torch.randn(*shape)
        expected = linear(x)
        got = blocked(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5)
    assert blocked.state_dict().keys() == linear.state_dict().keys()


def test_blocked_matvec_keeps_tied_weights_and_greedy_tokens():
    model, tok = make_model(n_embd=64)
    prompt = tok.encode("To be, or not")
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    reference = steps(model, [prompt], cfg, True)
    large = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 4096]
    use_blocked_matvec(model, min_weight=4096)
    converted = [m.weight for m in model.modules() if isinstance(m, BlockedMatvecLinear)]
    assert len(converted) == 2 * 4 and all(
        a is b for a, b in zip(converted, large, strict=True)
    )  # 4 per block, not the head
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert torch.equal(steps(model, [prompt], cfg, True), reference)


def test_pipeline_api(tmp_path, shakespeare_excerpt):
    from lmforge.training.trainer import train

    from .conftest import tiny_config

    train(tiny_config(tmp_path / "run", shakespeare_excerpt), log=lambda _: None)
    pipe = pipeline("text-generation", model=str(tmp_path / "run"))
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5)
    expected = generate(pipe.model, pipe.tokenizer, "ROMEO:", cfg)[0]
    assert len(expected) > 0
    out = pipe("ROMEO:", max_new_tokens=10, temperature=1.0, seed=5)
    assert out == [{"generated_text": "ROMEO:" + expected}]
    many = pipe(["A", "BB"], max_new_tokens=4, temperature=0, return_full_text=False)
    assert [x[0]["generated_text"] for x in many] == generate(
        pipe.model, pipe.tokenizer, ["A", "BB"], GenerationConfig(max_new_tokens=4, temperature=0)
    )
    with pytest.raises(UserError, match="Unknown generation setting"):
        pipe("x", max_tokens=3)
    # transformers' do_sample=False is greedy decoding.
    assert pipe("A", max_new_tokens=4, do_sample=False) == pipe("A", max_new_tokens=4, temperature=0)
    # A conversation is formatted with the chat template and answered, as transformers' pipeline does.
    from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE, render_chat

    messages = [{"role": "user", "content": "Who art thou?"}]
    (chat,) = pipe(messages, max_new_tokens=8, do_sample=False)
    prompt = render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    reply = generate(pipe.model, pipe.tokenizer, prompt, GenerationConfig(max_new_tokens=8, temperature=0,
                                                                          stop=("\n### User:", "\n### Assistant:")))[0]  # fmt: skip
    assert chat == {"generated_text": [*messages, {"role": "assistant", "content": reply.strip()}]}
    assert len(pipe([messages, messages], max_new_tokens=2)) == 2
    with pytest.raises(UserError, match="A conversation is a list of messages"):
        pipe([{"role": "user", "content": 5}])
    with pytest.raises(UserError, match="Unknown pipeline task"):
        pipeline("image-classification", model=str(tmp_path / "run"))
    with pytest.raises(UserError, match="The summarization pipeline needs an encoder–decoder model"):
        pipeline("summarization", model=str(tmp_path / "run"))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_prefill_with_cached_prefixes_equals_computing_everything(pos):
    from lmforge.models.gpt import KVCache
    from lmforge.serving.prefill import PrefixCache, prefill

    model, tok = make_model(pos, block=64, n_kv_head=1)
    first = tok.encode("To be, or not to be")
    prompts = [
        tok.encode("To be, or not to be, that is"),
        tok.encode("Whether 'tis"),
        first,
        tok.encode("To"),
    ]
    prefixes = PrefixCache(max_tokens=1000)
    prefill(model, [first], prefixes)
    assert prefixes.reused == 0 and prefixes.tokens == len(first)
    cache, logits = prefill(model, prompts, prefixes)
    plain_cache, plain = prefill(model, prompts, None)
    # Reused: all of the first prompt for the longer one, all but its last token for itself and
    # for "To" (its "T"); nothing for the prompt that begins differently.
    assert prefixes.reused == len(first) + (len(first) - 1) + 1
    assert torch.allclose(logits, plain, atol=1e-5)
    # Decoding on from either cache gives the same next logits (positions and masks line up).
    token = logits.argmax(-1, keepdim=True)
    positions = torch.tensor([[len(p)] for p in prompts])
    rows = torch.arange(len(prompts))
    with torch.inference_mode():
        after, _ = model(token, cache=KVCache.joined([(cache, rows)], room=1), positions=positions)
        plain_after, _ = model(
            token, cache=KVCache.joined([(plain_cache, rows)], room=1), positions=positions
        )
    assert torch.allclose(after, plain_after, atol=1e-5)
    # Rows with padding between their reused prefix and the rest of their prompt ("To": one
    # token reused, one computed, beside a row that reused five) fit into spare rows of a running
    # cache as their real length (continuous batching writes newcomers there).
    assert int(cache.valid[3, : cache.length].sum()) == len(prompts[3]) < cache.length - 1
    running = KVCache.joined([(plain_cache, rows[:1])], room=1, batch=4)
    for row in (1, 2, 3):
        assert running.fits(len(prompts[row]), 1)
        running.place(row, cache, row)
    with torch.inference_mode():
        placed, _ = model(token, cache=running, positions=positions)
    assert torch.allclose(placed, plain_after, atol=1e-5)
    # The budget keeps the most recently used prompts only.
    small = PrefixCache(max_tokens=len(first) + 3)
    prefill(model, [first], small)
    prefill(model, [tok.encode("abc")], small)
    prefill(model, [tok.encode("Whether")], small)
    assert small.tokens <= len(first) + 3 and tuple(first) not in small.entries


def test_no_repeat_ngram_size_holds_for_decoders_greedy_sampled_and_beam():
    """The one decoding setting of encoder–decoders works for decoders too: no n-gram twice in the
    generated text, whatever the decoding."""
    from pathlib import Path

    from lmforge.checkpoint import load_checkpoint
    from lmforge.inference.generation import generate

    model, tokenizer, _ = load_checkpoint(Path(__file__).resolve().parent / "data" / "v1" / "gpt")

    def repeated_bigrams(text: str) -> int:
        ids = tokenizer.encode(text)
        grams = list(zip(ids, ids[1:], strict=False))
        return len(grams) - len(set(grams))

    plain = generate(model, tokenizer, "ROMEO:", GenerationConfig(max_new_tokens=40, temperature=0.0))[0]
    assert repeated_bigrams(plain) > 0  # a 10-step model loops: the setting has something to do
    assert (
        repeated_bigrams(
            generate(model, tokenizer, "RO", GenerationConfig(max_new_tokens=14, num_beams=3))[0]
        )
        > 0
    )
    # (Beam search keeps prompt and output within the context: 16 tokens.)
    for settings in (
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 3},
        {"num_beams": 3, "max_new_tokens": 14},
    ):
        cfg = GenerationConfig(**{"max_new_tokens": 40, "no_repeat_ngram_size": 2, **settings})
        text = generate(model, tokenizer, "RO" if "num_beams" in settings else "ROMEO:", cfg)[0]
        assert repeated_bigrams(text) == 0, settings
        assert (
            settings.get("seed") or len(tokenizer.encode(text)) == cfg.max_new_tokens
        )  # (sampling may end early)
