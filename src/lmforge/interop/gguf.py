"""GGUF files (llama.cpp, Ollama) in: the Llama family, any tensor type the `gguf` package reads; out:
every lmforge Transformer layout that one of llama.cpp's architectures computes (`export_gguf`).

A `.gguf` file is a checkpoint wherever lmforge accepts one. Reading it:
- metadata (`llama.*` keys) becomes the Hugging Face-style config that the Llama reader in
  hf.py already maps onto lmforge's GPT model;
- tensors are dequantised to float32 by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, Q5_0, Q5_1, Q2_K … Q6_K); llama.cpp stores the query and key rows of each head in
  an interleaved rotary order, which is undone here (the inverse of llama.cpp's converter);
- the tokenizer comes from the metadata through `transformers`' GGUF tokenizer conversion
  (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`), the same path transformers'
  own GGUF loading uses, so token ids match it exactly;
- the chat template and the end-of-sequence id come from `tokenizer.*` metadata.

Needs `pip install 'lmforge[gguf]'` (the `gguf` and `transformers` packages).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.errors import UserError
from lmforge.tokenizers import TextTokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")  # fmt: skip
MAGIC = b"GGUF"

# GGUF tensor names → Hugging Face Llama names (per layer: blk.N.* → model.layers.N.*)
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}  # fmt: skip
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _reader(path: Path):
    """The file's reader, opened once per file version (parsing the metadata takes seconds)."""
    stat = path.stat()
    return _open_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_reader(path: str, mtime_ns: int, size: int):
    try:
        import gguf
    except ImportError:
        raise UserError(f"Reading {path} needs the gguf package: pip install 'lmforge[gguf]'.") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise UserError(
            f"{path} is not a readable GGUF file ({e}); it may be truncated: download it again."
        ) from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _hf_config(reader, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}.")  # fmt: skip

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata {arch}.{name} is missing; the file is incomplete.")
        return value

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {"model_type": "llama", "vocab_size": int(vocab), "hidden_size": n_embd,
            "num_hidden_layers": int(key("block_count")), "num_attention_heads": n_head,
            "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
            "intermediate_size": int(key("feed_forward_length")),
            "max_position_embeddings": int(key("context_length", 2048)),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "tie_word_embeddings": tied, "head_dim": int(key("rope.dimension_count", n_embd // n_head))}  # fmt: skip


def read_gguf_metadata(path: str | Path) -> tuple[Config, str | None, list[int], dict[str, Any], int | None]:
    """Config, chat template, end-of-sequence ids, (no) sampling defaults and the beginning-of-text
    id of a GGUF file."""
    from lmforge.interop.hf import model_config_from_hf

    path = Path(path)
    reader = _reader(path)
    model = model_config_from_hf(_hf_config(reader, path), str(path))
    name = _field(reader, "general.name") or path.stem
    config = Config(name=path.stem, description=f"imported from GGUF ({name})", model=model)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    template = _field(reader, "tokenizer.chat_template")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return (config, template if isinstance(template, str) else None, [] if eos is None else [int(eos)], {},
            None if bos is None else int(bos))  # fmt: skip


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a query/key projection's rows (per head: the two
    rotary halves interleaved back into Hugging Face's half-split order)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def read_gguf_weights(path: Path, reader=None) -> dict[str, torch.Tensor]:
    """Every tensor, dequantised to float32, under its Hugging Face Llama name."""
    import gguf

    reader = reader or _reader(path)
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv_head = int(_field(reader, "llama.attention.head_count_kv", n_head))
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UserError(f"{path}: tensor {tensor.name} has type {kind}, which is not supported; "
                            f"supported: {', '.join(SUPPORTED_TYPES)}.")  # fmt: skip
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise UserError(f"{path}: tensor {tensor.name} ({kind}) cannot be read ({e}).") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        weight = torch.from_numpy(
            np.array(values, dtype=np.float32).reshape(shape)
        )  # a copy: the file stays read-only
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, n_head)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, n_kv_head)
        out[name] = weight
    return out


def _hf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    block, _, rest = name.partition(".")
    layer, _, leaf = rest.partition(".")
    if block == "blk" and leaf in GGUF_LAYER_NAMES:
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[leaf]}"
    return name  # (an unexpected tensor: the model's own check names it)


# Byte-level BPE vocabularies whose pre-tokenizer is GPT-2's (what transformers builds for them)
GPT2_STYLE = ("default", "gpt2", "gpt-2", "smollm")
CONTROL = 3  # tokenizer.ggml.token_type of special tokens (<|im_end|>, ...)


