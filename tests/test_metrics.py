# SPDX-License-Identifier: Apache-2.0
"""Each process's own Prometheus registry, its exposition as Prometheus reads it, and the
health server that answers probes and scrapes."""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import REGISTRY

from controller.process.http_server import parse_bind_address, serve_http
from controller.process.metrics import (
    CollectorRegistry,
    Counter,
    Gauge,
    GaugeMetricFamily,
    InformerState,
    LoopState,
    ReconcileMetrics,
    ScrapeTime,
    exposition,
    new_registry,
)
from tests.harness.cluster import ControlPlane
from tests.harness.plugin import PluginProcess
from tests.metrics_text import families, sample, sample_value

CONTROLLER_FAMILIES = {
    "p_reconcile_total": ("counter", "Reconciles run, by controller."),
    "p_reconcile_errors_total": (
        "counter",
        "Reconciles that failed and were retried, by controller.",
    ),
    "p_reconcile_duration_seconds": ("histogram", "Time one reconcile took, by controller."),
    "p_queue_depth": (
        "gauge",
        "Keys waiting in the work queue (ready or delayed), by controller.",
    ),
    "p_informer_quarantined_objects": (
        "gauge",
        "Objects skipped because they cannot be decoded whole (nested too deep), "
        "by controller and resource.",
    ),
    "p_informer_quarantined_objects_total": (
        "counter",
        "Object versions skipped because they cannot be decoded whole, by controller and resource.",
    ),
    "p_informer_healthy": (
        "gauge",
        "1 while the resource's list/watch works (or failed for less than its stall "
        "limit), else 0; by controller and resource.",
    ),
}
# The plugin's metrics, as dashboards and docs name them.
PLUGIN_FAMILIES = {
    "power_dra_plugin_request_seconds": (
        "histogram",
        "Latency of NodePrepareResources / NodeUnprepareResources",
    ),
    "power_dra_plugin_prepared_claims": ("gauge", "Claims prepared on this node"),
    "power_dra_plugin_claims_total": ("gauge", "Claims handled since start"),
    "power_dra_plugin_claim_reads_total": (
        "gauge",
        "Claims prepare read, by where the answer came from (cache: the API server's "
        "watch cache; etcd: a quorum read)",
    ),
    "power_dra_plugin_state_calls_total": (
        "gauge",
        "Prepare and unprepare calls by the thread that wrote the state (loop: the "
        "event loop, quick writes; state: the state thread)",
    ),
    "power_dra_plugin_credits_total": ("gauge", "NX-gzip credits published"),
    "power_dra_plugin_credits_allocated": ("gauge", "NX-gzip credits of prepared claims"),
}


def scrape(registry: CollectorRegistry) -> str:
    body, _ = exposition(registry)
    return body.decode()


def test_unlabelled_metrics_start_at_zero() -> None:
    reg = new_registry()
    Gauge("x_leader", "Leading.", registry=reg)
    Counter("x_events_total", "Events.", registry=reg)
    text = scrape(reg)
    assert sample(text, "x_leader") == 0
    assert sample(text, "x_events_total") == 0


def test_no_created_series_beside_counters() -> None:
    reg = new_registry()
    Counter("x_events_total", "Events.", registry=reg).inc()
    assert [s.name for s in families(scrape(reg))["x_events_total"].samples] == ["x_events_total"]


def test_each_process_registry_is_its_own_and_not_the_global_one() -> None:
    first, second = new_registry(), new_registry()
    Counter("x_same_total", "Same name in two processes.", registry=first).inc(2)
    Counter("x_same_total", "Same name in two processes.", registry=second).inc(5)
    assert sample(scrape(first), "x_same_total") == 2
    assert sample(scrape(second), "x_same_total") == 5
    assert REGISTRY.get_sample_value("x_same_total") is None


def test_a_name_registered_twice_is_refused() -> None:
    reg = new_registry()
    Gauge("x_depth", "Depth.", registry=reg)
    with pytest.raises(ValueError, match="x_depth"):
        reg.register(ScrapeTime(lambda: [GaugeMetricFamily("x_depth", "Depth.", value=1)]))


def test_scrape_time_families_are_built_at_each_scrape() -> None:
    reg = new_registry()
    depth = [7]
    reg.register(ScrapeTime(lambda: [GaugeMetricFamily("x_depth", "Depth.", value=depth[0])]))
    assert sample(scrape(reg), "x_depth") == 7
    depth[0] = 2
    assert sample(scrape(reg), "x_depth") == 2


def test_reconcile_metrics_keep_their_names_types_and_help() -> None:
    reg = new_registry()
    ReconcileMetrics(reg, "p")
    found = {name: (f.type, f.documentation) for name, f in families(scrape(reg)).items()}
    assert found == CONTROLLER_FAMILIES


def test_reconcile_metrics_count_runs_errors_and_latency_per_controller() -> None:
    reg = new_registry()
    m = ReconcileMetrics(reg, "p")
    on_result = m.for_controller("claims")
    assert sample(scrape(reg), "p_reconcile_errors_total", controller="claims") == 0
    on_result("ns/a", None, 0.002)
    on_result("ns/a", RuntimeError("boom"), 0.5)
    text = scrape(reg)
    assert sample(text, "p_reconcile_total", controller="claims") == 2
    assert sample(text, "p_reconcile_errors_total", controller="claims") == 1
    assert sample(text, "p_reconcile_duration_seconds_count", controller="claims") == 2
    assert sample(text, "p_reconcile_duration_seconds_sum", controller="claims") == 0.502


