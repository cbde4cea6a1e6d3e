# SPDX-License-Identifier: Apache-2.0
"""The JSON log lines both processes write: one object a line, extra fields kept."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.process.logs import setup_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging(0, stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_its_extra_fields(captured: io.StringIO) -> None:
    logging.getLogger("kubeletplugin").info(
        "claim prepared\nsecond line",
        extra={"claim": "ns/é", "path": Path("/var/run/cdi"), "credits": 3},
    )
    assert captured.getvalue().count("\n") == 1
    (entry,) = lines(captured)
    assert entry["level"] == "info"
    assert entry["logger"] == "kubeletplugin"
    assert entry["msg"] == "claim prepared\nsecond line"
    assert (entry["claim"], entry["path"], entry["credits"]) == ("ns/é", "/var/run/cdi", 3)
    assert str(entry["ts"]).endswith("Z")


def test_an_exception_comes_with_its_traceback(captured: io.StringIO) -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("controller").exception("reconcile failed")
    (entry,) = lines(captured)
    assert entry["level"] == "error"
    assert "ValueError: bad value" in str(entry["traceback"])


def test_debug_lines_only_at_verbosity_one(captured: io.StringIO) -> None:
    logging.getLogger("kubeletplugin").debug("hidden")
    setup_logging(1, captured)
    logging.getLogger("kubeletplugin").debug("shown")
    assert [e["msg"] for e in lines(captured)] == ["shown"]
