"""Prometheus metrics of one server: requests, tokens, time to first token, cache hits, queue depth.

Each app gets its own registry, so several servers in one process (tests) never share counters.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen3_mlx.events import TurnResult

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The counters, gauges and histograms /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qwen3_mlx_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("qwen3_mlx_prompt_tokens", "Prompt tokens.", registry=r)
        self.cached_tokens = Counter(
            "qwen3_mlx_cached_prompt_tokens", "Prompt tokens the prefix cache held.", registry=r
        )
        self.generated_tokens = Counter(
            "qwen3_mlx_generated_tokens", "Generated tokens.", registry=r
        )
        self.drafted_tokens = Counter(
            "qwen3_mlx_drafted_tokens", "Tokens drafted for speculative decoding.", registry=r
        )
        self.accepted_tokens = Counter(
            "qwen3_mlx_accepted_tokens", "Drafted tokens the model accepted.", registry=r
        )
        self.cache_lookups = Counter(
            "qwen3_mlx_prefix_cache_lookups", "Replies that looked in the prefix cache.", registry=r
        )
        self.cache_hits = Counter(
            "qwen3_mlx_prefix_cache_hits", "Replies that reused a cached prefix.", registry=r
        )
        self.ttft = Histogram(
            "qwen3_mlx_time_to_first_token_seconds",
            "Seconds from queueing a reply to its first event.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("qwen3_mlx_queue_depth", "Replies waiting.", registry=r)
        self.running = Gauge("qwen3_mlx_running", "Replies being generated.", registry=r)
        # The last replies' token counts, newest last: what each step of an agent reused.
        self.recent: deque[dict[str, int | str]] = deque(maxlen=64)

    def record_reply(self, result: TurnResult, cached_tokens: int) -> None:
        """Count one finished reply."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generated_tokens.inc(result.generated_tokens)
        self.drafted_tokens.inc(result.drafted_tokens)
        self.accepted_tokens.inc(result.accepted_tokens)
        self.cache_lookups.inc()
        self.recent.append(
            {
                "prompt_tokens": result.prompt_tokens,
                "cached_tokens": cached_tokens,
                "prefilled_tokens": result.prefilled_tokens,
                "generated_tokens": result.generated_tokens,
                "drafted_tokens": result.drafted_tokens,
                "accepted_tokens": result.accepted_tokens,
                "finish_reason": result.finish_reason,
            }
        )
        if cached_tokens:
            self.cache_hits.inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
