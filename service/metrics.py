"""Prometheus metrics, one registry per app (no module-level singletons: tests build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "encode", "retrieve", "rerank", "total")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "mel_stage_seconds",
            "Latency of one pipeline stage per batch (total: per request)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rerank_seconds = Histogram(
            "mel_rerank_seconds",
            "Reranking time of one batch's mentions that asked for this reranker",
            ["reranker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mel_batch_size",
            "Mentions per model batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge("mel_queue_depth", "Mentions waiting for the model", registry=r)
        self.cache = Counter(
            "mel_cache_requests_total", "Cache lookups", ["kind", "outcome"], registry=r
        )
        self.cache_errors = Counter(
            "mel_cache_errors_total", "Cache backend errors (bypassed)", ["error"], registry=r
        )
        self.errors = Counter(
            "mel_errors_total", "Requests answered with an error", ["type"], registry=r
        )
        self.requests = Counter(
            "mel_requests_total", "HTTP requests", ["route", "status"], registry=r
        )
        self.mentions = Counter("mel_mentions_total", "Mentions linked", ["reranker"], registry=r)
        self.ready = Gauge("mel_ready", "1 when model and index are loaded and warm", registry=r)
        self.swaps = Counter(
            "mel_swaps_total", "Hot swaps to a newly loaded model / index", registry=r
        )
        self.live_updates = Counter(
            "mel_live_updates_total", "Live KB updates committed", ["kind"], registry=r
        )
        self.redis_up = Gauge(
            "mel_redis_up", "1 when the Redis cache answered its last ping", registry=r
        )
        for s in STAGES:
            self.stage_seconds.labels(stage=s)
        for name in ("fusion", "mimic", "drin", "none"):
            self.rerank_seconds.labels(reranker=name)
            self.mentions.labels(reranker=name)
        for kind in ("result", "encoding"):
            for outcome in ("hit", "miss"):
                self.cache.labels(kind=kind, outcome=outcome)


__all__ = ["STAGES", "Metrics"]
