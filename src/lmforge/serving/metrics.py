"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client).

    lmforge_requests_total{route}                    requests answered by each generation route
    lmforge_prompt_tokens_total                      prompt tokens submitted to the engine
    lmforge_generated_tokens_total                   tokens generated
    lmforge_time_to_first_token_seconds              histogram: submission to first token, per sequence
    lmforge_inter_token_latency_seconds              histogram: between a sequence's tokens
    lmforge_queue_length                             sequences waiting for the running batch
    lmforge_running_sequences, lmforge_batch_occupancy   rows in the batch, and their share of --max-batch
    lmforge_prefix_cache_reused_tokens_total         prompt tokens read from the prefix cache, not computed
    lmforge_draft_tokens_total, lmforge_draft_tokens_accepted_total
                                                     speculative decoding: tokens drafted, and kept

Each app has its own registry (several servers in one process, as in the tests, count apart). The
engine's worker thread reports tokens (`token`), the routes report requests.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _PrefixReuse:
    """The prefix cache's reused-token count, read when scraped (a counter the engine keeps)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        family = CounterMetricFamily("lmforge_prefix_cache_reused_tokens",
                                     "Prompt tokens read from the prefix cache instead of computed")  # fmt: skip
        family.add_metric([], self.engine.prefixes.reused)
        yield family


class ServingMetrics:
    def __init__(self, engine: Any):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "lmforge_requests", "Requests answered, by route", ["route"], registry=registry
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens submitted", registry=registry)
        self.generated_tokens = Counter("lmforge_generated_tokens", "Tokens generated", registry=registry)
        self.first_token = Histogram("lmforge_time_to_first_token_seconds", "From submission to a sequence's "
                                     "first token", buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.between_tokens = Histogram("lmforge_inter_token_latency_seconds", "Between two tokens of a sequence",
                                        buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        Gauge("lmforge_queue_length", "Sequences waiting for the batch", registry=registry).set_function(
            engine.queued
        )
        Gauge("lmforge_running_sequences", "Sequences in the running batch",
              registry=registry).set_function(engine.running)  # fmt: skip
        Gauge("lmforge_batch_occupancy", "Running sequences / --max-batch",
              registry=registry).set_function(lambda: engine.running() / engine.max_batch)  # fmt: skip
        registry.register(_PrefixReuse(engine))
        self.draft_tokens = Counter("lmforge_draft_tokens", "Tokens drafted (speculative decoding)",
                                    registry=registry)  # fmt: skip
        self.draft_tokens_accepted = Counter("lmforge_draft_tokens_accepted", "Drafted tokens the model kept",
                                             registry=registry)  # fmt: skip

    def submitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def token(self, seq: Any) -> None:
        """A token of `seq` was emitted now (called on the engine's worker thread)."""
        now = time.perf_counter()
        if seq.last_token_at is None:
            self.first_token.observe(now - seq.submitted)
        else:
            self.between_tokens.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.generated_tokens.inc()

    def drafted(self, drafted: int, accepted: int) -> None:
        self.draft_tokens.inc(drafted)
        self.draft_tokens_accepted.inc(accepted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
