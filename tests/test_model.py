import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.models import MODELS, build_model


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = [
    {},
    {"pos_encoding": "sinusoidal"},
    {"pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False},
    {"activation": "relu2", "qk_norm": True, "logit_softcap": 15.0, "tie_embeddings": False},
    {"pos_encoding": "rope", "n_kv_head": 2, "activation": "gelu_tanh"},
    {"zero_init_proj": True, "dropout": 0.1},
]


@pytest.mark.parametrize("options", VARIANTS)
def test_output_shapes_and_loss(options):
    torch.manual_seed(0)
    model = build_model(small(**options))
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    # A fresh model predicts nearly uniformly: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    logits_short, none = model(idx[:, :5])
    assert logits_short.shape == (3, 5, 50) and none is None


@pytest.mark.parametrize("options", [{}, {"logit_softcap": 15.0, "tie_embeddings": False}])
def test_unscored_targets_skip_the_head_and_leave_the_loss_unchanged(options):
    """Targets of -100 (a prompt, padding): the head runs on the scored positions only; the loss is
    the one of the whole logits with those positions ignored, and so are its gradients."""
    torch.manual_seed(0)
    model = build_model(small(**options))
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    targets[0, :10], targets[2, 3:7] = -100, -100
    scored = targets != -100
    rows, loss = model(idx, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.head_on_scored_only = False  # (what differentially private training asks for)
    whole, whole_loss = model(idx, targets)
    whole_loss.backward()
    assert rows.shape == (int(scored.sum()), 50) and whole.shape == (3, 16, 50)
    assert torch.allclose(rows, whole[scored], atol=1e-6)
    expected = torch.nn.functional.cross_entropy(whole.view(-1, 50), targets.view(-1))
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(whole_loss, expected, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


@pytest.mark.parametrize("options", VARIANTS)
def test_no_position_sees_the_future(options):
    torch.manual_seed(0)
    model = build_model(small(**options)).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-3)


def test_tied_and_untied_heads():
    tied = build_model(small())
    assert tied.lm_head.weight is tied.wte.weight
    untied = build_model(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 50 * 32


def test_residual_projections_are_scaled_or_zero():
    torch.manual_seed(0)
    model = build_model(small(n_layer=8, n_embd=64))
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert 0.02 / 4 * 0.8 < std < 0.02 / 4 * 1.2  # 0.02 / sqrt(2 * 8)
    zero = build_model(small(zero_init_proj=True))
    assert zero.blocks[1].mlp.c_proj.weight.abs().sum() == 0


def test_sequences_longer_than_the_context_are_refused():
    model = build_model(small())
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_registry_names_the_available_architectures():
    assert "gpt" in MODELS
    with pytest.raises(
        UserError,
        match="Unknown model.arch 'transformer-xl'; available: encoder, gpt, gru, lstm, rnn, seq2seq",
    ):
        build_model(small(arch="transformer-xl"))


def test_flops_per_token_counts_matmuls():
    model = build_model(small(n_layer=1, n_head=1, n_embd=8, vocab_size=10, block_size=4, bias=False))
    # blocks: qkv 8*24 + proj 8*8 + fc 8*32 + proj 32*8 = 768, norms 3*8 = 24, head 80 (tied)
    assert model.flops_per_token() == 6 * (768 + 24 + 80) + 12 * 1 * 8 * 4
