# SPDX-License-Identifier: Apache-2.0
"""Kubernetes Events (events.k8s.io/v1) about the objects we look after.

An Event's name is derived from what it reports (`<object>.<fingerprint>`),
so reporting the same problem again, from a retry, a re-list or another
replica after a leader change, hits AlreadyExists instead of adding a
duplicate. A new problem (another allocation, another message) gets a new
fingerprint and a new Event.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from controller.kube.client import ApiClient
from controller.kube.errors import AlreadyExists
from controller.kube.resources import EVENTS
from controller.leader import format_micro_time

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "nx.device.power.ibm.com/controller"
WARNING = "Warning"

# Limits the API server validates (pkg/apis/core/validation/events.go).
NOTE_MAX = 1024
REASON_MAX = 128
ACTION_MAX = 128
REPORTING_INSTANCE_MAX = 128
_NAME_MAX = 253
_FINGERPRINT_LENGTH = 16


def fingerprint(*parts: str) -> str:
    """A short stable hash of what an Event reports."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return digest[:_FINGERPRINT_LENGTH]


def event_name(object_name: str, what: str) -> str:
    """`<object name>.<fingerprint>`, shortened to fit an object name."""
    suffix = "." + what
    return object_name[: _NAME_MAX - len(suffix)].rstrip(".-") + suffix


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_object(
    *,
    regarding: Mapping[str, Any],
    reason: str,
    note: str,
    action: str,
    reporting_instance: str,
    now: datetime,
    name: str,
    type: str = WARNING,
) -> dict[str, Any]:
    """An events.k8s.io/v1 Event about `regarding` (an object as the API returned it)."""
    meta = regarding.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    ref = {
        "apiVersion": str(regarding.get("apiVersion") or ""),
        "kind": str(regarding.get("kind") or ""),
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    return {
        "apiVersion": EVENTS.api_version,
        "kind": EVENTS.kind,
        "metadata": {"name": name, "namespace": namespace},
        "eventTime": format_micro_time(now),
        "type": type,
        "reason": _clip(reason, REASON_MAX),
        "action": _clip(action, ACTION_MAX),
        "note": _clip(note, NOTE_MAX),
        "regarding": {k: v for k, v in ref.items() if v},
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": _clip(reporting_instance, REPORTING_INSTANCE_MAX),
    }


async def record_event(client: ApiClient, event: Mapping[str, Any]) -> bool:
    """Create the Event; False when an Event of that name (the same report) exists already."""
    try:
        await client.create(EVENTS, event)
    except AlreadyExists:
        return False
    log.info(
        "recorded event",
        extra={
            "event": event["metadata"]["name"],
            "reason": event.get("reason"),
            "regarding": f"{event['regarding'].get('namespace')}/{event['regarding'].get('name')}",
        },
    )
    return True
