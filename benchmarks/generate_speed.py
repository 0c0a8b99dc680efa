"""Generation speed: lmforge's KV-cache decoder against Hugging Face `generate()`.

Greedy decoding of 128 new tokens after a 16-token prompt, at batch 1 and batch 8, for
  gpt2-124m   a GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, vocab 50,257),
              random weights, the same shape in lmforge and in transformers
  tiny        the trained tiny-Shakespeare checkpoint (out/shakespeare-char, if present) next
              to a transformers GPT-2 of the same size
in float32 (and bfloat16 / int8 weight-only for lmforge; bf16 only where the CPU has it
natively). Prints tokens/s, the ratio to transformers, and the fraction of the
memory-bandwidth bound (weight bytes read per decoding step / measured bandwidth).
Results: benchmarks/results/generate_speed.json.

    pip install -e ".[bench]" && python benchmarks/generate_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS, PROMPT_TOKENS = 128, 16


def bandwidth_gbs(seconds: float = 2.0) -> float:
    """Measured memory read bandwidth: summing a 512 MB tensor."""
    a = torch.ones(128 * 1024 * 1024)
    a.sum()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a.sum()
        n += 1
    return n * a.numel() * 4 / (time.perf_counter() - start) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the matrices a decoding step reads whole: an embedding table counts only where the
    output head shares it (a step reads one row of it otherwise; int8 heads have their own copy)."""
    heads = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    seen = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)} - heads
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.dim() < 2:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lmforge_runner(model, batch: int):
    from lmforge.inference.generation import GenerationConfig, decode_steps

    prompts = torch.randint(
        0, model.config.vocab_size, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    ).tolist()
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eot=False)

    def run():
        for _ in decode_steps(model, prompts, cfg):
            pass

    return run


def hf_runner(model, batch: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    def run():
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default="out/shakespeare-char")
    parser.add_argument("--output", default=str(RESULTS / "generate_speed.json"))
    args = parser.parse_args()

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.config import ModelConfig
    from lmforge.device import cpu_has_bf16, set_threads
    from lmforge.inference.kernels import native_available
    from lmforge.inference.loading import fuse_projections, quantize_int8, use_blocked_matvec
    from lmforge.inference.native.decoding import attach
    from lmforge.models import build_model

    set_threads(0)
    transformers.logging.set_verbosity_error()
    bandwidth = bandwidth_gbs()
    print(f"memory read bandwidth here: {bandwidth:.1f} GB/s; bf16 native: {cpu_has_bf16()}")

    shapes = {"gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)}
    trained = None
    if (Path(args.checkpoint) / "model.safetensors").exists():
        from lmforge.training.checkpoint import load_checkpoint

        trained, _, tcfg = load_checkpoint(args.checkpoint)
        m = tcfg.model
        shapes["tiny"] = dict(
            vocab_size=m.vocab_size, block_size=256, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd
        )

    rows = []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=shape["vocab_size"],
                n_positions=shape["block_size"],
                n_layer=shape["n_layer"],
                n_head=shape["n_head"],
                n_embd=shape["n_embd"],
            )
        ).eval()
        if name == "tiny":
            ours = trained.eval()
        else:
            ours = build_model(ModelConfig(**shape, activation="gelu_tanh", bias=True)).eval()
        # What `lmforge generate` loads: float32 / bfloat16 / int8 weight-only, each with the
        # whole-step native decoder where it measures faster; and float32 decoded by PyTorch's
        # operators (the all-core matrix-vector products), as before the native float step.
        int8 = quantize_int8(fuse_projections(_copy(ours)))
        attach(int8)
        pytorch_step = use_blocked_matvec(fuse_projections(_copy(ours)))
        variants = [("float32 (PyTorch step)", pytorch_step), ("float32", _loaded(ours, torch.float32)),
                    ("int8", int8)]  # fmt: skip
        if cpu_has_bf16() or native_available():  # else emulated bf16: tens of times slower
            variants.append(("bfloat16", _loaded(ours, torch.bfloat16)))
        for batch in (1, 8):
            hf_time = time_it(hf_runner(hf, batch, shape["vocab_size"]), args.repeats)
            hf_tps = batch * NEW_TOKENS / hf_time
            rows.append(
                {
                    "model": name,
                    "impl": "transformers",
                    "precision": "float32",
                    "batch": batch,
                    "tokens_per_s": hf_tps,
                    "ratio": 1.0,
                    "bandwidth_fraction": weight_bytes(hf) * hf_tps / batch / (bandwidth * 1e9),
                }
            )
            print(f"  {name} batch {batch} transformers fp32: {hf_tps:.1f} tok/s", flush=True)
            for precision, model in variants:
                t = time_it(lmforge_runner(model, batch), args.repeats)
                tps = batch * NEW_TOKENS / t
                rows.append(
                    {
                        "model": name,
                        "impl": "lmforge",
                        "precision": precision,
                        "batch": batch,
                        "tokens_per_s": tps,
                        "ratio": tps / hf_tps,
                        "bandwidth_fraction": weight_bytes(model) * tps / batch / (bandwidth * 1e9),
                    }
                )
                print(
                    f"  {name} batch {batch} lmforge {precision}: {tps:.1f} tok/s ({tps / hf_tps:.2f}x)",
                    flush=True,
                )

    print(
        "\n| model | implementation | precision | batch | tokens/s | vs transformers | of bandwidth bound |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['impl']} | {r['precision']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
            f"{r['ratio']:.2f}x | {r['bandwidth_fraction']:.0%} |"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "benchmark": "generate_speed",
                "new_tokens": NEW_TOKENS,
                "prompt_tokens": PROMPT_TOKENS,
                "machine": {
                    **machine_info(),
                    "transformers": transformers.__version__,
                    "bandwidth_gbs": bandwidth,
                    "bf16_native": cpu_has_bf16(),
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {output}")


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).float()


def _loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy as `lmforge generate --dtype` loads it: the native decode step where it measures faster."""
    from lmforge.inference.loading import fuse_projections, use_blocked_matvec
    from lmforge.inference.native.decoding import attach

    copy = use_blocked_matvec(fuse_projections(_copy(model)).to(dtype))
    attach(copy)
    return copy


if __name__ == "__main__":
    sys.exit(main())
