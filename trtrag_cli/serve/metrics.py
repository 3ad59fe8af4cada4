"""Prometheus metrics of `trtrag serve` (prefix trtrag_, times in seconds), on a registry of their own.

Requests and latencies are counted by the service itself; batch sizes, batch waits and generated tokens
come from the stages through `util.observe` events; GPU memory and utilisation are read through NVML at
scrape time where pynvml and a GPU are present (else those series are simply absent).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from trtrag_cli.util import observe

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# ask's timings_ms keys -> stage label; "answer" is the whole generation, ttft its first token
STAGES = {"encode": "encode", "search": "search", "rerank": "rerank", "answer": "generate"}


class Metrics:
    """Every series the service exports; `close()` stops listening to observe events."""

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("trtrag_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("trtrag_request_duration_seconds", "Time from request to last byte, by route.",
                                 ["route"], buckets=LATENCY, registry=r)
        self.stage = Histogram("trtrag_stage_duration_seconds", "Per-stage time of answered requests "
                               "(encode, search, rerank, generate, ttft).", ["stage"], buckets=LATENCY, registry=r)
        self.queue_wait = Histogram("trtrag_queue_wait_seconds", "Time a request waited for a serve.max_concurrent "
                                    "slot.", buckets=LATENCY, registry=r)
        self.in_flight = Gauge("trtrag_requests_in_flight", "Requests being worked on.", registry=r)
        self.queued = Gauge("trtrag_requests_queued", "Requests waiting for a slot.", registry=r)
        self.rejected = Counter("trtrag_requests_rejected", "Requests refused before work, by reason "
                                "(queue_full, body_too_large, unauthorized, timeout).", ["reason"], registry=r)
        self.cancelled = Counter("trtrag_streams_cancelled", "Streams whose client went away before the end.",
                                 registry=r)
        self.batch_size = Histogram("trtrag_batch_size", "Items per batch run by a stage's batcher.", ["stage"],
                                    buckets=SIZES, registry=r)
        self.batch_wait = Histogram("trtrag_batch_wait_seconds", "Time an item waited in a stage's batcher.",
                                    ["stage"], buckets=LATENCY, registry=r)
        self.tokens = Counter("trtrag_tokens_generated", "Tokens the generator produced (observe events).",
                              ["stage"], registry=r)
        self.completion_tokens = Counter("trtrag_completion_tokens", "Answer tokens returned to clients.",
                                         registry=r)
        self.index_chunks = Gauge("trtrag_index_chunks", "Chunks in the served index generation.", registry=r)
        self.index_swaps = Counter("trtrag_index_swaps", "Switches to a newly published index generation.",
                                   registry=r)
        r.register(_NvmlCollector())
        self._unsubscribe = observe.subscribe(self._on_event)

    def _on_event(self, event: str, **fields) -> None:
        if event == "batch":
            stage = str(fields.get("stage", "?"))
            self.batch_size.labels(stage).observe(fields.get("size", 0))
            for wait in fields.get("wait_s") or ():
                self.batch_wait.labels(stage).observe(wait)
        elif event == "tokens":
            self.tokens.labels(str(fields.get("stage", "generate"))).inc(fields.get("count", 0))

    def answered(self, timings_ms: dict, generation: dict | None = None) -> None:
        """Stage latencies of one answer: ask's timings_ms, and the generation's time to first token."""
        for key, stage in STAGES.items():
            if timings_ms.get(key) is not None:
                self.stage.labels(stage).observe(timings_ms[key] / 1e3)
        if generation:
            if generation.get("ttft_ms") is not None:
                self.stage.labels("ttft").observe(generation["ttft_ms"] / 1e3)
            self.completion_tokens.inc(generation.get("output_tokens") or 0)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def close(self) -> None:
        self._unsubscribe()


class _NvmlCollector:
    """GPU memory and utilisation at scrape time; nothing where pynvml or a GPU is missing."""

    def __init__(self):
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no pynvml, no driver, no GPU: the series are just absent
            self.nvml = None

    def describe(self):
        return []

    def collect(self):
        if self.nvml is None:
            return
        nv = self.nvml
        used = GaugeMetricFamily("trtrag_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"])
        total = GaugeMetricFamily("trtrag_gpu_memory_total_bytes", "GPU memory (NVML).", labels=["gpu"])
        util = GaugeMetricFamily("trtrag_gpu_utilization_ratio", "GPU busy share, 0..1 (NVML).", labels=["gpu"])
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(i)], mem.used)
                total.add_metric([str(i)], mem.total)
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception:  # noqa: BLE001 - a GPU that stops answering must not break /metrics
            return
        yield from (used, total, util)
