"""An encoder–decoder Transformer (translation, summarization), in one file.

    source ─▶ embedding (+ positions) ─▶ n_encoder_layer × [ x + self_attn(norm(x)) ; x + mlp(norm(x)) ]
           ─▶ norm ─▶ memory                                        (bidirectional, padding masked)
    target ─▶ embedding (+ positions) ─▶ n_layer × [ y + causal_self_attn(norm(y))
                                                     ; y + cross_attn(norm(y), memory)
                                                     ; y + mlp(norm(y)) ]
           ─▶ norm ─▶ linear head (tied to the embedding or not) ─▶ next-token logits

One vocabulary serves both sides (a joint BPE), so the source and target embeddings are one
matrix. Positions are learned, sinusoidal, or rotary (RoPE, in the self-attention of both sides;
cross-attention has no order of its own); optionally a norm right after the embeddings and
embeddings scaled by sqrt(width) (mBART's layout, so that mBART checkpoints import exactly).
Pre-norm blocks (drawn above), or with `model.post_norm` the norm after each residual sum and no
final norm (`x = norm(x + attn(x))`: BART's and Marian's layout); `model.logits_bias` adds a bias to
the head (their final_logits_bias). LayerNorm or RMSNorm, the MLP activations of `gpt.py`, whose
parts (norms, MLP, rotary and sinusoidal tables) are reused here.

With `model.copy_attention` the decoder may also copy a source token (a pointer-generator, See et
al. 2017): one more attention from the final hidden state over the encoded source gives a
distribution over the source's positions, scattered onto their tokens, and a learned gate g mixes

    p(token) = g * softmax(logits)(token) + (1 - g) * sum of the copy attention on positions holding token

The model then returns log p in place of logits (softmax(log p) = p, so the loss, greedy and beam
search use it unchanged). Titles and summaries reuse the source's words: copying them is learned
in far fewer steps than producing them from the vocabulary.

Decoding keeps a `Seq2SeqCache`: each decoder layer's self-attention keys and values (filled one
token at a time) and its cross-attention keys and values of the encoded source (computed once):
a step then costs one token's work instead of the whole prefix's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.gpt import (
    MLP,
    SINUSOIDAL,
    apply_rotary,
    init_gpt2,
    make_norm,
    rotary_tables,
    sinusoidal_table,
)
from lmforge.models.registry import register


def relative_buckets(
    distance: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact buckets for short distances, logarithmic
    ones up to `max_distance` (farther shares the last); with `bidirectional` (the encoder) half the
    buckets are for keys after the query, else (the decoder) only keys before it count."""
    bucket = torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        bucket += (distance > 0).long() * buckets
        n = distance.abs()
    else:
        n = (-distance).clamp_min(0)
    exact = buckets // 2
    far = (
        exact
        + (
            torch.log(n.float().clamp_min(1) / exact) / math.log(max_distance / exact) * (buckets - exact)
        ).long()
    )
    return bucket + torch.where(n < exact, n, far.clamp_max(buckets - 1))


