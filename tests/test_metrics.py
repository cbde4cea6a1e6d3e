# SPDX-License-Identifier: Apache-2.0
"""The metrics registry renders the Prometheus text format; the health server answers probes."""

from __future__ import annotations

import anyio
import pytest

from controller.process.http_server import parse_bind_address, serve_http
from controller.process.metrics import CONTENT_TYPE, ReconcileMetrics, Registry, format_value


def test_counter_renders_help_type_and_labelled_samples() -> None:
    reg = Registry()
    c = reg.counter("x_reconcile_total", "Reconciles run.", ("controller",))
    c.inc(controller="claims")
    c.inc(2, controller="claims")
    c.inc(controller="slices")
    assert reg.render() == (
        "# HELP x_reconcile_total Reconciles run.\n"
        "# TYPE x_reconcile_total counter\n"
        'x_reconcile_total{controller="claims"} 3\n'
        'x_reconcile_total{controller="slices"} 1\n'
    )


def test_unlabelled_metrics_start_at_zero() -> None:
    reg = Registry()
    reg.gauge("x_leader", "Leading.")
    reg.counter("x_events_total", "Events.")
    text = reg.render()
    assert "x_leader 0\n" in text
    assert "x_events_total 0\n" in text


def test_gauge_goes_up_and_down() -> None:
    reg = Registry()
    g = reg.gauge("x_depth", "Depth.", ("queue",))
    g.set(5, queue="a")
    g.dec(2, queue="a")
    g.inc(queue="a")
    assert g.value(queue="a") == 4
    assert 'x_depth{queue="a"} 4\n' in reg.render()


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    reg = Registry()
    h = reg.histogram("x_seconds", "Latency.", ("c",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v, c="a")
    lines = reg.render().splitlines()
    assert lines[2:] == [
        'x_seconds_bucket{c="a",le="0.1"} 1',
        'x_seconds_bucket{c="a",le="1"} 3',
        'x_seconds_bucket{c="a",le="+Inf"} 4',
        'x_seconds_sum{c="a"} 4.05',
        'x_seconds_count{c="a"} 4',
    ]
    assert h.count(c="a") == 4


def test_label_values_and_help_are_escaped() -> None:
    reg = Registry()
    c = reg.counter("x_total", 'Help with \\ and\nnewline "quotes".', ("k",))
    c.inc(k='a"b\\c\nd')
    text = reg.render()
    assert '# HELP x_total Help with \\\\ and\\nnewline "quotes".\n' in text
    assert 'x_total{k="a\\"b\\\\c\\nd"} 1\n' in text


def test_labels_must_match_the_declaration() -> None:
    c = Registry().counter("x_total", "X.", ("controller",))
    with pytest.raises(ValueError, match=r"expected exactly \['controller'\]"):
        c.inc(queue="a")
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, controller="a")


def test_invalid_and_duplicate_names_are_refused() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.counter("x-total", "X.")
    with pytest.raises(ValueError, match="invalid label name"):
        reg.counter("x_total", "X.", ("__reserved",))
    reg.counter("x_total", "X.")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge("x_total", "X.")
    with pytest.raises(ValueError, match="reserved"):
        reg.histogram("x_h", "X.", ("le",))


def test_values_are_formatted_like_prometheus() -> None:
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("nan")) == "NaN"


def test_collect_hooks_run_before_each_render() -> None:
    reg = Registry()
    g = reg.gauge("x_depth", "Depth.")
    depth = [7]
    reg.on_collect(lambda: g.set(depth[0]))
    assert "x_depth 7\n" in reg.render()
    depth[0] = 2
    assert "x_depth 2\n" in reg.render()


def test_reconcile_metrics_count_runs_errors_and_latency() -> None:
    reg = Registry()
    m = ReconcileMetrics(reg, "p")
    on_result = m.for_controller("claims")
    assert 'p_reconcile_errors_total{controller="claims"} 0\n' in reg.render()
    on_result("ns/a", None, 0.002)
    on_result("ns/a", RuntimeError("boom"), 0.5)
    assert m.total.value(controller="claims") == 2
    assert m.errors.value(controller="claims") == 1
    assert m.duration.count(controller="claims") == 2


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
    reg = Registry()
    reg.counter("x_total", "X.").inc()
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
        assert headers["Content-Type"] == CONTENT_TYPE
        assert "x_total 1\n" in body
        status, headers, body = await _get(port, "/metrics", method="HEAD")
        assert status == 200 and body == "" and int(headers["Content-Length"]) > 0
        assert (await _get(port, "/nope"))[0] == 404
        assert (await _get(port, "/healthz", method="POST"))[0] == 405
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_http_server_reports_unhealthy() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, "127.0.0.1:0", Registry(), lambda: True, lambda: False)
        assert (await _get(port, "/healthz"))[0] == 503
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_http_server_disabled_reports_no_port() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, "0", Registry(), lambda: True, lambda: True)
    assert port is None
