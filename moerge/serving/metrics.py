"""The server's figures in Prometheus' text format (``GET /metrics``, prometheus-client).

Requests by route and status, with their latency; prompt and completion tokens; time to the first token; the rows of
each decode step and the requests waiting to join; how often each expert is used (the experts a completion's routing
gave weight); and the expert cache's counters (read at each scrape). Each server has a registry of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class _CacheCollector(Collector):
    """The expert cache's figures, read from the model when scraped."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        for name, value, doc in [("hits", s.hits, "calls whose experts were all resident"),
                                 ("misses", s.misses, "experts read because a call needed them"),
                                 ("evictions", s.evictions, "experts dropped from memory for the budget")]:
            yield CounterMetricFamily(f"moerge_expert_cache_{name}", doc, value=value)
        yield CounterMetricFamily("moerge_expert_cache_load_seconds", "time spent reading experts",
                                  value=s.load_seconds)
        for name, value, doc in [("resident", s.resident, "experts whose factors are in memory"),
                                 ("resident_bytes", s.resident_bytes, "bytes of the resident experts' factors"),
                                 ("experts", s.experts, "experts the model serves"),
                                 ("pinned", s.pinned, "experts kept resident whatever the budget")]:
            yield GaugeMetricFamily(f"moerge_expert_cache_{name}", doc, value=value)
        if s.budget_bytes is not None:
            yield GaugeMetricFamily("moerge_expert_cache_budget_bytes", "the banks' budget", value=s.budget_bytes)
        if s.host_budget_bytes is not None:
            yield GaugeMetricFamily("moerge_expert_cache_host_budget_bytes", "the host tier's budget (two tiers)",
                                    value=s.host_budget_bytes)
        if s.host_budget_bytes is not None or s.host_resident or s.host_hits:  # two tiers: banks on an accelerator
            yield CounterMetricFamily("moerge_expert_cache_host_hits", "misses of the device's banks served from host "
                                      "memory", value=s.host_hits)
            yield GaugeMetricFamily("moerge_expert_cache_host_resident", "experts kept in host memory",
                                    value=s.host_resident)
            yield GaugeMetricFamily("moerge_expert_cache_host_bytes", "bytes of the experts kept in host memory",
                                    value=s.host_bytes)


class Metrics:
    """The figures of one server (see the module's docstring); ``cache_stats``: the model's ``cache_stats``."""

    def __init__(self, cache_stats: Callable[[], Any] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moerge_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("moerge_request_seconds", "time to answer a request (a stream: to its end)",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("moerge_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.completion_tokens = Counter("moerge_completion_tokens", "tokens generated", registry=r)
        self.first_token = Histogram("moerge_time_to_first_token_seconds", "from a request's arrival to its first "
                                     "token", buckets=_LATENCY, registry=r)
        self.rows = Histogram("moerge_batch_rows", "rows run by each decode step", buckets=_ROWS, registry=r)
        self.running = Gauge("moerge_batch_running_rows", "rows in the running batch", registry=r)
        self.waiting = Gauge("moerge_waiting_requests", "requests waiting to join the batch", registry=r)
        self.cancelled = Counter("moerge_cancelled_requests", "requests dropped because their client left",
                                 registry=r)
        self.expert_use = Counter("moerge_expert_requests", "completions whose routing gave the expert weight",
                                  ["expert"], registry=r)
        if cache_stats is not None:
            r.register(_CacheCollector(cache_stats))

    def finished(self, result: dict[str, Any]) -> None:
        """A completed job's figures: its tokens and the experts its routing used."""
        self.prompt_tokens.inc(result["prompt_tokens"])
        self.completion_tokens.inc(result["completion_tokens"])
        for name, weight in result["routing"].experts.items():
            if weight > 0:
                self.expert_use.labels(name).inc()

    def text(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
