"""GPT: a decoder-only Transformer language model, in one file.

    tokens ─▶ embedding (+ learned or sinusoidal positions)
           ─▶ n_layer × [ x + attn(norm(x)) ; x + mlp(norm(x)) ]   (pre-norm blocks)
           ─▶ final norm ─▶ linear head (tied to the embedding or not) ─▶ logits

Options (all in `ModelConfig`): positions learned / sinusoidal / rotary (RoPE);
LayerNorm or RMSNorm; MLP activation GELU, GELU-tanh, ReLU² or SwiGLU;
grouped-query attention (`n_kv_head`); QK-norm; logit soft-capping; tied or
untied head. Attention runs through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.registry import register


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle for every (position, frequency) pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels (the Llama/NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


SINUSOIDAL = ("sinusoidal", "sinusoidal_halves")


def sinusoidal_table(length: int, dim: int, halves: bool = False) -> torch.Tensor:
    """The fixed positional encoding of 'Attention Is All You Need': sines and cosines interleaved,
    or (`halves`) the sines in the first half of the width and the cosines in the second (the layout
    of tensor2tensor, fairseq and Marian)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    sines, cosines = (
        (slice(0, (dim + 1) // 2), slice((dim + 1) // 2, dim))
        if halves
        else (slice(0, None, 2), slice(1, None, 2))
    )
    table[:, sines] = torch.sin(position * div)
    table[:, cosines] = torch.cos(position * div)[:, : dim // 2]
    return table


def init_gpt2(module: nn.Module, residual_std: float) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases 0; residual projections get `residual_std`
    (0.02 / sqrt(2 × blocks), so the residual stream's variance does not grow with depth; 0 = zeros)."""
    if isinstance(module, nn.Linear):
        std = residual_std if getattr(module, "is_residual_projection", False) else 0.02
        nn.init.normal_(module.weight, mean=0.0, std=std) if std else nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class KVCache:
    """Preallocated keys and values of every layer, for generation without recomputation.

    Slots are filled left to right; `valid` marks slots that hold real tokens (left
    padding does not). When a RoPE model's text outgrows the cache, the oldest slots
    are dropped (a sliding window): rotary attention depends only on relative positions.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        capacity: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (n_layer, batch, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0
        self.padded = False  # whether any slot is masked (then attention needs an explicit mask)

    def make_room(self, n: int) -> None:
        """Drop the oldest slots so that `n` more fit."""
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit in a cache of {self.capacity}")
        drop = self.length + n - self.capacity
        if drop > 0:
            keep = self.length - drop
            self.k[:, :, :, :keep] = self.k[:, :, :, drop : self.length].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, drop : self.length].clone()
            self.valid[:, :keep] = self.valid[:, drop : self.length].clone()
            self.valid[:, keep:] = False
            self.length = keep

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (drafted tokens that were refused)."""
        self.valid[:, length:] = False
        self.length = min(self.length, length)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)

    @classmethod
    def joined(cls, parts: list[tuple[KVCache, torch.Tensor]], room: int, batch: int = 0) -> KVCache:
        """One cache holding the rows `rows` of each `(cache, rows)` part, in order, with `room`
        free slots after the longest (continuous batching: sequences join and leave a running
        batch), and at least `batch` rows (spare rows for sequences that join later: see
        `place`, `narrowed`). Rows are right-aligned, so every row's next token goes in the same
        slot; slots that are padding for every kept row of a part are dropped."""
        spans = []
        for cache, rows in parts:
            used = cache.valid[rows, : cache.length].any(0).nonzero()
            first = int(used[0]) if len(used) else cache.length
            spans.append((first, cache.length))
        length = max(end - first for first, end in spans)
        sample = parts[0][0]
        n_layer, _, n_kv_head, _, head_dim = sample.k.shape
        batch = max(batch, sum(len(rows) for _, rows in parts))
        out = cls(n_layer, batch, n_kv_head, length + room, head_dim, sample.k.device, sample.k.dtype)
        row = 0
        for (cache, rows), (first, end) in zip(parts, spans, strict=True):
            n, start = len(rows), length - (end - first)
            out.k[:, row : row + n, :, start:length] = cache.k[:, rows, :, first:end]
            out.v[:, row : row + n, :, start:length] = cache.v[:, rows, :, first:end]
            out.valid[row : row + n, start:length] = cache.valid[rows, first:end]
            row += n
        out.length = length
        out.padded = True
        return out

    def narrowed(self, rows: int) -> KVCache:
        """The first `rows` rows as a cache of their own, sharing this one's memory (a view:
        what a forward pass writes lands here; copy its `length` back afterwards)."""
        view = copy.copy(self)
        view.k, view.v, view.valid = self.k[:, :rows], self.v[:, :rows], self.valid[:rows]
        return view

    def fits(self, tokens: int, room: int) -> bool:
        """Whether a sequence of `tokens` cached tokens, right-aligned, and `room` more fit."""
        return tokens <= self.length and self.length + room <= self.capacity

    def place(self, row: int, source: KVCache, source_row: int) -> None:
        """Put the valid slots of row `source_row` of `source` into row `row`, right-aligned.
        Padding inside the source row (a reused prefix, then the rest of its prompt) is left
        out: cached keys carry their positions, so only which slots are valid matters."""
        slots = source.valid[source_row, : source.length].nonzero().squeeze(1)
        n = len(slots)
        if n > self.length:
            raise ValueError(f"a row of {n} cached tokens does not fit beside rows of {self.length}")
        at = self.length - n
        self.k[:, row, :, at : self.length] = source.k[:, source_row].index_select(2, slots)
        self.v[:, row, :, at : self.length] = source.v[:, source_row].index_select(2, slots)
        self.valid[row] = False
        self.valid[row, at : self.length] = True
        self.padded = True

    def move_row(self, source_row: int, row: int) -> None:
        """Copy row `source_row` over row `row` (a finished sequence's row is reused)."""
        self.k[:, row] = self.k[:, source_row]
        self.v[:, row] = self.v[:, source_row]
        self.valid[row] = self.valid[source_row]

    def unused_prefix(self, rows: int) -> int:
        """How many leading slots are padding in every one of the first `rows` rows."""
        used = self.valid[:rows, : self.length].any(0).nonzero()
        return int(used[0]) if len(used) else self.length


def attention_mask_for(cache: KVCache | None, new_valid: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query i (slot start+i) sees valid slots up to its own."""
    T = new_valid.shape[1]
    start = 0 if cache is None else cache.length
    keys_valid = new_valid if cache is None else cache.valid[:, : start + T]
    S = keys_valid.shape[1]
    query_slot = torch.arange(start, start + T, device=new_valid.device)[:, None]
    causal = torch.arange(S, device=new_valid.device)[None, :] <= query_slot
    mask = causal[None, None] & keys_valid[:, None, None, :]
    # A padding query sees no valid key; let it see itself so its (unused) softmax has no NaN.
    own = torch.arange(S, device=new_valid.device)[None, :] == query_slot
    return mask | own[None, None]


_recording = threading.local()


@contextmanager
def recorded_attention() -> Iterator[list[torch.Tensor]]:
    """Within the block, attention run by this thread is computed unfused and each layer's
    probabilities (B, heads, T, S) are appended to the list, in the order the layers run.
    Other threads (a server's decoding worker) keep the fused kernel."""
    _recording.maps = maps = []
    try:
        yield maps
    finally:
        _recording.maps = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qk_norm = cfg.qk_norm
        self.qk_norm_kind = cfg.norm
        self.attn_fp32 = cfg.attn_fp32
        self.dropout = cfg.dropout
        qkv_width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_width, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.is_residual_projection = True

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rope)
        causal = mask is None
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            # A float32 cache under bfloat16 weights (the native decode step's) gives keys and values back
            # in the queries' precision, as they went in.
            k, v = (
                cache.k[layer, :, :, : start + T].to(q.dtype),
                cache.v[layer, :, :, : start + T].to(q.dtype),
            )
            causal = causal and start == 0  # one new token attends to every cached one
            if mask is None and start > 0 and T > 1:
                raise ValueError("several new tokens after a non-empty cache need an explicit mask")
        if self.attn_fp32 and q.dtype != torch.float32:
            # Under bf16 autocast the CPU's bf16 attention backward is slow and less exact:
            # do the softmax part in float32 and hand bf16 back to the projections.
            with torch.autocast(q.device.type, enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), causal, mask).to(x.dtype)
        else:
            y = self._attend(q, k.to(q.dtype), v.to(q.dtype), causal, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def queries_keys_values(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' queries, keys and values (B, heads, T, head_dim), normalised and rotated."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            # Normalise each head's query and key (no learned gain), with the model's norm kind:
            # LayerNorm has a fused kernel on every device, RMSNorm is composite on CPUs.
            if self.qk_norm_kind == "layernorm":
                q, k = F.layer_norm(q, (self.head_dim,)), F.layer_norm(k, (self.head_dim,))
            else:
                q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None
    ) -> torch.Tensor:
        recording = getattr(_recording, "maps", None)
        if recording is not None:  # `lmforge explain`: the probabilities themselves are wanted
            y, probabilities = self._attend_explicitly(q, k, v, causal, mask)
            recording.append(probabilities.detach())
            return y
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None and q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )

    def _attend_explicitly(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What scaled_dot_product_attention computes, step by step: the output and the probabilities."""
        if self.n_kv_head != self.n_head:  # grouped-query: query head h reads key/value head h // group
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        T, S = q.shape[2], k.shape[2]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif causal and T > 1:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probabilities = scores.softmax(dim=-1)
        return probabilities @ v, probabilities


GATED = ("swiglu", "geglu")  # the gated MLPs: activation(gate(x)) * up(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or int(cfg.mlp_ratio * cfg.n_embd)
        self.activation = cfg.activation
        if cfg.activation in GATED:
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.is_residual_projection = True
        self.c_gate_up: nn.Linear | None = None  # set by fuse_gate_up (inference)

    def fuse_gate_up(self) -> None:
        """For inference: a gated MLP's (SwiGLU's) gate and up projections as one product (rows: gate, then up), so
        that decoding makes one pass and one kernel call where it made two. The state dict changes
        (c_gate_up replaces c_gate and c_fc), so a fused model is for inference, not for saving."""
        if self.activation not in GATED or self.c_gate_up is not None:
            return
        gate, up = self.c_gate, self.c_fc
        fused = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None,
                          device=gate.weight.device, dtype=gate.weight.dtype)  # fmt: skip
        with torch.no_grad():
            fused.weight.copy_(torch.cat([gate.weight, up.weight]))
            if gate.bias is not None:
                fused.bias.copy_(torch.cat([gate.bias, up.bias]))
        self.c_gate_up = fused
        del self.c_gate, self.c_fc

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.activation == "swiglu" else F.gelu(x, approximate="tanh")  # geglu: T5 v1.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_gate_up is not None:
            gate, up = self.c_gate_up(x).chunk(2, dim=-1)
            h = self._gate(gate) * up
        elif self.activation in GATED:
            h = self._gate(self.c_gate(x)) * self.c_fc(x)
        elif self.activation == "relu":
            h = F.relu(self.c_fc(x))
        elif self.activation == "relu2":
            h = F.relu(self.c_fc(x)).square()
        elif self.activation == "gelu_tanh":
            h = F.gelu(self.c_fc(x), approximate="tanh")
        elif self.activation == "silu":
            h = F.silu(self.c_fc(x))
        else:
            h = F.gelu(self.c_fc(x))
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), rope, cache, layer, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


@register("gpt")
class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos_encoding in SINUSOIDAL:
            table = sinusoidal_table(cfg.block_size, cfg.n_embd, cfg.pos_encoding == "sinusoidal_halves")
            self.register_buffer("pos_table", table, persistent=False)
        else:
            head_dim = cfg.n_embd // cfg.n_head
            cos, sin = rotary_tables(head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        residual_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)
        self.apply(lambda module: init_gpt2(module, residual_std))
        # Training with targets of -100 (unscored) runs the head on the scored positions only (forward);
        # differentially private training turns that off: its per-example gradients need the batch axis.
        self.head_on_scored_only = True

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when `targets` are given.

        Targets of -100 are not scored (the prompt of an instruction, the padding): when some are,
        the head runs on the scored positions only and the logits are theirs, (N, vocab). The head
        is a fifth of a small model's work, and fine-tuning data scores only the replies.

        Generation passes a `cache` (new keys and values are appended to it), the
        absolute `positions` of the new tokens (B, T), an `attention_mask` (B, T)
        that is False for left padding, and `last_only` (logits of the last position
        only: a prompt's other positions would cost a vocabulary-wide product each).
        Training passes none of them.
        """
        hidden = self.hidden_states(idx, cache, positions, attention_mask)
        if last_only:
            hidden = hidden[:, -1:]
        if self.head_on_scored_only and targets is not None and not bool((targets != -100).all()):
            scored = targets != -100
            hidden, targets = hidden[scored], targets[scored]
        logits = self.lm_head(hidden)
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) of right-padded sequences, for a classification head.
        Causal attention never lets a real token see the padding after it, so no mask is needed."""
        return self.hidden_states(idx)

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = idx.shape
        if cache is None and T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.block_size})")
        if positions is None and (cache is not None or attention_mask is not None):
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x, rope = self.embed(idx, positions)

        mask = None
        if cache is not None:
            cache.make_room(T)
            new_valid = (
                attention_mask
                if attention_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=idx.device)
            )
            cache.valid[:, cache.length : cache.length + T] = new_valid
            cache.padded = cache.padded or not bool(new_valid.all())
            if cache.padded or (cache.length > 0 and T > 1):
                mask = attention_mask_for(cache, new_valid)
        elif attention_mask is not None:
            mask = attention_mask_for(None, attention_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def embed(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token embeddings (B, T, n_embd) with their positions, and the rotary cos/sin tables for
        attention (RoPE models). `positions` (B, T): absolute positions; None means 0..T-1."""
        B, T = idx.shape
        x = self.wte(idx)
        rope = None
        if positions is None and self.config.pos_encoding != "rope":
            # One row per sequence, not a broadcast one: DP-SGD's per-example gradients of the
            # position table need the batch dimension.
            positions = torch.arange(T, device=idx.device).expand(B, T)
        if self.config.pos_encoding == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos_encoding in SINUSOIDAL:
            x = x + self.pos_table[positions]
        elif positions is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # training: the precomputed table
        else:
            angles = positions[:, None, :, None].float() * self.rope_inv_freq  # (B, 1, T, head_dim/2)
            rope = (angles.cos(), angles.sin())
        return self.drop(x), rope

    def new_cache(self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` tokens (default: the context)."""
        cfg = self.config
        weight = self.wte.weight
        return KVCache(
            cfg.n_layer,
            batch,
            cfg.n_kv_head or cfg.n_head,
            capacity or self.block_size,
            cfg.n_embd // cfg.n_head,
            weight.device,
            # The native decode step (inference/native/decoding.py) keeps keys and values in float32 whatever the weights.
            dtype or (torch.float32 if getattr(self, "native_decoder", None) is not None else weight.dtype),
        )

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 × matmul parameters + attention (as in nanoGPT/PaLM)."""
        cfg = self.config
        matmul_params = self.num_params(embeddings=False)
        if cfg.tie_embeddings:  # the shared matrix is used again by the head
            matmul_params += cfg.vocab_size * cfg.n_embd
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
