import json

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.config import ModelConfig
from lmforge.data.batches import ContiguousStreams
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.inference.generation import GenerationConfig, decode_steps, generate
from lmforge.inference.loading import load_for_inference
from lmforge.models import build_model
from lmforge.training.trainer import train

from .conftest import tiny_config


def lstm(arch="lstm", **kw):
    torch.manual_seed(0)
    base = dict(arch=arch, vocab_size=30, n_embd=16, hidden_size=24, n_layer=2, block_size=8)
    base.update(kw)
    return build_model(ModelConfig(**base)).eval()


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_state_carried_across_windows_equals_one_long_window(arch):
    model = lstm(arch)
    x = torch.randint(0, 30, (3, 24))
    y = torch.randint(0, 30, (3, 24))
    _, full_loss = model(x, y)
    state, losses = None, []
    for i in range(0, 24, 8):
        _, loss, state = model(x[:, i : i + 8], y[:, i : i + 8], state=state, return_state=True)
        losses.append(loss)
    assert torch.stack(losses).mean().item() == pytest.approx(full_loss.item(), abs=1e-6)


@pytest.mark.parametrize("tied, hidden", [(True, 24), (True, 16), (False, 24)])
def test_weight_tying_with_projection_when_sizes_differ(tied, hidden):
    model = lstm(tie_embeddings=tied, hidden_size=hidden)
    assert (model.lm_head.weight is model.wte.weight) == tied
    assert (model.proj is not None) == (tied and hidden != 16)
    logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 30)


def test_generation_with_state_equals_recomputation_and_padding_is_skipped():
    model = lstm()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)  # well past the 8-token window
    cached = torch.stack(list(decode_steps(model, prompts, cfg, use_cache=True)), 1)
    recomputed = torch.stack(list(decode_steps(model, prompts, cfg, use_cache=False)), 1)
    assert torch.equal(cached, recomputed)
    for row, p in enumerate(prompts):
        alone = torch.stack(list(decode_steps(model, [p], cfg)), 1)[0]
        assert torch.equal(cached[row], alone)


def test_contiguous_streams_continue_row_by_row():
    tokens = torch.arange(101).numpy()
    streams = ContiguousStreams(tokens, length=10, batch_size=4, device=torch.device("cpu"))
    x1, _ = streams.next_batch()
    x2, y2 = streams.next_batch()
    assert x1[:, 0].tolist() == [0, 25, 50, 75]
    assert (x2[:, 0] == x1[:, -1] + 1).all() and not streams.wrapped
    assert (y2[:, -1] == x2[:, -1] + 1).all()
    x3, _ = streams.next_batch()  # 20 + 10 > 25 tokens per stream: start over
    assert streams.wrapped and x3[:, 0].tolist() == [0, 25, 50, 75] and streams.position == 10


def test_lstm_trains_resumes_exactly_and_generates(tmp_path, shakespeare_excerpt):
    overrides = {
        "model.arch": "lstm",
        "model.n_embd": 32,
        "model.hidden_size": 64,
        "model.n_layer": 2,
        "model.dropout": 0.1,
        "train.eval_interval": 5,
        "train.max_iters": 20,
    }
    straight = []
    result = train(
        tiny_config(tmp_path / "a", shakespeare_excerpt, **overrides),
        log=lambda _: None,
        on_step=lambda s, loss: straight.append(loss),
    )
    assert straight[-1] < straight[0] - 0.5

    first: list[float] = []

    def stop_at_10(step, loss):
        first.append(loss)
        if step == 10:
            raise KeyboardInterrupt

    cfg = tiny_config(tmp_path / "b", shakespeare_excerpt, **overrides)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=lambda _: None, on_step=stop_at_10)
    second: list[float] = []
    train(cfg, resume=True, log=lambda _: None, on_step=lambda s, loss: second.append(loss))
    assert first + second == pytest.approx(straight, abs=1e-6)  # hidden state and stream position restored

    model, tokenizer, config = load_checkpoint(tmp_path / "a")
    assert config.model.arch == "lstm"
    text = generate(model, tokenizer, "ROMEO:", GenerationConfig(max_new_tokens=30, seed=0))[0]
    assert len(text) == 30
    with pytest.raises(UserError, match="--compile speeds up GPT models only"):
        load_for_inference(str(tmp_path / "a"), compile=True)
    with pytest.raises(UserError, match="--compile works with float weights"):
        load_for_inference(str(tmp_path / "a"), quantize="int8", compile=True)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss_full"] == pytest.approx(result.full_val_loss, abs=1e-5)


def test_word_level_lstm_from_the_word_tokenizer(tmp_path, shakespeare_excerpt):
    overrides = {
        "model.arch": "gru",
        "model.n_embd": 32,
        "model.n_layer": 1,
        "data.tokenizer": "word",
        "data.vocab_size": 500,
        "data.min_frequency": 2,
        "train.max_iters": 10,
    }
    result = train(tiny_config(tmp_path / "w", shakespeare_excerpt, **overrides), log=lambda _: None)
    _, tokenizer, _ = load_checkpoint(tmp_path / "w")
    assert tokenizer.kind == "word" and tokenizer.vocab_size <= 500
    assert result.step == 10


def test_too_little_text_for_the_streams(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be, that is the question. " * 12)
    cfg = tiny_config(tmp_path / "r", short, **{"model.arch": "lstm", "train.batch_size": 32})
    with pytest.raises(UserError, match="too few for 32 streams"):
        train(cfg, log=lambda _: None)
