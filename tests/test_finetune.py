"""Fine-tuning: full and LoRA, plain text and instruction data, from lmforge and HF checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # the [dev] extra installs it
from safetensors.torch import load_file

from lmforge.adapters.lora import LoRALinear, apply_lora, merged_state_dict
from lmforge.checkpoint import load_checkpoint
from lmforge.cli import main
from lmforge.config import apply_overrides, load_preset
from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE, encode_conversation, render_chat
from lmforge.errors import UserError
from lmforge.training.optim import build_optimizers
from lmforge.training.trainer import train

from .conftest import tiny_config
from .test_hf_interop import hf_tokenizer_dir, save_tiny_hf_model  # noqa: F401 (fixture)


def finetune_config(base, data, out, **overrides):
    settings = {
        "data.path": str(data),
        "train.out": str(out),
        "finetune.init_from": str(base),
        "finetune.seq_len": 32,
        "train.max_iters": 30,
        "train.eval_interval": 15,
        "train.batch_size": 4,
        "train.eval_batches": 4,
        "train.eval_at_start": True,
        "train.progress": False,
        "train.sample_tokens": 0,
        "train.device": "cpu",
        "train.dtype": "float32",
        "optim.lr": 3e-3,
        "optim.warmup_iters": 2,
        **overrides,
    }
    return apply_overrides(load_preset("finetune"), settings)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)[0]
    assert apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="q_proj,o_proj,up_proj") == 6
    assert torch.equal(model(x)[0], before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    adapted = model(x)[0]
    assert not torch.allclose(adapted, before)
    plain = build_model(
        model_config := ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    )
    assert model_config.n_layer == 2
    plain.load_state_dict(merged_state_dict(model, model.state_dict()))
    assert torch.allclose(plain.eval()(x)[0], adapted, atol=1e-5)
    with pytest.raises(UserError, match="matches no layer"):
        apply_lora(plain, rank=2, alpha=2, dropout=0.0, targets="nonsense")


def test_layer_wise_lr_decay_scales_lower_layers():
    from lmforge.config import ModelConfig, OptimConfig
    from lmforge.models import build_model

    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    [opt] = build_optimizers(model, OptimConfig(lr=1.0), torch.device("cpu"), layer_lr_decay=0.5)
    lr_of = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.ln_f.weight)] == 1.0
    assert lr_of[id(model.blocks[1].attn.c_attn.weight)] == 0.5
    assert lr_of[id(model.blocks[0].attn.c_attn.weight)] == 0.25
    assert lr_of[id(model.wte.weight)] == 0.125


def test_lora_finetune_of_imported_llama_lowers_loss_and_exports(
    tmp_path,
    hf_tokenizer_dir,  # noqa: F811
    shakespeare_excerpt,
):
    base = save_tiny_hf_model("llama", tmp_path / "llama", hf_tokenizer_dir)
    lora = {"finetune.lora_rank": 8, "optim.lr": 2e-2, "train.max_iters": 60}
    config = finetune_config(base, shakespeare_excerpt, tmp_path / "ft", **lora)
    result = train(config, log=lambda _: None)
    start = result.history[0]["val_loss"]
    assert result.best_val_loss < start - 0.3
    full = train(finetune_config(base, shakespeare_excerpt, tmp_path / "full"), log=lambda _: None)
    assert result.trainable_params < full.trainable_params / 5
    assert result.optimizer_state_bytes < full.optimizer_state_bytes / 5

    # The checkpoint holds merged weights (a plain model) and the adapters alone.
    adapters = load_file(str(tmp_path / "ft" / "adapter.safetensors"))
    assert adapters and all(".lora_A" in k or ".lora_B" in k for k in adapters)
    model, tokenizer, saved = load_checkpoint(tmp_path / "ft")
    assert saved.finetune.lora_rank == 8 and saved.model.n_kv_head == 2

    assert main(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "hf")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("KING RICHARD:")])
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4

    # The adapters alone, put back on the base, give the merged checkpoint's model.
    from lmforge.inference.loading import load_for_inference

    again, _ = load_for_inference(str(base), adapter=str(tmp_path / "ft" / "adapter.safetensors"))
    assert not any(isinstance(m, LoRALinear) for m in again.modules())  # merged: plain layers
    with torch.no_grad():
        assert torch.allclose(again(ids)[0], model(ids)[0], atol=1e-5)
        assert not torch.allclose(load_for_inference(str(base))[0](ids)[0], model(ids)[0], atol=1e-3)


def test_finetune_resumes_exactly(tmp_path, shakespeare_excerpt):
    train(tiny_config(tmp_path / "base", shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    settings = {
        "finetune.lora_rank": 2,
        "train.max_iters": 20,
        "train.eval_interval": 5,
        "model.dropout": 0.1,
    }
    whole = train(
        finetune_config(tmp_path / "base", shakespeare_excerpt, tmp_path / "whole", **settings),
        log=lambda _: None,
    )

    def stop_at_8(step, _loss):
        if step == 8:
            raise KeyboardInterrupt

    from lmforge.errors import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        train(
            finetune_config(tmp_path / "base", shakespeare_excerpt, tmp_path / "split", **settings),
            log=lambda _: None,
            on_step=stop_at_8,
        )
    resumed = train(
        finetune_config(tmp_path / "base", shakespeare_excerpt, tmp_path / "split", **settings),
        resume=True,
        log=lambda _: None,
    )
    assert resumed.best_val_loss == whole.best_val_loss
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_instructions(path, n=40):
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        if i % 2:
            rows.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Add {a} and {b}."},
                        {"role": "assistant", "content": f"{a + b}"},
                    ]
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_instruction_data_masks_everything_but_the_replies(tmp_path, shakespeare_excerpt):
    from lmforge.tokenizers import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([shakespeare_excerpt.read_text()], vocab_size=300)
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    ids, mask = encode_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, messages)
    assert len(ids) == len(mask)
    reply = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert reply == "Hello.<|endoftext|>\n\n"
    given = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert given == render_chat(DEFAULT_CHAT_TEMPLATE, messages[:1], add_generation_prompt=True)

    train(tiny_config(tmp_path / "base", shakespeare_excerpt, **{"train.max_iters": 5}), log=lambda _: None)
    data = write_instructions(tmp_path / "sft.jsonl")
    result = train(
        finetune_config(tmp_path / "base", data, tmp_path / "sft", **{"train.max_iters": 40}),
        log=lambda _: None,
    )
    assert result.best_val_loss < result.history[0]["val_loss"]
    saved = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert saved["chat_template"] == DEFAULT_CHAT_TEMPLATE
    prepared = saved["data"]
    train_mask = np.fromfile(f"{prepared}/train.mask.bin", dtype=np.uint8)
    assert 0 < train_mask.mean() < 0.5  # replies are a minority of the tokens


def test_finetune_cli_and_bad_input(tmp_path, shakespeare_excerpt, capsys):
    train(tiny_config(tmp_path / "base", shakespeare_excerpt, **{"train.max_iters": 5}), log=lambda _: None)
    assert main(["finetune", str(tmp_path / "base")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
    assert main(["finetune", str(tmp_path / "base"), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2 needs string fields prompt and response" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "nowhere"),
                "--data",
                str(shakespeare_excerpt),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    code = main(
        [
            "finetune",
            str(tmp_path / "base"),
            "--data",
            str(shakespeare_excerpt),
            "--lora-rank",
            "2",
            "--lora-targets",
            "attn.c_attn",
            "--max-iters",
            "4",
            "--seq-len",
            "16",
            "--quiet",
            "--out",
            str(tmp_path / "cli"),
            "--train.sample_tokens",
            "0",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable parameters" in out and "optimizer state" in out
    assert (tmp_path / "cli" / "adapter.safetensors").is_file()

    # Generating with the adapter alone on its base gives the merged checkpoint's text.
    greedy = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0", "--no-stream"]
    assert main(["generate", str(tmp_path / "cli"), *greedy]) == 0
    merged_text = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "cli"), *greedy]) == 0
    assert capsys.readouterr().out == merged_text
    # Adapters that are missing, not adapters, or made for another base: one-line errors.
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "nowhere"), *greedy]) == 2
    assert "No LoRA adapter at" in capsys.readouterr().err
    not_adapter = str(tmp_path / "cli" / "model.safetensors")
    assert main(["generate", str(tmp_path / "base"), "--adapter", not_adapter, *greedy]) == 2
    assert "is not an lmforge LoRA adapter" in capsys.readouterr().err
    train(
        tiny_config(tmp_path / "wider", shakespeare_excerpt, **{"train.max_iters": 2, "model.n_embd": 48}),
        log=lambda _: None,
    )
    assert main(["generate", str(tmp_path / "wider"), "--adapter", str(tmp_path / "cli"), *greedy]) == 2
    assert "was trained on" in capsys.readouterr().err  # another model: refused, naming its base


def test_sequence_classification_from_an_imported_model(tmp_path, hf_tokenizer_dir):  # noqa: F811
    from lmforge.classification.inference import load_classifier
    from lmforge.classification.training import train_classifier
    from lmforge.config import classifier_run

    from .test_classify import NEGATIVE, POSITIVE, write_toy

    base = save_tiny_hf_model("qwen2", tmp_path / "qwen2", hf_tokenizer_dir)
    train_path = write_toy(
        tmp_path / "train.tsv", [(t, "pos") for t in POSITIVE] * 6 + [(t, "neg") for t in NEGATIVE] * 6
    )
    dev_path = write_toy(
        tmp_path / "dev.tsv", [(t, "pos") for t in POSITIVE[:4]] + [(t, "neg") for t in NEGATIVE[:4]]
    )
    cfg = classifier_run(
        {
            "data.path": str(train_path),
            "data.val_path": str(dev_path),
            "train.out": str(tmp_path / "clf"),
            "init.checkpoint": str(base),
            "train.epochs": 6,
            "train.batch_size": 8,
            "optim.lr": 3e-3,
            "train.progress": False,
            "train.device": "cpu",
        }
    )
    result = train_classifier(cfg, log=lambda _: None)
    assert result["best_val_accuracy"] >= 0.75
    model, tokenizer, labels = load_classifier(tmp_path / "clf")
    assert labels == ["neg", "pos"] and model.body.config.qkv_bias


def test_python_api_entry_points(tmp_path, shakespeare_excerpt):
    import lmforge

    train(tiny_config(tmp_path / "base", shakespeare_excerpt, **{"train.max_iters": 5}), log=lambda _: None)
    result = lmforge.finetune(
        str(tmp_path / "base"),
        str(shakespeare_excerpt),
        str(tmp_path / "ft"),
        finetune__lora_rank=2,
        train__max_iters=3,
        train__progress=False,
        train__sample_tokens=0,
        finetune__seq_len=16,
    )
    assert result.step == 3 and (tmp_path / "ft" / "adapter.safetensors").is_file()
    report = lmforge.evaluate(str(tmp_path / "ft"))
    assert report["loss"] > 0 and report["perplexity"] > 1
    out = lmforge.pipeline("text-generation", model=str(tmp_path / "ft"))("KING:", max_new_tokens=5, seed=0)
    assert out[0]["generated_text"].startswith("KING:")


def test_chat_template_follows_the_adapter_run(tmp_path):
    from lmforge.chat import chat_template_of

    base, run, loose = tmp_path / "base", tmp_path / "run", tmp_path / "loose"
    for folder, template in ((base, "BASE {{ messages }}"), (run, "TUNED {{ messages }}")):
        folder.mkdir()  # the metadata of a checkpoint (open_checkpoint reads no weights)
        (folder / "config.json").write_text(
            json.dumps({"format": "lmforge-checkpoint", "config": {}, "chat_template": template})
        )
        (folder / "model.safetensors").touch()
        (folder / "tokenizer.json").touch()
    loose.mkdir()
    assert chat_template_of(base) == "BASE {{ messages }}"
    assert chat_template_of(base, run / "adapter.safetensors") == "TUNED {{ messages }}"  # the file or
    assert chat_template_of(base, run) == "TUNED {{ messages }}"  # its folder
    assert chat_template_of(base, loose / "adapter.safetensors") == "BASE {{ messages }}"  # no run beside it


def test_lora_adapters_are_peft_compatible_both_ways(tmp_path, hf_tokenizer_dir, shakespeare_excerpt):  # noqa: F811
    import peft

    from lmforge.inference.loading import load_for_inference

    base = save_tiny_hf_model("llama", tmp_path / "llama", hf_tokenizer_dir)
    settings = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8.0, "finetune.lora_targets": "all-linear",
                "optim.lr": 2e-2, "train.max_iters": 20}  # fmt: skip
    train(finetune_config(base, shakespeare_excerpt, tmp_path / "ft", **settings), log=lambda _: None)
    written = json.loads((tmp_path / "ft" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8.0 and written["peft_type"] == "LORA"
    assert set(written["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}  # fmt: skip
    merged, tokenizer, _ = load_checkpoint(tmp_path / "ft")
    ids = torch.tensor([tokenizer.encode("KING RICHARD: my lord")])

    # lmforge's adapter on the transformers base through peft = lmforge's merged checkpoint
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        plain = hf_base(ids).logits
        tuned = peft.PeftModel.from_pretrained(hf_base, tmp_path / "ft").eval()
        assert (tuned(ids).logits - merged(ids)[0]).abs().max().item() <= 1e-4
        assert (plain - merged(ids)[0]).abs().max().item() > 1e-3  # the adapter changed something

    # an adapter made by peft (random B, so it is not a no-op) on lmforge = on transformers
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    made = peft.get_peft_model(
        fresh, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    made.save_pretrained(tmp_path / "peft")
    ours, _ = load_for_inference(str(base), adapter=str(tmp_path / "peft"))
    with torch.no_grad():
        assert (made.eval()(ids).logits - ours(ids)[0]).abs().max().item() <= 1e-4
    assert main(["generate", str(base), "--adapter", str(tmp_path / "peft"), "--prompt", "KING",
                 "--max-new-tokens", "3", "--no-stream", "--temperature", "0"]) == 0  # fmt: skip

    # an adapter made for another base (a wider MLP): one clear sentence
    wider = transformers.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)  # fmt: skip
    other = peft.get_peft_model(
        transformers.LlamaForCausalLM(wider), peft.LoraConfig(r=2, target_modules=["up_proj"])
    )
    other.save_pretrained(tmp_path / "peft-wide")
    config_file = tmp_path / "peft-wide" / "adapter_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "wide-llama"})
    )
    with pytest.raises(UserError, match=r"does not fit this model: it was made for wide-llama"):
        load_for_inference(str(base), adapter=str(tmp_path / "peft-wide"))


def test_a_finetuned_run_keeps_the_bases_end_of_sequence_ids_and_sampling(tmp_path, shakespeare_excerpt):
    """A base that ends its replies on a token of its own (SmolLM2's <|im_end|>, kept from an import in
    config.json) hands it on: the fine-tuned run stops there too, and its exports record it."""
    import shutil
    from pathlib import Path

    from lmforge.checkpoint import open_checkpoint

    base = shutil.copytree(Path(__file__).resolve().parent / "data" / "v1" / "gpt", tmp_path / "base")
    data = json.loads((base / "config.json").read_text("utf-8"))
    newline = 2  # "\\n" in this character vocabulary: the end of a reply, as <|im_end|> is for SmolLM2
    data |= {"eos_token_ids": [newline], "sampling_defaults": {"temperature": 0.3}, "bos_token_id": 1}
    (base / "config.json").write_text(json.dumps(data), encoding="utf-8")
    config = finetune_config(base, shakespeare_excerpt, tmp_path / "ft", **{"train.max_iters": 2,
                             "train.eval_interval": 2, "finetune.seq_len": 16})  # fmt: skip
    train(config, log=lambda _: None)
    tuned = open_checkpoint(tmp_path / "ft")
    assert tuned.generation.eos_token_ids == (newline,) and tuned.generation.bos_token_id == 1
    assert tuned.generation.sampling == {"temperature": 0.3}
    assert newline in tuned.tokenizer().end_ids
