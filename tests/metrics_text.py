# SPDX-License-Identifier: Apache-2.0
"""Reading a /metrics answer the way Prometheus does: parsed, not pattern-matched."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def families(text: str) -> dict[str, Metric]:
    """The metric families of a Prometheus text exposition, by the name the code and the
    dashboards use (a counter's with its `_total`, which the parser drops from the family)."""
    return {
        family.name + ("_total" if family.type == "counter" else ""): family
        for family in text_string_to_metric_families(text)
    }


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly these labels (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly these labels; fails when absent."""
    value = sample_value(text, name, **labels)
    assert value is not None, f"no sample {name}{labels} in:\n{text}"
    return value