def load_gguf_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer described by the GGUF metadata, built as transformers builds it: byte-level
    BPE vocabularies directly with `tokenizers`, other kinds through transformers."""
    path = Path(path)
    reader = _reader(path)
    if (
        _field(reader, "tokenizer.ggml.model") == "gpt2"
        and _field(reader, "tokenizer.ggml.pre", "default") in GPT2_STYLE
    ):
        return _byte_level_bpe(reader)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(
            f"Reading the tokenizer of {path} needs transformers: pip install 'lmforge[gguf]'."
        ) from None
    try:
        fast = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: its tokenizer cannot be read ({e}).") from None
    return TextTokenizer(fast.backend_tokenizer, kind="bpe")


def _byte_level_bpe(reader) -> TextTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types, strict=True)
                            if kind == CONTROL])  # fmt: skip
    return TextTokenizer(tok, kind="bpe")


def import_gguf(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TextTokenizer, Config]:
    """A GGUF file as an lmforge GPT (eval mode, float32), its tokenizer and Config."""
    from lmforge.interop.hf import llama_to_lmforge
    from lmforge.models import build_model
    from lmforge.weights import load_state

    path = Path(path)
    config = read_gguf_metadata(path)[0]
    tensors = read_gguf_weights(path)
    try:
        converted = llama_to_lmforge(tensors, config.model)
    except KeyError as e:
        raise UserError(
            f"{path}: tensor {e.args[0]} is missing; the file does not hold a whole model."
        ) from None
    model = build_model(config.model)
    load_state(converted, model, str(path))
    return model.float().to(device).eval(), load_gguf_tokenizer(path), config


# ---- export ---------------------------------------------------------------------------------

EXPORT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a query/key projection (the inverse of `_unpermute`)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _vocabulary(tokenizer: TextTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, token types, merges and pre-tokenizer name of the tokenizer as llama.cpp's byte-level BPE
    (a byte-level BPE tokenizer as it is; a character tokenizer as a BPE whose merges only join the bytes
    of each character, so that every character is one token as in lmforge)."""
    import json

    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    elif tokenizer.kind == "char":
        to_bytes = _byte_characters()
        special = {added["content"] for added in spec.get("added_tokens", [])}
        vocab, merges = {}, []
        for token, index in model["vocab"].items():
            if token in special:
                vocab[token] = index
                continue
            pieces = [to_bytes[b] for b in token.encode("utf-8")]
            vocab["".join(pieces)] = index
            for i in range(1, len(pieces)):  # the bytes of a character join left to right
                merges.append(f"{''.join(pieces[:i])} {pieces[i]}")
        # llama.cpp needs a merge list: one that never applies (byte 0xff twice is never UTF-8 text)
        merges = merges or [f"{to_bytes[255]} {to_bytes[255]}"]
    else:
        raise UserError("GGUF export needs a byte-level BPE or a character tokenizer (data.tokenizer bpe or char, "
                        "or an imported GPT-2/Llama-3/SmolLM tokenizer); this model's tokenizer is neither.")  # fmt: skip
    tokens = [""] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    types = [1] * vocab_size  # normal
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # control / user-defined
    for i, token in enumerate(tokens):
        if token == "":  # the model's vocabulary is larger than the tokenizer's: unused slots
            tokens[i], types[i] = f"[PAD{i}]", 5
    return tokens, types, merges, "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex


def _byte_characters() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (what byte-level BPE vocabularies are written in)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# lmforge's GPT layouts and the llama.cpp architecture that computes each (biases lmforge leaves out
# are written as zeros, so the arithmetic is the same):
#   llama  rotary positions, RMSNorm, SwiGLU, no biases (Llama, SmolLM, imported models)
#   gpt2   learned positions, LayerNorm, GELU, one fused query|key|value projection (the GPT-2 presets:
#          nanogpt-cpu-baseline, shakespeare-bpe, tiny); llama.cpp's GELU is the tanh form
#   jais2  rotary positions (the NeoX halves, as lmforge rotates), LayerNorm, ReLU², no QK-norm (the
#          default preset, shakespeare-char)
EXPORT_ARCHITECTURES = ("llama", "gpt2", "jais2")


