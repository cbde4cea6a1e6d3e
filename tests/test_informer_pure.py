# SPDX-License-Identifier: Apache-2.0
"""The informer's pure parts: relist diffs and watch events applied to a cache."""

from __future__ import annotations

from typing import Any

from controller.kube.informer import apply_watch_event, diff_relist


def _obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv, "managedFields": [{"m": 1}]}}


def test_relist_reports_added_updated_and_deleted_but_not_unchanged() -> None:
    cache = {"a": _obj("a", "1"), "b": _obj("b", "1"), "c": _obj("c", "1")}
    changes = diff_relist(cache, [_obj("a", "1"), _obj("b", "2"), _obj("d", "3")])
    got = sorted((c.key, c.old is None, c.new is None) for c in changes)
    assert got == [("b", False, False), ("c", False, True), ("d", True, False)]
    assert sorted(cache) == ["a", "b", "d"]


def test_watch_event_with_a_seen_resource_version_is_not_a_change() -> None:
    cache = {"a": _obj("a", "1")}
    assert apply_watch_event(cache, {"type": "MODIFIED", "object": _obj("a", "1")}) is None
    change = apply_watch_event(cache, {"type": "MODIFIED", "object": _obj("a", "2")})
    assert change is not None and change.old is not None and change.new is not None


def test_bookmarks_change_nothing_and_deletes_remove_from_the_cache() -> None:
    cache = {"a": _obj("a", "1")}
    assert apply_watch_event(cache, {"type": "BOOKMARK", "object": _obj("", "9")}) is None
    change = apply_watch_event(cache, {"type": "DELETED", "object": _obj("a", "3")})
    assert change is not None and change.new is None and cache == {}


def test_cached_objects_carry_no_managed_fields() -> None:
    cache: dict[str, dict[str, Any]] = {}
    diff_relist(cache, [_obj("a", "1")])
    apply_watch_event(cache, {"type": "ADDED", "object": _obj("b", "1")})
    assert all("managedFields" not in o["metadata"] for o in cache.values())


def test_api_connections_probe_a_silent_peer_within_a_minute() -> None:
    import socket

    from controller.kube.client import keepalive_socket

    with keepalive_socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0))) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        interval = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
        count = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
    assert idle + interval * count <= 60  # the kernel's default is two hours