def test_reconcile_durations_fall_into_buckets_from_a_millisecond_to_ten_seconds() -> None:
    reg = new_registry()
    m = ReconcileMetrics(reg, "p")
    for seconds in (0.0005, 0.3, 0.3, 30.0):
        m.observe("claims", None, seconds)
    buckets = {
        float(s.labels["le"]): s.value
        for s in families(scrape(reg))["p_reconcile_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert min(buckets) == 0.001 and sorted(buckets)[-2] == 10.0
    assert (buckets[0.001], buckets[0.25], buckets[0.5], buckets[10.0]) == (1, 1, 3, 3)
    assert buckets[float("inf")] == 4


def test_loop_states_are_read_at_each_scrape() -> None:
    reg = new_registry()
    loops = [LoopState("claims", 3, (InformerState("resourceclaims", 1, 2, healthy=False),))]
    ReconcileMetrics(reg, "p", lambda: loops)
    labels = {"controller": "claims", "resource": "resourceclaims"}
    text = scrape(reg)
    assert sample(text, "p_queue_depth", controller="claims") == 3
    assert sample(text, "p_informer_quarantined_objects", **labels) == 1
    assert sample(text, "p_informer_quarantined_objects_total", **labels) == 2
    assert sample(text, "p_informer_healthy", **labels) == 0
    loops[0] = LoopState("claims", 0, (InformerState("resourceclaims", 0, 2, healthy=True),))
    text = scrape(reg)
    assert sample(text, "p_queue_depth", controller="claims") == 0
    assert sample(text, "p_informer_healthy", **labels) == 1


def test_the_quarantine_counter_does_not_go_down_when_an_informer_is_recreated() -> None:
    reg = new_registry()
    loops = [LoopState("claims", 0, (InformerState("resourceclaims", 0, 5, healthy=True),))]
    ReconcileMetrics(reg, "p", lambda: loops)
    labels = {"controller": "claims", "resource": "resourceclaims"}
    assert sample(scrape(reg), "p_informer_quarantined_objects_total", **labels) == 5
    loops[0] = LoopState("claims", 0, (InformerState("resourceclaims", 0, 1, healthy=True),))
    assert sample(scrape(reg), "p_informer_quarantined_objects_total", **labels) == 5
    loops.clear()  # leadership lost: no loops run, the counter stays
    text = scrape(reg)
    assert sample(text, "p_informer_quarantined_objects_total", **labels) == 5
    assert sample_value(text, "p_queue_depth", controller="claims") is None


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        (":8080", (None, 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("0", None),
        ("", None),
    ],
)
def test_bind_addresses(bind: str, expected: object) -> None:
    assert parse_bind_address(bind) == expected


@pytest.mark.parametrize("bind", ["8080", "localhost", ":http", ":70000"])
def test_bad_bind_addresses_say_what_is_accepted(bind: str) -> None:
    with pytest.raises(ValueError, match="use host:port"):
        parse_bind_address(bind)


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body.decode()


@pytest.mark.anyio
async def test_http_server_answers_probes_and_metrics_on_a_free_port() -> None:
    reg = new_registry()
    Counter("x_total", "X.", registry=reg).inc()
    ready = [False]
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, "127.0.0.1:0", reg, lambda: ready[0], lambda: True)
        assert isinstance(port, int) and port > 0
        assert (await _get(port, "/healthz"))[0] == 200
        assert (await _get(port, "/readyz"))[0] == 503
        ready[0] = True
        assert (await _get(port, "/readyz"))[0] == 200
        status, headers, body = await _get(port, "/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        assert sample(body, "x_total") == 1
        status, headers, body = await _get(port, "/metrics", method="HEAD")
        assert status == 200 and body == "" and int(headers["Content-Length"]) > 0
        assert (await _get(port, "/nope"))[0] == 404
        assert (await _get(port, "/healthz", method="POST"))[0] == 405
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_http_server_reports_unhealthy() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            serve_http, "127.0.0.1:0", new_registry(), lambda: True, lambda: False
        )
        assert (await _get(port, "/healthz"))[0] == 503
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_http_server_disabled_reports_no_port() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, "0", new_registry(), lambda: True, lambda: True)
    assert port is None


# --- the real processes ---------------------------------------------------------------


@pytest.fixture
def plugin(control_plane: ControlPlane, unique_name: str) -> Iterator[PluginProcess]:
    """A plugin process with 4 credits, its slice published."""
    workdir = Path(tempfile.mkdtemp(prefix="nx-met-"))  # short paths for its sockets
    control_plane.create_node(unique_name)
    process = PluginProcess(control_plane, unique_name, workdir, total_credits=4).start()
    try:
        process.wait_for_slices(60)
        yield process
    finally:
        process.stop()
        control_plane.kubectl("delete", "node", unique_name, "--wait=false", check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.cluster
def test_the_plugin_serves_its_metrics_in_the_prometheus_text_format(
    plugin: PluginProcess,
) -> None:
    url = f"http://127.0.0.1:{plugin.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        content_type, text = resp.headers["Content-Type"], resp.read().decode()
    assert content_type == CONTENT_TYPE_PLAIN_0_0_4
    found = families(text)
    assert {name: (found[name].type, found[name].documentation) for name in PLUGIN_FAMILIES} == (
        PLUGIN_FAMILIES
    )
    node = plugin.node_name
    assert sample(text, "power_dra_plugin_credits_total", node=node) == 3  # 1 reserved
    assert sample(text, "power_dra_plugin_credits_allocated", node=node) == 0
    assert sample(text, "power_dra_plugin_prepared_claims") == 0
    assert sample(text, "power_dra_plugin_claims_total", operation="prepare") == 0
    assert sample(text, "power_dra_plugin_claim_reads_total", source="cache") == 0
    assert sample(text, "power_dra_plugin_claim_reads_total", source="etcd") == 0
    assert sample(text, "power_dra_plugin_state_calls_total", thread="loop") == 0
    assert sample(text, "power_dra_plugin_state_calls_total", thread="state") == 0