def gguf_architecture(m) -> str:
    """The llama.cpp architecture of an lmforge model config, or one error naming what none of them has."""
    from lmforge.interop.hf import hf_config_from_model

    plain = m.arch == "gpt" and m.logit_softcap == 0.0 and not m.qk_norm and m.norm == "layernorm"
    if (
        plain
        and m.pos_encoding == "learned"
        and m.activation in ("gelu", "gelu_tanh")
        and m.n_kv_head in (0, m.n_head)
    ):
        return "gpt2"
    if plain and m.pos_encoding == "rope" and m.activation == "relu2":
        return "jais2"
    try:
        if hf_config_from_model(m)["model_type"] == "llama":
            return "llama"
    except UserError:
        pass
    shape = f"{m.pos_encoding} positions, {m.norm}, {m.activation}" + (", QK-norm" if m.qk_norm else "")
    shape += ", logit soft-capping" if m.logit_softcap else ""
    raise UserError(f"GGUF export writes the layouts llama.cpp runs (llama: rope, rmsnorm, swiglu; gpt2: learned "
                    f"positions, layernorm, gelu; jais2: rope, layernorm, relu2, no QK-norm); this model has "
                    f"{shape}: export it with the Hugging Face format instead.")  # fmt: skip


def export_gguf(model: nn.Module, tokenizer: TextTokenizer, config: Config, out: str | Path,
                quantize: str = "f32", chat_template: str | None = None, eos_ids: tuple[int, ...] = ()) -> Path:  # fmt: skip
    """Write a model as one GGUF file that llama.cpp and Ollama run (and transformers loads, for llama).

    Norm weights and biases stay float32; matrices are stored as `quantize` (f32, f16, bf16, q8_0,
    q4_0 or q4_1). The architecture follows the model's layout (`gguf_architecture`).
    """
    import gguf

    from lmforge.io import atomic_write
    from lmforge.weights import unique_state_dict

    if quantize not in EXPORT_TYPES:
        raise UserError(
            f"Unknown GGUF type {quantize!r}; use one of {', '.join(EXPORT_TYPES)}.", settings=("quantize",)
        )
    m = config.model
    arch = gguf_architecture(m)
    tokens, types, merges, pre = _vocabulary(tokenizer, m.vocab_size)
    sd = {k: v.float() for k, v in unique_state_dict(model).items()}
    head_dim = m.n_embd // m.n_head
    kind = gguf.GGMLQuantizationType[EXPORT_TYPES[quantize]]
    tensors = _gguf_tensors(sd, m) if arch == "llama" else _layernorm_tensors(sd, m, arch)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(config.name)
        w.add_context_length(m.block_size)
        w.add_embedding_length(m.n_embd)
        w.add_block_count(m.n_layer)
        w.add_feed_forward_length(m.mlp_hidden or int(m.mlp_ratio * m.n_embd))
        w.add_head_count(m.n_head)
        w.add_head_count_kv(m.n_kv_head or m.n_head)
        if m.pos_encoding == "rope":
            w.add_rope_freq_base(m.rope_theta)
            w.add_rope_dimension_count(head_dim)
        if arch == "llama":
            w.add_layer_norm_rms_eps(m.norm_eps)
        else:
            w.add_layer_norm_eps(m.norm_eps)
        w.add_vocab_size(m.vocab_size)
        w.add_file_type(
            gguf.LlamaFileType[f"MOSTLY_{EXPORT_TYPES[quantize]}"]
            if quantize != "f32"
            else gguf.LlamaFileType.ALL_F32
        )
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        ends = list(eos_ids) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
        if ends:
            w.add_eos_token_id(ends[0])
            w.add_bos_token_id(tokenizer.eot_id if tokenizer.eot_id is not None else ends[0])
        w.add_add_bos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        for name, weight in tensors:
            data = weight.numpy()
            if data.ndim == 2 and kind != gguf.GGMLQuantizationType.F32 and name != "position_embd.weight":
                w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
            else:
                w.add_tensor(name, data)
        _finish(w)

    out = Path(out)
    atomic_write(out, write)
    return out


