"""Hugging Face import/export: tiny random models built by `transformers` itself, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # the [dev] extra installs it

from lmforge.checkpoint import load_checkpoint
from lmforge.errors import UserError
from lmforge.inference.generation import GenerationConfig, generate_ids
from lmforge.interop.hf import export_hf, import_hf
from lmforge.tokenizers import train_bpe_tokenizer

from .conftest import tiny_config

MULTILINGUAL = [
    "To be, or not to be: that is the question.",
    "Où est la bibliothèque ? Je voudrais un café, s'il vous plaît.",
    "Grüße aus München — Straße, Fuß, Mädchen.",
    "東京は日本の首都です。 Привет, мир! مرحبا بالعالم 👋🏽",
    "  leading spaces,\ttabs\nand new lines  ",
]


@pytest.fixture
def hf_tokenizer_dir(tmp_path, shakespeare_excerpt) -> Path:
    """A folder holding a byte-level BPE tokenizer.json of 300 tokens."""
    tokenizer = train_bpe_tokenizer([shakespeare_excerpt.read_text("utf-8")], vocab_size=300)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
            }
        )
    )
    return folder


def save_tiny_hf_model(kind: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random model of `kind` saved by transformers, with the tokenizer files copied in."""
    torch.manual_seed(0)
    common = dict(vocab_size=300, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=500.0,
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            **common,
        )
        model = transformers.Qwen2ForCausalLM(config)
    with (
        torch.no_grad()
    ):  # random init leaves biases and norms at 0/1: perturb them so parity means something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_import_matches_transformers_logits_and_greedy_tokens(kind, tmp_path, hf_tokenizer_dir):
    folder = save_tiny_hf_model(kind, tmp_path / kind, hf_tokenizer_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, tokenizer, config = load_checkpoint(folder)  # any command's checkpoint argument takes HF dirs
    assert config.model.n_layer == 2
    ids = torch.tensor([tokenizer.encode("ROMEO: Wherefore art thou, Romeo?")])
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = reference(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    prompt = tokenizer.encode("First Citizen:")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_at_eot=False)
    new = generate_ids(model, tokenizer, [prompt], cfg)[0]
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert new == expected


def test_tokenizer_encodes_and_decodes_like_transformers(tmp_path, hf_tokenizer_dir):
    folder = save_tiny_hf_model("gpt2", tmp_path / "gpt2", hf_tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    _, ours, _ = import_hf(folder)
    for text in MULTILINGUAL:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids) == text

    # vocab.json + merges.txt (the older GPT-2 layout) give the same tokens as tokenizer.json.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    ours.hf.model.save(str(legacy))
    for name in ("config.json", "model.safetensors"):
        (legacy / name).write_bytes((folder / name).read_bytes())
    _, legacy_tokenizer, _ = import_hf(legacy)
    for text in MULTILINGUAL:
        assert legacy_tokenizer.encode(text) == ours.encode(text)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_export_loads_in_transformers_and_round_trips(kind, tmp_path, hf_tokenizer_dir):
    folder = save_tiny_hf_model(kind, tmp_path / kind, hf_tokenizer_dir)
    model, tokenizer, config = import_hf(folder)
    exported = export_hf(model, tokenizer, config, tmp_path / "exported")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([tokenizer.encode("Good morrow, cousin.")])
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer.encode(MULTILINGUAL[1]) == tokenizer.encode(MULTILINGUAL[1])

    again, _, _ = import_hf(exported)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_chat_template_is_read_from_tokenizer_config(tmp_path, hf_tokenizer_dir):
    from lmforge.interop.hf import chat_template

    folder = save_tiny_hf_model("llama", tmp_path / "llama", hf_tokenizer_dir)
    assert chat_template(folder).startswith("{% for m in messages %}")


def test_bad_hf_directories_get_clear_errors(tmp_path, hf_tokenizer_dir):
    folder = save_tiny_hf_model("llama", tmp_path / "llama", hf_tokenizer_dir)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="'gpt_neox' is not supported; supported: gpt2, llama"):
        import_hf(folder)

    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(UserError, match="has shape .* the config expects"):
        import_hf(folder)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer"):
        import_hf(folder)
    for file in hf_tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())

    # A sharded checkpoint whose index names a shard that is not there.
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    with pytest.raises(UserError, match="missing: model-00002-of-00002.safetensors"):
        import_hf(folder)

    # A pickle that is more than tensors is refused, not executed.
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "code": Path("x")}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="arbitrary pickled code"):
        import_hf(folder)


