"""Constrained decoding: replies that must follow a grammar (a JSON schema, any JSON object, a tool call).

The grammar library is llguidance (the one vLLM and SGLang use): it compiles a JSON schema or a Lark
grammar, and at each step says which tokens of the vocabulary may come next. Generation sets every
other token's logit to -inf before choosing, so even a tiny or random model can only write text the
grammar accepts. `GrammarConstraint` is one sequence's parser state; `mask_logits` applies a batch of
them (None for rows that are free).

    constraint = GrammarConstraint(tokenizer, json_schema_grammar(schema))
    ... logits = mask_logits(logits, [constraint]); token = choose(logits); constraint.advance(token)

JSON is written compactly (no free whitespace): a small model given the freedom to add spaces and
newlines can wander off into them and never finish.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import UserError, require
from lmforge.tokenizers import TextTokenizer

COMPACT_JSON = {"whitespace_flexible": False}


def _llguidance():
    require("llguidance", "serve", "Constrained decoding (JSON output, tool calls)")
    import llguidance

    return llguidance


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text valid under `schema` (None: any JSON object)."""
    llguidance = _llguidance()
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults=COMPACT_JSON
        )
    except ValueError as e:
        raise UserError(f"The JSON schema is not valid JSON ({e}).") from None


def lark_grammar(lark: str) -> str:
    """A grammar written in Lark syntax (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class _Vocabulary:
    """What llguidance needs to know of a tokenizer: each token's bytes, the special and end tokens,
    and how to tokenize text. Built from lmforge's own tokenizer, so that character, word and
    byte-level BPE vocabularies all work the same way."""

    def __init__(self, tokenizer: TextTokenizer):
        special = set(tokenizer.end_ids)
        special |= {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
        self.eos_token_id = tokenizer.end_ids[0] if tokenizer.end_ids else None
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(special)
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


def _grammar_tokenizer(tokenizer: TextTokenizer):
    """llguidance's view of `tokenizer`, built once (about 0.2 s for a 49k vocabulary) and kept on it."""
    cached = getattr(tokenizer, "_grammar_tokenizer", None)
    if cached is None:
        llguidance = _llguidance()
        if tokenizer.eot_id is None and not tokenizer.end_ids:
            raise UserError("This tokenizer has no end-of-text token, so a constrained reply could not end.")
        cached = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)))
        tokenizer._grammar_tokenizer = cached  # type: ignore[attr-defined]
    return cached


def check_grammar(tokenizer: TextTokenizer, grammar: str) -> None:
    """Raise UserError naming the problem when `grammar` (e.g. from a user's schema) cannot be used,
    or when the vocabulary cannot even begin text of it (a character vocabulary without `{`)."""
    error = _llguidance().LLMatcher.validate_grammar(grammar, _grammar_tokenizer(tokenizer))
    if error:
        raise UserError(f"The grammar cannot be used: {error}")
    if not GrammarConstraint(tokenizer, grammar).allowed(fallback=False).any():
        raise UserError("This model's vocabulary has no token that can begin text of this format (e.g. a "
                        "character vocabulary without '{'); use a model with a byte-level tokenizer.")  # fmt: skip


class GrammarConstraint:
    """One sequence's place in its grammar: which tokens may come next, and advancing by one."""

    def __init__(self, tokenizer: TextTokenizer, grammar: str):
        llguidance = _llguidance()
        self.vocab = _grammar_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(self.vocab, grammar, log_level=0)
        self.end_ids = tokenizer.end_ids
        # Special tokens (<unk>, ...) are never text of the grammar, whatever its bitmask says.
        self.special = [i for i in _Vocabulary(tokenizer).special_token_ids if i not in self.end_ids]
        if self.matcher.is_error():
            raise UserError(f"The grammar cannot be used: {self.matcher.get_error()}")

    def allowed(self, fallback: bool = True) -> torch.Tensor:
        """A boolean mask over the tokenizer's vocabulary: the tokens the grammar accepts next.
        Once the text is complete, every end-of-sequence token is allowed (the checkpoint's
        end-of-turn token too, not only the one llguidance knows); with `fallback`, also when the
        vocabulary has no token for what the grammar needs next."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        mask = bits.flatten()[: self.vocab.vocab_size].bool()
        mask[self.special] = False
        if self.matcher.is_accepting():
            mask[list(self.end_ids)] = True
        if fallback and not mask.any():  # the vocabulary cannot write what the grammar needs next
            mask[list(self.end_ids)] = True  # (the reply ends there; its text shows how far it got)
        return mask

    def advance(self, token: int) -> None:
        if token in self.end_ids:
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} was not allowed by the grammar: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The text is finished: the grammar accepts nothing more."""
        return self.matcher.is_stopped()


def mask_logits(logits: torch.Tensor, constraints: list[GrammarConstraint | None]) -> torch.Tensor:
    """Logits with every token a row's grammar forbids at -inf (rows without a constraint unchanged)."""
    if not any(constraints):
        return logits
    logits = logits.clone()
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        allowed = constraint.allowed().to(logits.device)
        width = allowed.shape[0]
        logits[row, :width] = logits[row, :width].masked_fill(~allowed, float("-inf"))
        logits[row, width:] = float("-inf")  # padding rows of the embedding are never text
    return logits