def _layernorm_tensors(sd: dict[str, torch.Tensor], m, arch: str) -> list[tuple[str, torch.Tensor]]:
    """lmforge's GPT tensors under llama.cpp's gpt2 or jais2 names (zero biases where lmforge has none;
    jais2 takes the queries, keys and values apart)."""
    from lmforge.interop.hf import _with_zero_biases

    sd = _with_zero_biases(sd, m)
    out = [("token_embd.weight", sd["wte.weight"])]
    if arch == "gpt2":
        out.append(("position_embd.weight", sd["wpe.weight"]))
    out += [("output_norm.weight", sd["ln_f.weight"]), ("output_norm.bias", sd["ln_f.bias"]),
            ("output.weight", sd.get("lm_head.weight", sd["wte.weight"]))]  # fmt: skip
    head_dim = m.n_embd // m.n_head
    widths = [m.n_head * head_dim, (m.n_kv_head or m.n_head) * head_dim, (m.n_kv_head or m.n_head) * head_dim]
    for i in range(m.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for p in ("weight", "bias"):
            out += [(g + f"attn_norm.{p}", sd[b + f"ln_1.{p}"]), (g + f"attn_output.{p}", sd[b + f"attn.c_proj.{p}"]),
                    (g + f"ffn_norm.{p}", sd[b + f"ln_2.{p}"]), (g + f"ffn_up.{p}", sd[b + f"mlp.c_fc.{p}"]),
                    (g + f"ffn_down.{p}", sd[b + f"mlp.c_proj.{p}"])]  # fmt: skip
            qkv = sd[b + f"attn.c_attn.{p}"]
            if arch == "gpt2":
                out.append((g + f"attn_qkv.{p}", qkv))
            else:
                for name, part in zip(("attn_q", "attn_k", "attn_v"), qkv.split(widths), strict=True):
                    out.append((g + f"{name}.{p}", part.contiguous()))
    return [(name, t.contiguous()) for name, t in out]


def _finish(w) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_tensors(sd: dict[str, torch.Tensor], m) -> list[tuple[str, torch.Tensor]]:
    """A Llama-shaped model's tensors under their GGUF names, queries and keys in llama.cpp's order."""
    from lmforge.interop.hf import lmforge_to_hf

    tensors = lmforge_to_hf(sd, m, "llama")
    theirs = {hf: ours for ours, hf in GGUF_NAMES.items()}
    layer = {hf: ours for ours, hf in GGUF_LAYER_NAMES.items()}
    out = []
    for name, weight in tensors.items():
        if name in theirs:
            out.append((theirs[name], weight))
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.N.<rest>
        if rest == "self_attn.q_proj.weight":
            weight = _permute(weight, m.n_head)
        elif rest == "self_attn.k_proj.weight":
            weight = _permute(weight, m.n_kv_head or m.n_head)
        out.append((f"blk.{index}.{layer[rest]}", weight.contiguous()))
    return out


def export_gguf_lora(checkpoint, out: str | Path) -> Path:
    """Write the LoRA adapters of a `lmforge finetune --lora-rank` run (its adapter.safetensors) as a
    GGUF LoRA adapter, which llama.cpp applies on top of the base's GGUF export (`llama-cli -m
    base.gguf --lora adapter.gguf`; llama-cpp-python's `lora_path`). A fused query/key/value adapter
    becomes three (one A, B cut by rows), queries' and keys' rows in llama.cpp's order as in the base."""
    import gguf

    from lmforge.adapters.peft import hf_modules
    from lmforge.interop.hf import hf_config_from_model
    from lmforge.io import atomic_write
    from lmforge.weights import read_tensors

    m, ft = checkpoint.config.model, checkpoint.config.finetune
    if not (checkpoint.path / "adapter.safetensors").is_file():
        raise UserError(f"{checkpoint.path} holds no LoRA adapters (adapter.safetensors); --lora exports the "
                        f"adapters of a `lmforge finetune --lora-rank` run.")  # fmt: skip
    try:
        llama = hf_config_from_model(m)["model_type"] == "llama"
    except UserError:
        llama = False
    names = hf_modules(m) if llama else None
    if names is None:
        raise UserError("A GGUF LoRA adapter needs a Llama-shaped base (what GGUF export takes); this run's base "
                        "is not one: export its adapters in PEFT's format (the run folder) instead.")  # fmt: skip
    adapters = read_tensors(checkpoint.path / "adapter.safetensors")
    layer_names = {hf: ours for ours, hf in GGUF_LAYER_NAMES.items()}
    tensors = []
    for key in sorted(k for k in adapters if k.endswith(".lora_A")):
        module = key.removesuffix(".lora_A")
        a, b = adapters[key].float(), adapters[f"{module}.lora_B"].float()
        for hf_name, rows in names[module]:
            part = b if rows is None else b[rows]
            _, _, index, rest = hf_name.split(".", 3)  # model.layers.N.<rest>
            if rest == "self_attn.q_proj":
                part = _permute(part, m.n_head)
            elif rest == "self_attn.k_proj":
                part = _permute(part, m.n_kv_head or m.n_head)
            name = f"blk.{index}.{layer_names[rest + '.weight']}"
            tensors += [(f"{name}.lora_a", a.contiguous()), (f"{name}.lora_b", part.contiguous())]

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type("adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ft.lora_alpha))
        for name, tensor in tensors:
            w.add_tensor(name, tensor.numpy())
        _finish(w)

    out = Path(out)
    atomic_write(out, write)
    return out