class Seq2SeqCache:
    """Decoder state for generation: self-attention keys/values of the target so far (slots filled
    left to right) and cross-attention keys/values of the source, with the source's padding mask."""

    def __init__(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], source_mask: torch.Tensor,
                 capacity: int, n_head: int, head_dim: int, source: torch.Tensor | None = None,
                 copy_keys: torch.Tensor | None = None):  # fmt: skip
        batch, dtype, device = source_mask.shape[0], cross_k[0].dtype, cross_k[0].device
        shape = (len(cross_k), batch, n_head, capacity, head_dim)
        # Slots past `length` are never read (attention sees the first `length` only): no zeroing.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.cross_k, self.cross_v, self.source_mask = cross_k, cross_v, source_mask
        self.source, self.copy_keys = source, copy_keys  # copy attention: source ids and their keys
        self.capacity, self.length = capacity, 0

    def _filled_rows(self, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        kept = cache.new_empty((cache.shape[0], len(index), *cache.shape[2:]))
        # only the filled slots copied (a short output in a long capacity costs little), straight into
        # place: 5x faster than assigning the selected rows (beam search at 128 rows: 2.0 -> 0.4 ms a call)
        torch.index_select(cache[:, :, :, : self.length], 1, index, out=kept[:, :, :, : self.length])
        return kept

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep the rows `index` (finished rows leaving, beam search's survivors). `same_sources`:
        every row keeps a row of its own source (beams moving among the beams of one source), so
        the cross-attention keys and values, the same for all of them, stay where they are."""
        self.k, self.v = self._filled_rows(self.k, index), self._filled_rows(self.v, index)
        if same_sources:
            return
        self.cross_k = [k.index_select(0, index) for k in self.cross_k]
        self.cross_v = [v.index_select(0, index) for v in self.cross_v]
        self.source_mask = self.source_mask.index_select(0, index)
        if self.source is not None:
            self.source = self.source.index_select(0, index)
            self.copy_keys = self.copy_keys.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention. Self-attention takes queries, keys and values from `x`;
    cross-attention takes keys and values from the encoded source (`memory`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dropout
        self.scale = cfg.attn_scale or None  # None: SDPA's 1/sqrt(head_dim)
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.is_residual_projection = True

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Attend from `x` to the heads `k`, `v` (already rotated when `rope` is used)."""
        q = self.heads(self.q(x))
        if rope is not None:
            q = apply_rotary(q, *rope)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )  # fmt: skip
        B, _, T, _ = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = make_norm(cfg), Attention(cfg), make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.post_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope) -> torch.Tensor:
        h = x if self.post_norm else self.ln_1(x)
        k, v = self.attn.keys_values(h)
        if rope is not None:
            k = apply_rotary(k, *rope)
        x = x + self.drop(self.attn(h, k, v, mask, rope=rope))
        if self.post_norm:  # BART's and Marian's order: the norm after each residual sum
            x = self.ln_1(x)
            return self.ln_2(x + self.drop(self.mlp(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln_2, self.cross = make_norm(cfg), Attention(cfg)
        self.ln_3, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.post_norm

    def _sublayer(self, y: torch.Tensor, norm: nn.Module, layer) -> torch.Tensor:
        """y + layer(norm(y)) (pre-norm), or norm(y + layer(y)) (post-norm)."""
        if self.post_norm:
            return norm(y + self.drop(layer(y)))
        return y + self.drop(layer(norm(y)))

    def forward(self, y: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, source_mask: torch.Tensor,
                rope, cache: Seq2SeqCache | None = None, layer: int = 0,
                self_bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`self_bias`: relative positions' bias (causal mask included) added to self-attention's scores."""

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.attn.keys_values(h)
            if rope is not None:
                k = apply_rotary(k, *rope)
            causal = True
            if cache is not None:  # append this step's keys/values, attend to all so far
                start, T = cache.length, h.shape[1]
                cache.k[layer, :, :, start : start + T], cache.v[layer, :, :, start : start + T] = k, v
                k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
                causal = start == 0  # one new token after cached ones sees them all
                if start > 0 and T > 1:
                    raise ValueError("several new tokens after a non-empty cache are not supported")
            if self_bias is not None:
                return self.attn(h, k, v, mask=self_bias.to(h.dtype))
            return self.attn(h, k, v, causal=causal and h.shape[1] > 1, rope=rope)

        y = self._sublayer(y, self.ln_1, self_attention)
        y = self._sublayer(y, self.ln_2, lambda h: self.cross(h, cross_k, cross_v, source_mask))
        return self._sublayer(y, self.ln_3, self.mlp)


@register("seq2seq")
class Seq2Seq(nn.Module):
    """Encoder–decoder Transformer; `model.block_size` bounds the target, `model.source_block_size`
    the source (0 = block_size), `model.n_encoder_layer` the encoder's depth (0 = n_layer)."""

    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.block_size = cfg.block_size
        self.source_block_size = cfg.source_block_size or cfg.block_size
        longest = max(self.block_size, self.source_block_size)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # both sides: one joint vocabulary
        if (
            cfg.source_vocab_size
        ):  # ... or the targets' only, the sources having their own (some Marian models)
            self.source_wte = nn.Embedding(cfg.source_vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.source_wpe = nn.Embedding(self.source_block_size, cfg.n_embd)
            self.target_wpe = nn.Embedding(self.block_size, cfg.n_embd)
        elif cfg.pos_encoding in SINUSOIDAL:
            table = sinusoidal_table(longest, cfg.n_embd, cfg.pos_encoding == "sinusoidal_halves")
            self.register_buffer("pos_table", table, persistent=False)
        elif cfg.pos_encoding == "relative":  # T5: a learned bias per head for each bucket of distances
            self.source_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
            self.target_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
        else:
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, longest, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.embedding_norm:
            self.source_norm, self.target_norm = make_norm(cfg), make_norm(cfg)
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.scale_embedding else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layer or cfg.n_layer))
        # Post-norm blocks end normalised: no final norm (BART, Marian).
        self.ln_enc = nn.Identity() if cfg.post_norm else make_norm(cfg)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.Identity() if cfg.post_norm else make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.logits_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.copy_attention:  # the pointer-generator: where to copy from, and how much
            self.copy_query = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
            self.copy_key = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
            self.copy_gate = nn.Linear(cfg.n_embd, 1)
        # GPT-2's initialisation, residual projections scaled by the depth they add to.
        self.apply(
            lambda module: init_gpt2(module, 0.02 / math.sqrt(2 * (len(self.encoder) + len(self.decoder))))
        )

    def _embed(self, ids: torch.Tensor, start: int, side: str):
        """Token embeddings plus absolute positions (or the rotary angles) from `start`."""
        T = ids.shape[1]
        table = self.source_wte if side == "source" and self.config.source_vocab_size else self.wte
        x, rope = table(ids) * self.embed_scale, None
        positions = torch.arange(start, start + T, device=ids.device)
        if self.config.pos_encoding == "learned":
            x = x + (self.source_wpe if side == "source" else self.target_wpe)(positions)
        elif self.config.pos_encoding in SINUSOIDAL:
            x = x + self.pos_table[positions]
        elif self.config.pos_encoding == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        if self.config.embedding_norm:
            x = (self.source_norm if side == "source" else self.target_norm)(x)
        return self.drop(x), rope

    def _relative_bias(
        self, table: nn.Embedding, start: int, T: int, S: int, bidirectional: bool
    ) -> torch.Tensor:
        """T5's position bias (1, heads, T, S) of queries at start .. start+T-1 over keys 0 .. S-1."""
        device = table.weight.device
        distance = (
            torch.arange(S, device=device)[None, :] - torch.arange(start, start + T, device=device)[:, None]
        )
        buckets = relative_buckets(distance, bidirectional, self.config.relative_buckets,
                                   self.config.relative_max_distance)  # fmt: skip
        return table(buckets).permute(2, 0, 1)[None]

    def encode(self, source: torch.Tensor, source_valid: torch.Tensor) -> torch.Tensor:
        """The encoded source (B, S, n_embd); `source_valid` (B, S) is False on padding."""
        if source.shape[1] > self.source_block_size:
            raise ValueError(f"source of {source.shape[1]} tokens is longer than {self.source_block_size}")
        x, rope = self._embed(source, 0, "source")
        mask = source_valid[:, None, None, :]
        if self.config.pos_encoding == "relative":  # the bias, with -inf on padding
            S = source.shape[1]
            mask = self._relative_bias(self.source_bias, 0, S, S, True).masked_fill(~mask, float("-inf"))
        for block in self.encoder:
            x = block(x, mask, rope)
        return self.ln_enc(x)

    def new_cache(self, memory: torch.Tensor, source_valid: torch.Tensor, capacity: int | None = None,
                  source: torch.Tensor | None = None) -> Seq2SeqCache:  # fmt: skip
        """An empty decoder cache for the encoded `memory`: its cross-attention keys and values, once
        (and with copy attention the source ids, which it needs, and their copy keys)."""
        pairs = [block.cross.keys_values(memory) for block in self.decoder]
        cfg = self.config
        copy_keys = self._copy_keys(memory, source)
        return Seq2SeqCache([k for k, _ in pairs], [v for _, v in pairs], source_valid[:, None, None, :],
                            capacity or self.block_size, cfg.n_head, cfg.n_embd // cfg.n_head,
                            source if copy_keys is not None else None, copy_keys)  # fmt: skip

    def _copy_keys(self, memory: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor | None:
        if not self.config.copy_attention:
            return None
        if source is None:
            raise ValueError("a model with copy attention needs the source token ids to decode")
        return self.copy_key(memory)

    def _copy_mix(self, h: torch.Tensor, logits: torch.Tensor, source: torch.Tensor, copy_keys: torch.Tensor,
                  source_mask: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """log(g * softmax(logits) + (1 - g) * copy attention scattered onto the source's tokens);
        `logits` are those of the `scored` positions of `h` only, when they are given."""
        scores = self.copy_query(h).float() @ copy_keys.float().transpose(1, 2) / math.sqrt(h.shape[-1])
        where = scores.masked_fill(~source_mask[:, 0], float("-inf")).softmax(-1)  # (B, T, S)
        tokens = source[:, None, :].expand_as(where)
        if scored is not None:
            where, tokens, h = where[scored], tokens[scored], h[scored]
        gate = torch.sigmoid(self.copy_gate(h).float())  # the share generated, not copied
        mixed = (gate * logits.float().softmax(-1)).scatter_add(-1, tokens, (1 - gate) * where)
        # A floor keeps log finite where a probability underflows (label smoothing sums every log p).
        return mixed.clamp_min(1e-30).log()

    def decode(self, target: torch.Tensor, memory: torch.Tensor | None = None, source_valid: torch.Tensor | None = None,
               cache: Seq2SeqCache | None = None, source: torch.Tensor | None = None,
               scored: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Next-token logits (B, T, vocab) for the target tokens, given the memory or a cache; with
        copy attention log-probabilities, and `source` (the ids) is needed when there is no cache.
        `scored` (B, T), when given, keeps the rows of those positions only: (N, vocab)."""
        start = cache.length if cache is not None else 0
        if start + target.shape[1] > self.block_size:
            raise ValueError(f"target of {start + target.shape[1]} tokens is longer than {self.block_size}")
        y, rope = self._embed(target, start, "target")
        if cache is None:
            pairs = [block.cross.keys_values(memory) for block in self.decoder]
            mask = source_valid[:, None, None, :]
        bias = None
        if self.config.pos_encoding == "relative":
            T = target.shape[1]
            bias = self._relative_bias(self.target_bias, start, T, start + T, False)
            future = torch.ones(T, start + T, dtype=torch.bool, device=y.device).tril(start).logical_not()
            bias = bias.masked_fill(future, float("-inf"))
        for i, block in enumerate(self.decoder):
            if cache is not None:
                y = block(y, cache.cross_k[i], cache.cross_v[i], cache.source_mask, rope, cache, i, bias)
            else:
                y = block(y, *pairs[i], mask, rope, self_bias=bias)
        if cache is not None:
            cache.length += target.shape[1]
        h = self.ln_f(y)
        if self.config.scale_decoder_output:  # T5 v1.0 scales what meets its (tied) head
            h = h * self.config.n_embd**-0.5
        logits = self.lm_head(h if scored is None else h[scored])  # the head is much of the work
        if not self.config.copy_attention:
            return logits
        if cache is not None:
            return self._copy_mix(h, logits, cache.source, cache.copy_keys, cache.source_mask, scored)
        return self._copy_mix(h, logits, source, self._copy_keys(memory, source), mask, scored)

    def forward(self, source: torch.Tensor, source_valid: torch.Tensor, target_in: torch.Tensor,
                targets: torch.Tensor | None = None, label_smoothing: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Teacher forcing. Without `targets`: logits (B, T, vocab) for every target position. With
        them: the logits of the scored positions only (target not -100; (N, vocab), so the head
        skips the padding) and their mean cross-entropy, label-smoothed by `label_smoothing`."""
        memory = self.encode(source, source_valid)
        if targets is None:
            return self.decode(target_in, memory, source_valid, source=source), None
        scored = targets != -100
        logits = self.decode(target_in, memory, source_valid, source=source, scored=scored)
        return logits, F.cross_entropy(logits.float(), targets[scored], label_smoothing=label_smoothing)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (
                self.source_wte.weight.numel() if self.config.source_vocab_size else 0
            )
        return n
