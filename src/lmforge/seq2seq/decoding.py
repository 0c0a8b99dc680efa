"""Using encoder–decoder models: batched greedy and beam-search decoding, translate/summarize, the
Hugging Face-style pipelines, and BLEU/chrF/ROUGE evaluation on pairs.

    transduce(model, tokenizer, sources, GenerationConfig(num_beams=4))  -> list of outputs
    pipeline("translation", model=DIR)("How are you?")                 -> [{"translation_text": ...}]
    evaluate_pairs(DIR, "pairs.tsv")                                   -> BLEU and chrF, or ROUGE

Decoding encodes the sources once, then extends every row one token per step from a cache holding
the decoder's keys and values and the cross-attention keys and values of the encoded source.
Beam search keeps `beams` hypotheses per source; a hypothesis that ends is scored by its
log-probability divided by length**length_penalty (Hugging Face's convention: above 1 favours
longer outputs), and a source is done once `beams` hypotheses have ended (early stopping, as
fairseq and Hugging Face's `early_stopping=True` do). Greedy rows whose output has ended, and
sources whose search is over, leave the batch and its cache at once: the rest of the batch no
longer computes them until its longest output ends.

`no_repeat_ngram_size` n > 0 forbids a token that would repeat an n-gram the output already holds
(Hugging Face's setting of that name). Small models trained for minutes fall into loops ("the double
layer and the double layer and ...") that cost summaries their precision; summarization uses 3 by
default (`task_defaults`), as BART's summarization checkpoints do, translation 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import UserError
from lmforge.generation_config import GenerationConfig
from lmforge.inference.generation import ban_repeated_ngrams
from lmforge.seq2seq.training import PairTokens, as_pair_tokens, pad_sources, pair_tokens
from lmforge.tokenizers import TextTokenizer

# Hypotheses a decoding batch advances together when transduce's batch_size is 0: as many as
# fit DECODE_SOURCE_TOKENS tokens of source (the longest source times the rows: what cross-attention
# and its cache cost), at least DECODE_ROWS, at most MAX_DECODE_ROWS. Few rows make each step's
# products small and slow per row (32 rows ran at ~50 GMAC/s where 128-256 ran at ~80); since
# finished rows leave the batch, more rows no longer cost steps for rows that are done. Measured
# (2-core Zen 4, medians of 3, docs/performance.md): 1,000 Tatoeba sentences, greedy 1.65 s at 64
# rows, 1.32 at 128, 1.17 at 256, 1.23 at 512; beam 4 8.4 / 5.6 / 5.2 / 4.7 s. 300 arXiv abstracts
# (160 tokens): greedy 3.2 s at 32 rows, 3.3 at 64, 3.4 at 128, 4.2 at 256.
DECODE_ROWS = 64
MAX_DECODE_ROWS = 256
DECODE_SOURCE_TOKENS = 8192


def sources_per_batch(batch_size: int, beams: int, source_tokens: int = 0) -> int:
    """How many sources `transduce` decodes together (`batch_size`, or when 0: by DECODE_ROWS and
    the longest source's `source_tokens`; 0 when not known: DECODE_ROWS hypotheses)."""
    if batch_size < 0:
        raise UserError(f"batch_size must be at least 0 (0 = {DECODE_ROWS}-{MAX_DECODE_ROWS} hypotheses a batch, "
                        f"by source length), not {batch_size}.")  # fmt: skip
    if batch_size:
        return batch_size
    rows = DECODE_SOURCE_TOKENS // source_tokens if source_tokens else DECODE_ROWS
    return max(1, min(MAX_DECODE_ROWS, max(DECODE_ROWS, rows)) // max(1, beams))


# What `transduce` uses when given no settings: 4 beams, outputs up to the model's length.
DEFAULT_DECODING = GenerationConfig(num_beams=4, max_new_tokens=0)


@dataclass
class Seq2SeqConfig:
    """Deprecated: the decoding settings are GenerationConfig's (`num_beams`, `length_penalty`,
    `no_repeat_ngram_size`, `max_new_tokens`), and `transduce` takes `batch_size` and `use_cache`.
    `transduce` still takes this, with a deprecation notice."""

    beams: int = 4  # 1 = greedy
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # n > 0: no n-gram twice in an output
    max_new_tokens: int = 0  # 0 = the model's block_size - 1
    batch_size: int = 0  # sources decoded together; 0 = 64-256 hypotheses by source length
    use_cache: bool = True  # greedy only: False recomputes the decoder over the prefix each step

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(num_beams=self.beams, length_penalty=self.length_penalty,
                                no_repeat_ngram_size=self.no_repeat_ngram_size, max_new_tokens=self.max_new_tokens)  # fmt: skip


# Decoding settings each task uses unless told otherwise (the CLI, pipelines, `lmforge eval`, serving).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "translation": {"no_repeat_ngram_size": 0},  # sentences repeat words legitimately ("vous, vous")
    "summarization": {"no_repeat_ngram_size": 3},  # measured on arxiv-titles: docs/performance.md
}


def source_prefix(checkpoint: str | Path, task: str, given: str | None = None, strict: bool = True) -> str:
    """The text put before every source: `given`, else the checkpoint's own prefix for `task` (T5's
    "summarize: "; for translation its one translation prefix). A model with several translation
    prefixes needs one chosen (`strict`), or gets none."""
    if given is not None:
        return given
    from lmforge.checkpoint import open_checkpoint
    from lmforge.interop.hf import task_prefixes

    prefixes = task_prefixes(open_checkpoint(checkpoint).path)  # (a hub id: its local folder)
    if task == "summarization":
        return prefixes.get("summarization", "")
    ways = {name: prefix for name, prefix in prefixes.items() if name.startswith("translation")}
    if len(ways) > 1 and strict:
        shown = ", ".join(repr(p) for p in ways.values())
        raise UserError(
            f"{checkpoint} translates several ways (its prefixes: {shown}); choose one with --prefix."
        )
    return next(iter(ways.values())) if len(ways) == 1 else ""


def task_defaults(task: str, **given: int | None) -> dict[str, int]:
    """The decoding settings `task` uses (GenerationConfig fields), with those `given` (not None) in
    place of its defaults: `task_defaults("summarization", no_repeat_ngram_size=args.flag)`."""
    settings = dict(TASK_DEFAULTS.get(task, TASK_DEFAULTS["translation"]))
    return settings | {name: value for name, value in given.items() if value is not None}


def _encode_sources(model: nn.Module, tokenizer: TextTokenizer, sources: list[str], tokens: PairTokens,
                    warn: Callable[[str], None] | None = None) -> list[list[int]]:  # fmt: skip
    """The sources' tokens with the model's special tokens around them, each cut to the model's
    longest source (with one warning for them all)."""
    out, cut, room = [], 0, model.source_block_size - tokens.extra
    for text in sources:
        if not text.strip():
            raise UserError("An empty source cannot be translated or summarized; give some text.")
        ids = tokenizer.of_sources.encode(text)  # (the sources' own vocabulary, where they have one)
        cut += len(ids) > room
        out.append(tokens.around(ids, model.source_block_size))
    if cut:
        message = (f"{cut} of {len(sources)} source(s) have more tokens than the model reads "
                   f"({room}); only their first {room} tokens are used.")  # fmt: skip
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    return out


def _force_first(logits: torch.Tensor, tokens: PairTokens, step: int) -> torch.Tensor:
    """At the first step of a model that forces its first token (BART), only that token may come
    (with log-probability 0, as transformers' ForcedBOSTokenLogitsProcessor gives it)."""
    if step > 0 or tokens.forced_first is None:
        return logits
    forced = torch.full_like(logits, float("-inf"))
    forced[:, tokens.forced_first] = 0.0
    return forced


@torch.inference_mode()
def greedy(model: nn.Module, sources: list[list[int]], tokens: PairTokens | int, max_new: int,
           use_cache: bool = True, no_repeat_ngram_size: int = 0) -> list[list[int]]:  # fmt: skip
    """The most likely next token at each step, for every source at once; a row that ends leaves the
    batch (its cache rows with it), so the batch's longest output no longer pays for the others.
    `tokens`: the model's PairTokens (or lmforge's one boundary id, which starts and ends outputs)."""
    tokens = as_pair_tokens(tokens)
    device = next(model.parameters()).device
    ids, valid = pad_sources(sources, tokens.end, device)
    memory = model.encode(ids, valid)
    cache = model.new_cache(memory, valid, capacity=max_new + 1, source=ids) if use_cache else None
    prefix = torch.full((len(sources), 1), tokens.start, dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in sources]
    alive = list(range(len(sources)))  # the source of each row still decoding
    for step in range(max_new):
        if use_cache:
            logits = model.decode(prefix[:, -1:], cache=cache)[:, -1]
        else:
            logits = model.decode(prefix, memory, valid, source=ids)[:, -1]
        logits = ban_repeated_ngrams(_force_first(logits, tokens, step), prefix[:, 1:], no_repeat_ngram_size)
        token = logits.argmax(-1)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        ended = (token == tokens.end).tolist()
        if not any(ended):
            continue
        for row in (row for row, end in enumerate(ended) if end):
            outputs[alive[row]] = prefix[row, 1:-1].tolist()
        going = [row for row, end in enumerate(ended) if not end]
        if not going:
            return outputs
        alive = [alive[row] for row in going]
        rows = torch.tensor(going, device=device)
        prefix = prefix.index_select(0, rows)
        if use_cache:
            cache.reorder(rows)
        else:
            ids, valid, memory = (tensor.index_select(0, rows) for tensor in (ids, valid, memory))
    for row, source in enumerate(alive):  # ran out of tokens before ending
        outputs[source] = prefix[row, 1:].tolist()
    return outputs


@torch.inference_mode()
def beam_search(model: nn.Module, sources: list[list[int]], tokens: PairTokens | int, max_new: int,
                beams: int, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[list[int]]:  # fmt: skip
    """The best of `beams` hypotheses per source (see the module's docstring for the scoring). A
    source whose search is over leaves the batch with its rows."""
    protocol = as_pair_tokens(tokens)  # (`tokens` below: the hypotheses' token ids)
    boundary = protocol.end
    device = next(model.parameters()).device
    B, K = len(sources), beams
    ids, valid = pad_sources(sources, boundary, device)
    memory = model.encode(ids, valid)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # every source K times
    cache = model.new_cache(memory.index_select(0, rows), valid.index_select(0, rows), capacity=max_new + 1,
                            source=ids.index_select(0, rows))  # fmt: skip
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at first all K beams are the same: only one may extend
    tokens = torch.full((B * K, 1), protocol.start, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = list(range(B))  # the sources still searched; slot s holds rows s*K .. s*K+K-1
    for step in range(max_new):
        logprobs = torch.log_softmax(model.decode(tokens[:, -1:], cache=cache)[:, -1].float(), dim=-1)
        logprobs = _force_first(logprobs, protocol, step)
        logprobs = ban_repeated_ngrams(logprobs, tokens[:, 1:], no_repeat_ngram_size)
        n, vocab = len(active), logprobs.shape[-1]
        candidates = (scores.view(n * K, 1) + logprobs).view(n, K * vocab)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)  # enough to find K that go on
        next_scores = torch.full((n, K), float("-inf"), device=device)
        next_rows = torch.arange(n * K, device=device)
        next_tokens = torch.full((n * K,), boundary, dtype=torch.long, device=device)
        going = []  # slots whose search goes on
        for slot, b in enumerate(active):
            kept = 0
            for value, index in zip(top_scores[slot].tolist(), top_index[slot].tolist(), strict=True):
                beam, token = divmod(index, vocab)
                if value == float("-inf"):
                    break
                if token == boundary:  # this hypothesis ends here
                    hypothesis = tokens[slot * K + beam, 1:].tolist()
                    finished[b].append((value / max(1, len(hypothesis) + 1) ** length_penalty, hypothesis))
                    continue
                next_scores[slot, kept] = value
                next_rows[slot * K + kept], next_tokens[slot * K + kept] = slot * K + beam, token
                kept += 1
                if kept == K:
                    break
            if len(finished[b]) < K:
                going.append(slot)
        if not going:
            break
        if len(going) < n:  # searches that are over leave the batch
            slots = torch.tensor(going, device=device)
            keep = (slots[:, None] * K + torch.arange(K, device=device)).flatten()
            next_rows, next_tokens, next_scores = next_rows[keep], next_tokens[keep], next_scores[slots]
            active = [active[slot] for slot in going]
        cache.reorder(next_rows, same_sources=len(going) == n)
        tokens = torch.cat([tokens.index_select(0, next_rows), next_tokens[:, None]], dim=1)
        scores = next_scores
    else:  # ran out of tokens: a source with nothing ended takes its best live hypothesis
        for slot, b in enumerate(active):
            if not finished[b]:
                best = int(scores[slot].argmax())
                finished[b].append((0.0, tokens[slot * K + best, 1:].tolist()))
    return [max(hypotheses, key=lambda item: item[0])[1] for hypotheses in finished]


def transduce(model: nn.Module, tokenizer: TextTokenizer, sources: list[str],
              cfg: GenerationConfig | Seq2SeqConfig | None = None, progress: Callable[[int], None] | None = None,
              batch_size: int = 0, use_cache: bool = True, warn: Callable[[str], None] | None = None,
              prefix: str = "") -> list[str]:  # fmt: skip
    """The outputs (translations or summaries) of `sources`, batched, in the order given: greedy when
    `cfg.num_beams` is 1, else beam search (`cfg` None: DEFAULT_DECODING); `cfg.max_new_tokens` 0 =
    up to the model's length. `batch_size`: sources decoded together (0 = by their length);
    `use_cache` False (greedy) recomputes the decoder over the prefix each step, a reference. A source
    longer than the model reads is cut, with a warning (`warn`, default: Python's warnings). `prefix`
    goes before every source (T5's task prefixes: `source_prefix`)."""
    if isinstance(cfg, Seq2SeqConfig):
        warnings.warn("Seq2SeqConfig is deprecated: give transduce a GenerationConfig (num_beams, ...) and "
                      "batch_size / use_cache.", DeprecationWarning, stacklevel=2)  # fmt: skip
        cfg, batch_size, use_cache = cfg.generation_config(), cfg.batch_size, cfg.use_cache
    cfg = cfg or DEFAULT_DECODING
    if not getattr(model, "is_encoder_decoder", False):
        raise UserError("This is a decoder-only model; translate and summarize need an encoder–decoder "
                        "checkpoint (model.arch seq2seq), e.g. lmforge train --preset eng-fra-translation.")  # fmt: skip
    tokens = pair_tokens(model.config, tokenizer)
    max_new = min(cfg.max_new_tokens or model.block_size - 1, model.block_size - 1)
    encoded = _encode_sources(
        model, tokenizer, [prefix + s if s.strip() else s for s in sources], tokens, warn
    )
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    outputs: list[str] = [""] * len(encoded)
    most = sources_per_batch(batch_size, cfg.num_beams, source_tokens=1)  # the most sources a batch may hold
    begin = 0
    while begin < len(order):
        longest = len(encoded[order[min(begin + most, len(order)) - 1]])  # (sorted: the last is the longest)
        chunk = order[begin : begin + sources_per_batch(batch_size, cfg.num_beams, longest)]
        begin += len(chunk)
        batch = [encoded[i] for i in chunk]
        if cfg.num_beams > 1:
            new = beam_search(model, batch, tokens, max_new, cfg.num_beams, cfg.length_penalty,
                              cfg.no_repeat_ngram_size)  # fmt: skip
        else:
            new = greedy(model, batch, tokens, max_new, use_cache, cfg.no_repeat_ngram_size)
        for i, ids in zip(chunk, new, strict=True):
            outputs[i] = tokenizer.decode(ids).strip()
        if progress:
            progress(len(chunk))
    return outputs


# ---- pipelines and evaluation ----------------------------------------------------------------


class Seq2SeqPipeline:
    """`pipeline("translation" | "summarization", model=...)`: text in, [{"translation_text": ...}] out."""

    def __init__(self, task: str, model: nn.Module, tokenizer: TextTokenizer):
        self.task, self.model, self.tokenizer = task, model, tokenizer
        self.key = "translation_text" if task == "translation" else "summary_text"

    def __call__(self, texts: str | list[str], num_beams: int = 4, length_penalty: float = 1.0,
                 max_new_tokens: int = 0, no_repeat_ngram_size: int | None = None) -> list[dict[str, str]]:  # fmt: skip
        """`no_repeat_ngram_size` None = the task's default (`task_defaults`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        settings = task_defaults(self.task, no_repeat_ngram_size=no_repeat_ngram_size)
        cfg = GenerationConfig(num_beams=num_beams, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                               **settings)  # fmt: skip
        return [{self.key: out} for out in transduce(self.model, self.tokenizer, texts, cfg)]


def references_by_source(sources: list[str], targets: list[str]) -> tuple[list[str], list[list[str | None]]]:
    """Distinct sources, and their references as sacrebleu's reference sets (a source with several
    translations has several references; sets are padded with None where a source has fewer)."""
    grouped: dict[str, list[str]] = {}
    for s, t in zip(sources, targets, strict=True):
        grouped.setdefault(s, []).append(t)
    distinct = list(grouped)
    depth = max(len(refs) for refs in grouped.values())
    sets = [[grouped[s][i] if i < len(grouped[s]) else None for s in distinct] for i in range(depth)]
    return distinct, sets


def score_outputs(task: str, outputs: list[str], references: list[list[str | None]]) -> dict:
    """BLEU and chrF (sacrebleu, with signatures) for translation; ROUGE-1/2/L for summarization."""
    from lmforge.evaluation.metrics import bleu_chrf, rouge

    return bleu_chrf(outputs, references) if task == "translation" else rouge(outputs, references)


def seq2seq_pipeline(task: str, model: nn.Module, tokenizer: TextTokenizer, chat_template: str | None = None):
    """The "translation" or "summarization" pipeline of an encoder–decoder (named by its family)."""
    return Seq2SeqPipeline(task, model, tokenizer)


def evaluate_pairs(checkpoint: str | Path, data: str | Path | None = None, cfg: GenerationConfig | None = None,
                   device: str = "cpu", limit: int = 0, log: Callable[[str], None] | None = None,
                   dtype: str = "float32") -> dict:  # fmt: skip
    """Decode the sources of a pairs file (default: the validation pairs the model was trained with)
    and score the outputs against the targets (`cfg` None: 4 beams and the task's defaults), with
    the weights in `dtype`."""
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.loading import load_for_inference
    from lmforge.seq2seq.data import prepare_pairs, read_pairs

    opened = open_checkpoint(checkpoint)
    config = opened.config
    model, tokenizer = load_for_inference(str(checkpoint), device, dtype)
    if data is None:
        pairs = prepare_pairs(config, log=lambda _: None).val_texts
        where = f"validation pairs of {config.data.val_path or config.data.path}"
    else:
        d = config.data
        pairs = read_pairs(data, d.source_field, d.target_field, "")
        where = str(data)
    sources, references = references_by_source(pairs.sources, pairs.targets)
    if limit:
        sources, references = sources[:limit], [refs[:limit] for refs in references]
    task = config.data.task
    outputs = transduce(
        model,
        tokenizer,
        sources,
        cfg or GenerationConfig(num_beams=4, max_new_tokens=0, **task_defaults(task)),
        prefix=source_prefix(checkpoint, task, strict=False),
    )
    return {"checkpoint": str(checkpoint), "data": where, "task": task, "examples": len(sources),
            "references": sum(r is not None for refs in references for r in refs),
            **score_outputs(task, outputs, references), "samples": list(zip(sources[:3], outputs[:3], strict=True))}  # fmt: skip


# ---- what the encoder–decoder family offers the trainer and `lmforge eval` (lmforge/families) ------


def training_report(run, metrics) -> str:
    """An encoder–decoder run ends with its task's score on (up to 200 of) the validation sources,
    decoded greedily by the best weights, and one example as the sample."""
    from lmforge.checkpoint import load_checkpoint

    best, _, _ = load_checkpoint(run.out, run.device)
    texts, task = run.data.val_texts, run.config.data.task
    sources, references = references_by_source(texts.sources, texts.targets)
    sources, references = sources[:200], [refs[:200] for refs in references]
    outputs = transduce(
        best, run.tokenizer, sources, GenerationConfig(max_new_tokens=0, **task_defaults(task))
    )
    scores = score_outputs(task, outputs, references)
    keys = ("bleu", "chrf") if task == "translation" else ("rouge1", "rouge2", "rougeL")
    metrics.update_last({f"val_{k}_greedy": round(scores[k], 3) for k in keys})
    shown = ", ".join(f"{k} {scores[k]:.2f}" for k in keys)
    run.log(f"On {len(sources)} validation sources (greedy, best weights): {shown}")
    return f"{sources[0]}\n→ {outputs[0]}"


def evaluate_checkpoint(checkpoint, data: str | None, beams: int, no_repeat_ngram_size: int | None,
                        device: str) -> dict:  # fmt: skip
    """`lmforge eval` on an encoder–decoder: its task's scores on a pairs file (default: its
    validation pairs), with the task's decoding defaults."""
    settings = task_defaults(checkpoint.config.data.task, no_repeat_ngram_size=no_repeat_ngram_size)
    return evaluate_pairs(
        checkpoint.path, data, GenerationConfig(num_beams=beams, max_new_tokens=0, **settings), device
    )
