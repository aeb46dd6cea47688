"""Prometheus metrics: requests per endpoint, time per stage, micro-batch sizes, index swaps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """One registry per app, so that several apps (tests, workers) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cots_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cots_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "cots_stage_seconds",
            "time per stage: decode (per image), encode and search (per micro-batch)",
            ["stage", "modality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cots_batch_size",
            "queries per encoder call (micro-batching)",
            ["modality"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter(
            "cots_index_swaps",
            "index swaps by result: swapped, rejected (mismatch), failed (unreadable)",
            ["result"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "cots_ready", "1 once bundle and index are loaded", registry=self.registry
        )
        self.gallery_size = Gauge(
            "cots_gallery_items",
            "items in the served index by side",
            ["side"],
            registry=self.registry,
        )

    @contextmanager
    def timed(self, stage: str, modality: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(stage, modality).observe(time.perf_counter() - start)


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (`/images/{image_id}`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
