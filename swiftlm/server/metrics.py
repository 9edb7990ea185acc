"""Prometheus metrics under vLLM's names, so existing dashboards and alerts work unchanged.

Each app gets its own CollectorRegistry: several servers can live in one process (tests) without their
collectors clashing in the global registry.
"""
from __future__ import annotations

import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from swiftlm.outputs import EngineStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServerMetrics:
    """Request-level histograms fed by the engine thread, engine-level gauges/counters synced from EngineStats."""

    FINISH_REASONS = ("stop", "length", "abort", "error")

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        self._running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self._waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self._kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.")
        self._success = counter("vllm:request_success", "Count of finished requests.", ("finished_reason",))
        self._ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               _TTFT_BUCKETS)
        self._itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              _ITL_BUCKETS)
        self._e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              _E2E_BUCKETS)
        self._req_prompt = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed per request.",
                                     _TOKEN_BUCKETS)
        self._req_generation = histogram("vllm:request_generation_tokens",
                                         "Number of generation tokens processed per request.", _TOKEN_BUCKETS)

        self.model_name = model_name
        m = model_name
        self.running, self.waiting, self.kv_usage = (g.labels(m) for g in (self._running, self._waiting,
                                                                           self._kv_usage))
        self.prompt_tokens, self.generation_tokens, self.preemptions = (
            c.labels(m) for c in (self._prompt_tokens, self._generation_tokens, self._preemptions))
        self.ttft, self.itl, self.e2e = (h.labels(m) for h in (self._ttft, self._itl, self._e2e))
        self.request_prompt_tokens = self._req_prompt.labels(m)
        self.request_generation_tokens = self._req_generation.labels(m)
        for reason in self.FINISH_REASONS:
            self._success.labels(m, reason)
        self._sync_lock = threading.Lock()
        self._seen = (0, 0, 0)

    def observe_finished(self, reason: str, e2e_seconds: float, prompt_tokens: int, generation_tokens: int) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e_seconds)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)

    def sync_engine_stats(self, stats: EngineStats) -> None:
        """Mirror the engine's cumulative totals into counters (by delta) and its gauges as they are now."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        totals = (stats.prompt_tokens_total, stats.generation_tokens_total, stats.num_preemptions)
        with self._sync_lock:
            for counter, now, seen in zip((self.prompt_tokens, self.generation_tokens, self.preemptions),
                                          totals, self._seen):
                if now > seen:
                    counter.inc(now - seen)
            self._seen = tuple(max(now, seen) for now, seen in zip(totals, self._seen))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
