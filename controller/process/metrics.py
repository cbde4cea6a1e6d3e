# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of both processes, on prometheus-client.

Each process makes its own registry (never the library's global default one,
so two processes' metrics can live side by side in one test process):

    registry = new_registry()
    reconciles = Counter("x_reconcile_total", "Reconciles.", ["controller"], registry=registry)
    reconciles.labels(controller="claims").inc()
    registry.register(ScrapeTime(lambda: [GaugeMetricFamily("x_depth", "Depth.", value=3)]))
    body, content_type = exposition(registry)   # GET /metrics

Values cheaper to read when scraped than to keep up to date (queue depths,
claim counts) are metric families built by a `ScrapeTime` collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

# prometheus_client/__init__.py runs on the first import of any of its modules and
# loads the whole library (its default registry's process and GC collectors, the
# WSGI/ASGI servers): measured, the plugin's idle RSS grows by ~1.7 MiB in all.
# Loading only the modules below (the package registered without running its
# __init__) measured no smaller, so the plain imports stay.

# No `<name>_created` series next to each counter and histogram: the metrics
# stay the ones the dashboards and docs name.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "CollectorRegistry",
    "Counter",
    "CounterMetricFamily",
    "Gauge",
    "GaugeMetricFamily",
    "Histogram",
    "InformerState",
    "LoopState",
    "Metric",
    "ReconcileMetrics",
    "ScrapeTime",
    "exposition",
    "new_registry",
]

# The Prometheus text format, version 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds, from 1 ms to 10 s: API round trips on one side, slow re-lists on the other.
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def new_registry() -> CollectorRegistry:
    """A registry of its own for one process (checks names are not registered twice)."""
    return CollectorRegistry(auto_describe=True)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body of GET /metrics and its content type (Prometheus text format)."""
    return generate_latest(registry), CONTENT_TYPE


class ScrapeTime:
    """A collector whose metric families `families()` builds at each scrape.

    `families()` yields every family it ever reports, samples or not, so the
    registry learns their names at registration (and refuses duplicates).
    """

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        """The families, built now."""
        return self._families()


@dataclass(frozen=True)
class InformerState:
    """What one informer reports at a scrape."""

    resource: str
    quarantined: int
    quarantined_total: int
    healthy: bool


@dataclass(frozen=True)
class LoopState:
    """What one reconciling loop (a controller) reports at a scrape."""

    controller: str
    queue_depth: int
    informers: tuple[InformerState, ...] = ()


class ReconcileMetrics:
    """The metrics every reconciling loop reports, labelled by controller name.

    Runs, errors and durations are recorded as they happen (`observe`, or the
    `on_result` callback of `for_controller`); queue depths and informer
    states are read at each scrape from `loops()`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        prefix: str,
        loops: Callable[[], Iterable[LoopState]] = tuple,
    ) -> None:
        self.prefix = prefix
        self._loops = loops
        # (controller, resource) -> the counter's value: an informer re-created
        # (leadership regained) starts again from 0; the counter does not go down.
        self._quarantined_total: dict[tuple[str, str], float] = {}
        self.total = Counter(
            f"{prefix}_reconcile_total",
            "Reconciles run, by controller.",
            ["controller"],
            registry=registry,
        )
        self.errors = Counter(
            f"{prefix}_reconcile_errors_total",
            "Reconciles that failed and were retried, by controller.",
            ["controller"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_reconcile_duration_seconds",
            "Time one reconcile took, by controller.",
            ["controller"],
            registry=registry,
            buckets=DEFAULT_BUCKETS,
        )
        registry.register(ScrapeTime(self._loop_families))

    def _loop_families(self) -> Iterator[Metric]:
        p = self.prefix
        depth = GaugeMetricFamily(
            f"{p}_queue_depth",
            "Keys waiting in the work queue (ready or delayed), by controller.",
            labels=["controller"],
        )
        quarantined = GaugeMetricFamily(
            f"{p}_informer_quarantined_objects",
            "Objects skipped because they cannot be decoded whole (nested too deep), "
            "by controller and resource.",
            labels=["controller", "resource"],
        )
        quarantined_total = CounterMetricFamily(
            f"{p}_informer_quarantined_objects_total",
            "Object versions skipped because they cannot be decoded whole, "
            "by controller and resource.",
            labels=["controller", "resource"],
        )
        healthy = GaugeMetricFamily(
            f"{p}_informer_healthy",
            "1 while the resource's list/watch works (or failed for less than its stall "
            "limit), else 0; by controller and resource.",
            labels=["controller", "resource"],
        )
        for loop in self._loops():
            depth.add_metric([loop.controller], loop.queue_depth)
            for informer in loop.informers:
                labels = [loop.controller, informer.resource]
                quarantined.add_metric(labels, informer.quarantined)
                key = (loop.controller, informer.resource)
                total = max(self._quarantined_total.get(key, 0.0), informer.quarantined_total)
                self._quarantined_total[key] = total
                healthy.add_metric(labels, 1 if informer.healthy else 0)
        for (controller, resource), total in self._quarantined_total.items():
            quarantined_total.add_metric([controller, resource], total)
        yield from (depth, quarantined, quarantined_total, healthy)

    def observe(self, controller: str, error: BaseException | None, seconds: float) -> None:
        """Record one finished reconcile."""
        self.total.labels(controller=controller).inc()
        if error is not None:
            self.errors.labels(controller=controller).inc()
        self.duration.labels(controller=controller).observe(seconds)

    def for_controller(self, controller: str) -> Callable[[str, BaseException | None, float], None]:
        """An `on_result(key, error, seconds)` callback for one controller's queue.

        Also makes the controller's counters appear (at 0) before its first reconcile.
        """
        self.total.labels(controller=controller)
        self.errors.labels(controller=controller)

        def on_result(_key: str, error: BaseException | None, seconds: float) -> None:
            self.observe(controller, error, seconds)

        return on_result
