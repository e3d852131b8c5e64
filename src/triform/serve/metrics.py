"""Prometheus metrics of one server, in a registry of its own (several servers in one process, as
in tests, never share or clash).

Names are fixed; the playground page and dashboards read them:

- gauges ``triform_requests_running``, ``triform_requests_waiting`` (requests with a sequence
  running / requests queued or preempted), ``triform_kv_cache_usage`` (share of KV blocks held,
  0..1), ``triform_kv_blocks_used`` and ``triform_kv_blocks_total``;
- counters ``triform_prompt_tokens_total`` and ``triform_generation_tokens_total`` (tokens
  submitted / generated over the server's life), ``triform_requests_total`` by ``status`` (the
  HTTP status of each completion, chat or embedding request; ``499`` when the client went away);
- histograms ``triform_time_to_first_token_seconds``, ``triform_inter_token_latency_seconds`` and
  ``triform_e2e_request_latency_seconds``.

Gauges and token counters are read from the engine's stats snapshot when ``/metrics`` is scraped,
so they are exact and cost nothing between scrapes; the histograms are fed from the times each
engine output carries (``RequestOutput.arrival_time``, ``first_token_time``, ``time``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triform.inference.core import EngineStats, RequestOutput

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _StatsCollector(Collector):
    """Gauges and token counters from the latest stats snapshot, at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, doc, value in (
            ("triform_requests_running", "Requests with a sequence running in the engine.", s.running),
            ("triform_requests_waiting", "Requests queued or preempted, waiting to run.", s.waiting),
            ("triform_kv_cache_usage", "Share of the KV cache blocks held now (0 to 1).", s.kv_usage),
            ("triform_kv_blocks_used", "KV cache blocks held now.", s.kv_blocks_used),
            ("triform_kv_blocks_total", "KV cache blocks in the pool.", s.kv_blocks_total),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("triform_prompt_tokens", "Prompt tokens submitted.", value=s.prompt_tokens)
        yield CounterMetricFamily("triform_generation_tokens", "Tokens generated.", value=s.generated_tokens)


class ServerMetrics:
    """The metrics of one server over ``stats`` (a callable returning the engine's latest
    ``EngineStats``; an embedding server passes its own)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats))
        self.requests = Counter(
            "triform_requests", "Completion, chat and embedding requests, by HTTP status (499: the client left).",
            ["status"], registry=self.registry,
        )
        self.requests.labels(status="200")  # the series exists (at 0) before the first request
        self.ttft = Histogram(
            "triform_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.itl = Histogram(
            "triform_inter_token_latency_seconds", "Between consecutive tokens of one completion.",
            buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "triform_e2e_request_latency_seconds", "From a request's arrival to its last output.",
            buckets=E2E_BUCKETS, registry=self.registry,
        )

    def count(self, status: int) -> None:
        """Count one request that ended with HTTP ``status``."""
        self.requests.labels(status=str(status)).inc()

    def tracker(self) -> LatencyTracker:
        """A tracker for one engine request's latencies."""
        return LatencyTracker(self)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LatencyTracker:
    """Feeds the latency histograms from one engine request's outputs, in order: time to first
    token once per request, inter-token latency between consecutive outputs of each completion,
    end-to-end latency at its last output. Aborted outputs are not measured."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._first = False
        self._last: dict[int, float] = {}

    def observe(self, out: RequestOutput) -> None:
        """Record what ``out`` says about the request's timing."""
        if out.finish_reason == "abort":
            return
        m = self._metrics
        if not self._first and out.first_token_time is not None:
            self._first = True
            m.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
        prev = self._last.get(out.index)
        if prev is not None:
            m.itl.observe(max(0.0, out.time - prev))
        self._last[out.index] = out.time
        if out.request_finished:
            m.e2e.observe(max(0.0, out.time - out.arrival_time))
