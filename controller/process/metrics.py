# SPDX-License-Identifier: Apache-2.0
"""A tiny Prometheus registry: counters, gauges and histograms with labels.

Both processes expose their metrics in the Prometheus text format (0.0.4)
without a client library:

    registry = Registry()
    reconciles = registry.counter("x_reconcile_total", "Reconciles.", ("controller",))
    reconciles.inc(controller="claims")
    registry.render()   # the body of GET /metrics

Label values are given as keyword arguments and must name exactly the
declared labels. Updates take a lock, so worker threads may update metrics
too. `Registry.on_collect` registers a callback run before each render, for
values that are cheaper to read when scraped (queue depths).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, from 1 ms to 10 s: API round trips on one side, slow re-lists on the other.
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without `.0`, `+Inf`, `NaN`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"metric {name}: duplicate label names in {list(labels)}")
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(
                f"metric {self.name}: labels {sorted(labels)} given, "
                f"expected exactly {list(self.label_names)}"
            )
        return tuple(str(labels[n]) for n in self.label_names)

    def _samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        """This metric's HELP, TYPE and sample lines."""
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            lines.extend(self._samples())
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A value that only goes up (per label set)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}
        if not labels:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (>= 0)."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current value (0 for a label set never seen)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_label_text(self.label_names, key)} {format_value(value)}"


class Gauge(_Metric):
    """A value that goes up and down (per label set)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}
        if not labels:
            self._values[()] = 0.0

    def set(self, value: float, **labels: str) -> None:
        """Set the value."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (may be negative)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        """Subtract `amount`."""
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        """The current value (0 for a label set never seen)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_label_text(self.label_names, key)} {format_value(value)}"


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if "le" in labels:
            raise ValueError(f"histogram {name}: 'le' is reserved for buckets")
        super().__init__(name, help, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be distinct and non-empty")
        self.buckets = (*bounds, math.inf)
        # per label set: [count per bucket (not cumulative)..., sum]
        self._data: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        key = self._key(labels)
        with self._lock:
            data = self._data.setdefault(key, [0.0] * (len(self.buckets) + 1))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    data[i] += 1
                    break
            data[-1] += value

    def count(self, **labels: str) -> int:
        """How many observations were recorded for this label set."""
        key = self._key(labels)
        with self._lock:
            data = self._data.get(key)
            return int(sum(data[:-1])) if data else 0

    def _samples(self) -> Iterable[str]:
        for key, data in sorted(self._data.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, data[:-1], strict=True):
                cumulative += n
                names = (*self.label_names, "le")
                values = (*key, format_value(bound))
                yield f"{self.name}_bucket{_label_text(names, values)} {format_value(cumulative)}"
            labels = _label_text(self.label_names, key)
            yield f"{self.name}_sum{labels} {format_value(data[-1])}"
            yield f"{self.name}_count{labels} {format_value(cumulative)}"


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """The metrics of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def _register(self, metric: _M) -> _M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """Register and return a counter."""
        return self._register(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """Register and return a gauge."""
        return self._register(Gauge(name, help, labels))

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Register and return a histogram."""
        return self._register(Histogram(name, help, labels, buckets))

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Run `hook()` before every render (to set gauges read at scrape time)."""
        self._hooks.append(hook)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format."""
        for hook in self._hooks:
            hook()
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(m.render() for m in metrics)


class ReconcileMetrics:
    """The metrics every reconciling loop reports, labelled by controller name.

    `observe` fits `WorkQueue.run_workers(on_result=...)` once bound to a
    controller name with `for_controller`.
    """

    def __init__(self, registry: Registry, prefix: str) -> None:
        self.total = registry.counter(
            f"{prefix}_reconcile_total", "Reconciles run, by controller.", ("controller",)
        )
        self.errors = registry.counter(
            f"{prefix}_reconcile_errors_total",
            "Reconciles that failed and were retried, by controller.",
            ("controller",),
        )
        self.duration = registry.histogram(
            f"{prefix}_reconcile_duration_seconds",
            "Time one reconcile took, by controller.",
            ("controller",),
        )
        self.queue_depth = registry.gauge(
            f"{prefix}_queue_depth",
            "Keys waiting in the work queue (ready or delayed), by controller.",
            ("controller",),
        )

        self.quarantined = registry.gauge(
            f"{prefix}_informer_quarantined_objects",
            "Objects skipped because they cannot be decoded whole (nested too deep), "
            "by controller and resource.",
            ("controller", "resource"),
        )
        self.quarantined_total = registry.counter(
            f"{prefix}_informer_quarantined_objects_total",
            "Object versions skipped because they cannot be decoded whole, "
            "by controller and resource.",
            ("controller", "resource"),
        )
        self.informer_healthy = registry.gauge(
            f"{prefix}_informer_healthy",
            "1 while the resource's list/watch works (or failed for less than its stall "
            "limit), else 0; by controller and resource.",
            ("controller", "resource"),
        )

    def observe_informer(
        self, controller: str, resource: str, *, quarantined: int, total: int, healthy: bool
    ) -> None:
        """Copy one informer's counts into the metrics (called on each scrape)."""
        labels = {"controller": controller, "resource": resource}
        self.quarantined.set(quarantined, **labels)
        seen = self.quarantined_total.value(**labels)
        self.quarantined_total.inc(max(0.0, total - seen), **labels)
        self.informer_healthy.set(1 if healthy else 0, **labels)

    def observe(self, controller: str, error: BaseException | None, seconds: float) -> None:
        """Record one finished reconcile."""
        self.total.inc(controller=controller)
        if error is not None:
            self.errors.inc(controller=controller)
        self.duration.observe(seconds, controller=controller)

    def for_controller(self, controller: str) -> Callable[[str, BaseException | None, float], None]:
        """An `on_result(key, error, seconds)` callback for one controller's queue.

        Also makes the controller's counters appear (at 0) before its first reconcile.
        """
        self.total.inc(0, controller=controller)
        self.errors.inc(0, controller=controller)

        def on_result(_key: str, error: BaseException | None, seconds: float) -> None:
            self.observe(controller, error, seconds)

        return on_result