def test_pytorch_bin_and_sharded_safetensors_import(tmp_path, hf_tokenizer_dir):
    folder = save_tiny_hf_model("gpt2", tmp_path / "gpt2", hf_tokenizer_dir)
    reference, _, _ = import_hf(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder)

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "binary"
    binary.mkdir()
    torch.save(hf_model.state_dict(), binary / "pytorch_model.bin")
    for target in (sharded, binary):
        for name in ("config.json", "tokenizer.json"):
            (target / name).write_bytes((folder / name).read_bytes())
        model, _, _ = import_hf(target)
        for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_cli_convert_generate_and_export(tmp_path, hf_tokenizer_dir, capsys):
    from lmforge.cli import main

    folder = save_tiny_hf_model("llama", tmp_path / "llama", hf_tokenizer_dir)
    assert (
        main(
            [
                "generate",
                str(folder),
                "--prompt",
                "KING:",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--no-stream",
            ]
        )
        == 0
    )
    from_hf_dir = capsys.readouterr().out

    assert main(["convert", str(folder), "--out", str(tmp_path / "converted")]) == 0
    assert "imported from Hugging Face (llama)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert saved["chat_template"].startswith("{% for m in messages %}")
    assert (
        main(
            [
                "generate",
                str(tmp_path / "converted"),
                "--prompt",
                "KING:",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--no-stream",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == from_hf_dir

    assert main(["export", str(tmp_path / "converted"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "converted"), "--out", str(tmp_path / "back")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_refuses_layouts_transformers_cannot_load(tmp_path, shakespeare_excerpt, capsys):
    from lmforge.cli import main
    from lmforge.training.trainer import train

    config = tiny_config(
        tmp_path / "run", shakespeare_excerpt, **{"model.qk_norm": True, "train.max_iters": 2}
    )
    train(config, log=lambda _: None)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "cannot be exported to Hugging Face" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_eval_of_an_imported_model_needs_data(tmp_path, hf_tokenizer_dir, shakespeare_excerpt, capsys):
    from lmforge.cli import main

    folder = save_tiny_hf_model("gpt2", tmp_path / "gpt2", hf_tokenizer_dir)
    assert main(["eval", str(folder)]) == 2
    assert "give a text to evaluate it on (data). (command line: --data)" in capsys.readouterr().err
    assert main(["eval", str(folder), "--data", str(shakespeare_excerpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 4.0 < report["loss"] < 7.0  # a random 300-token model: near ln(300) = 5.7


# ---- hub ids -------------------------------------------------------------------------------------


def test_hub_ids_resolve_from_the_hub_cache_offline(tmp_path, hf_tokenizer_dir, monkeypatch, capsys):
    """A hub id opens from a Hugging Face cache laid out as huggingface_hub lays it out (here
    built by the test), with HF_HUB_OFFLINE=1: nothing goes to the network."""
    import lmforge
    from lmforge.checkpoint import HUGGING_FACE, open_checkpoint
    from lmforge.cli import main

    cache = tmp_path / "hub"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        save_tiny_hf_model(
            "llama", cache / "models--tiny-org--tiny-llama" / "snapshots" / commit, hf_tokenizer_dir
        )
        refs = cache / "models--tiny-org--tiny-llama" / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / ref).write_text(commit)
    (
        cache / "models--tiny-org--tiny-llama" / "snapshots" / commits["v1"] / "generation_config.json"
    ).write_text(json.dumps({"eos_token_id": [0, 7], "temperature": 0.3, "top_p": 0.5, "do_sample": True}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    opened = open_checkpoint("tiny-org/tiny-llama")
    assert opened.kind == HUGGING_FACE and opened.path.name == commits["main"]
    pinned = open_checkpoint("tiny-org/tiny-llama@v1")
    assert pinned.path.name == commits["v1"]
    assert pinned.generation.eos_token_ids == (0, 7) and pinned.generation.sampling == {"temperature": 0.3,
                                                                                         "top_p": 0.5}  # fmt: skip
    model, tokenizer, _ = lmforge.load("tiny-org/tiny-llama")
    assert model.block_size == 64 and tokenizer.end_ids == (0,)  # config.json's eos_token_id, <|endoftext|>
    pipe = lmforge.pipeline("text-generation", model="tiny-org/tiny-llama")
    assert pipe("ROMEO:", max_new_tokens=3, temperature=0, stop_at_eot=False)[0]["generated_text"].startswith(
        "ROMEO:"
    )
    assert main(["generate", "tiny-org/tiny-llama", "--revision", "v1", "--prompt", "ROMEO:",
                 "--max-new-tokens", "3", "--no-stream", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("ROMEO:")

    # Offline with nothing cached: one sentence naming the id and how to fetch it.
    assert main(["generate", "tiny-org/missing-model", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lmforge: error: tiny-org/missing-model is not a local checkpoint, and tiny-org/missing-model "
                   "is not in the Hugging Face cache; fetch it while online (`hf download tiny-org/missing-model`, "
                   "or unset HF_HUB_OFFLINE).")  # fmt: skip
    # A path that is plainly local still gets the plain answer.
    assert main(["generate", str(tmp_path / "no" / "such"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["shakespeare-char", "nanogpt-cpu-baseline", "shakespeare-bpe", "tiny",
                                    "finetune", "shakespeare-char-lstm", "shakespeare-word-lstm"])  # fmt: skip
def test_every_built_in_preset_exports_with_logit_parity(tmp_path, preset):
    """Each Transformer preset maps onto a transformers architecture (GPT-2, or Persimmon for the
    default's rotary + LayerNorm + ReLU² + QK-norm); the recurrent ones have none and say so."""
    from lmforge.config import load_preset
    from lmforge.interop.hf import export_hf, hf_config_from_model
    from lmforge.models import build_model
    from lmforge.tokenizers import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["To be, or not to be, that is the question. " * 20], vocab_size=280)
    config = load_preset(preset)
    config.model.vocab_size = tokenizer.vocab_size
    config.model.dropout = 0.0
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    if config.model.arch != "gpt":
        with pytest.raises(UserError, match="cannot be exported to Hugging Face"):
            hf_config_from_model(config.model)
        return
    with torch.no_grad():  # random norms and biases, so that a misplaced one shows
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    export_hf(model, tokenizer, config, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4, reloaded.config.model_type


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "tiny-org/gated (revision v9) is a gated model: accept its terms on huggingface.co, then set HF_TOKEN"),
    ("RepositoryNotFoundError", "tiny-org/gated is not a local checkpoint, and the Hugging Face hub has no model "
                                "tiny-org/gated (or it is private: set HF_TOKEN)."),
    ("RevisionNotFoundError", "The Hugging Face model tiny-org/gated has no revision 'v9'."),
])  # fmt: skip
def test_hub_failures_online_are_one_sentence(monkeypatch, capsys, error, message):
    """What the hub answers for a gated, unknown or misspelled model (its own exception types,
    raised here by a stand-in for snapshot_download: the tests never reach the network)."""
    import httpx2
    import huggingface_hub
    import huggingface_hub.errors

    from lmforge.cli import main

    def refuse(repo_id, **_):
        response = httpx2.Response(401, request=httpx2.Request("GET", f"https://example.invalid/{repo_id}"))
        raise getattr(huggingface_hub.errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["generate", "tiny-org/gated", "--revision", "v9", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
