"""Server metrics in Prometheus' text format (`Prometheus`), for every route.

`Prometheus` (spec SW-OPS-2) holds one `prometheus_client` registry per server (no global
state): per adapter, requests, prompt and generated tokens, end-to-end latency, queue-time and
time-to-first-token histograms; responses by status and endpoint (errors by status); and, read
from the engine at each scrape, device-slot hits, misses, swap-ins and evictions, waiting
requests and compilations. Adapters are labelled by their public name (`base`: the model).

Example:
    >>> p = Prometheus()
    >>> p.response("/v1/completions", 200)
    >>> b'jaxlora_responses_total{endpoint="/v1/completions",status="200"} 1.0' in p.render()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "Prometheus"]

#: The content type of Prometheus' text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Reads the engine's counters (`Engine.metrics()`) at each scrape."""

    def __init__(self, read: Callable[[], Mapping[str, Any]]):
        self.read = read

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.read()
        slots = m.get("adapters", {})
        for key, doc in (
            ("hits", "requests whose adapter was already in a device slot"),
            ("misses", "requests whose adapter had to be swapped into a device slot"),
            ("swap_ins", "adapters written into a device slot"),
            ("evictions", "adapters evicted from a device slot"),
        ):
            yield CounterMetricFamily(f"jaxlora_adapter_slot_{key}", doc, slots.get(key, 0))
        yield CounterMetricFamily(
            "jaxlora_adapter_swap_in_seconds",
            "time spent swapping adapters in",
            slots.get("swap_in_seconds", 0.0),
        )
        yield GaugeMetricFamily(
            "jaxlora_adapter_slots_pinned",
            "device slots in use by live rows",
            slots.get("pinned_slots", 0),
        )
        yield GaugeMetricFamily(
            "jaxlora_waiting_requests", "requests waiting for a row", m.get("waiting", 0)
        )
        rows = m.get("rows", {})
        yield GaugeMetricFamily(
            "jaxlora_rows_occupied", "rows decoding or prefilling", rows.get("occupied", 0)
        )
        compiles = CounterMetricFamily("jaxlora_compiles", "executables compiled", labels=["kind"])
        for kind, n in m.get("compiles", {}).items():
            compiles.add_metric([kind], n)
        yield compiles


class Prometheus:
    """Per-server Prometheus metrics (see the module docstring).

    Arguments:
        engine_metrics: a function returning the engine's counters (`Engine.metrics`), read at
            each scrape; None: no engine metrics.
    """

    def __init__(self, engine_metrics: Callable[[], Mapping[str, Any]] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "jaxlora_requests", "generation requests admitted", ["adapter", "endpoint"], registry=r
        )
        self.prompt_tokens = Counter(
            "jaxlora_prompt_tokens", "prompt tokens of finished requests", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "jaxlora_generated_tokens", "tokens generated", ["adapter"], registry=r
        )
        self.responses = Counter(
            "jaxlora_responses", "HTTP responses by status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "jaxlora_request_latency_seconds",
            "submission to last token",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "jaxlora_queue_seconds",
            "submission to admission into a row",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "jaxlora_time_to_first_token_seconds",
            "submission to first token",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        if engine_metrics is not None:
            r.register(_EngineCollector(engine_metrics))

    def request(self, adapter: str, endpoint: str) -> None:
        self.requests.labels(adapter, endpoint).inc()

    def finished(self, adapter: str, result: Any, prompt_tokens: int) -> None:
        """Record one finished engine request (`jaxlora.engine.Result`)."""
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generated_tokens.labels(adapter).inc(len(result.tokens))
        self.latency.labels(adapter).observe(result.total_s)
        if result.queue_s is not None:
            self.queue.labels(adapter).observe(result.queue_s)
        if result.first_token_s is not None:
            self.first_token.labels(adapter).observe(result.first_token_s)

    def response(self, endpoint: str, status: int) -> None:
        self.responses.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
