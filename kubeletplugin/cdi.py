# SPDX-License-Identifier: Apache-2.0
"""CDI spec files: one transient spec per prepared claim.

The container runtime (CRI-O, containerd) reads every `*.json` and `*.yaml`
file in the CDI spec directories and resolves the CDI device IDs the kubelet
passes to it; our spec gives each allocated device the NX-gzip device node
and the claim's environment.

Each spec also carries the whole `PreparedClaim` in a spec annotation, so the
plugin can rebuild its state from the spec files when its checkpoint is lost
or corrupt. Annotations make the spec version 0.6.0: the runtime's CDI
library (container-device-interface) must be v0.6.0 or newer to accept it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from controller.nx.names import DEVICE_PATH
from kubeletplugin.atomic_write import atomic_write_bytes, remove_durably
from kubeletplugin.claims import CDI_KIND, PreparedClaim, cdi_device_name, validate_claim_uid

log = logging.getLogger(__name__)

CLAIM_ANNOTATION = "nx.device.power.ibm.com/prepared-claim"

_VENDOR, _CLASS = CDI_KIND.split("/", 1)
# container-device-interface pkg/cdi/spec.go GenerateTransientSpecName:
# "<vendor>-<class>_<transient ID>", the extension picking the encoding.
SPEC_FILE_PREFIX = f"{_VENDOR}-{_CLASS}_"
SPEC_FILE_SUFFIX = ".json"

# CDI spec versions that add features, newest first (container-device-interface
# specs-go/version.go). 0.8.0 and 1.0.0 changed no fields, so no spec needs them.
_EARLIEST_CDI_VERSION = "0.3.0"


def _edits_of(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The spec-wide container edits and every device's, in one list."""
    edits = [spec.get("containerEdits") or {}]
    edits += [d.get("containerEdits") or {} for d in spec.get("devices") or []]
    return edits


def _annotated(spec: Mapping[str, Any]) -> bool:
    if spec.get("annotations"):
        return True
    return any(d.get("annotations") for d in spec.get("devices") or [])


def minimum_cdi_version(spec: Mapping[str, Any]) -> str:
    """The lowest `cdiVersion` that allows everything `spec` uses.

    Older runtimes vendor older CDI parsers that refuse newer versions, so a
    spec should claim no more than it needs. Mirrors the rules of
    container-device-interface `specs-go/version.go`.
    """
    edits = _edits_of(spec)
    rdts = [e["intelRdt"] for e in edits if e.get("intelRdt") is not None]
    if any(e.get("netDevices") for e in edits) or any(
        r.get("schemata") is not None or r.get("enableMonitoring") for r in rdts
    ):
        return "1.1.0"
    if rdts or any(e.get("additionalGids") for e in edits):
        return "0.7.0"
    _, _, cdi_class = str(spec.get("kind", "")).partition("/")
    if _annotated(spec) or "." in cdi_class:
        return "0.6.0"
    # Claim UIDs often start with a digit, and device names that do need 0.5.0.
    if any(str(d.get("name", ""))[:1].isdigit() for d in spec.get("devices") or []):
        return "0.5.0"
    if any(n.get("hostPath") for e in edits for n in e.get("deviceNodes") or []):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts") or []):
        return "0.4.0"
    return _EARLIEST_CDI_VERSION


def claim_spec(
    prepared: PreparedClaim,
    device_path: str = DEVICE_PATH,
    host_path: str | None = None,
) -> dict[str, Any]:
    """The CDI spec for one prepared claim.

    One CDI device per prepared device, named `<claim uid>-<device>`, with
    the device's environment (sorted, so the bytes are deterministic) and the
    NX-gzip device node read-write. `host_path` is where the node is on the
    host when that differs from `device_path` in the container (a host
    device root mounted elsewhere).

    Raises:
        ValueError: the claim has no devices (CDI refuses empty specs).
    """
    if not prepared.devices:
        raise ValueError(f"claim {prepared.ref}: no devices to put in a CDI spec")
    node: dict[str, Any] = {"path": device_path, "permissions": "rw"}
    if host_path and host_path != device_path:
        node["hostPath"] = host_path
    spec: dict[str, Any] = {
        "kind": CDI_KIND,
        "annotations": {
            CLAIM_ANNOTATION: orjson.dumps(prepared.to_dict(), option=orjson.OPT_SORT_KEYS).decode()
        },
        "devices": [
            {
                "name": cdi_device_name(prepared.uid, device.device_name),
                "containerEdits": {
                    "env": [f"{k}={v}" for k, v in sorted(device.env.items())],
                    "deviceNodes": [dict(node)],
                },
            }
            for device in prepared.devices
        ],
    }
    return {"cdiVersion": minimum_cdi_version(spec), **spec}


def spec_bytes(spec: Mapping[str, Any]) -> bytes:
    """The file content of a spec: JSON with sorted keys, the same bytes every time."""
    return orjson.dumps(spec, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def spec_file_name(uid: str) -> str:
    """The transient spec file name for a claim, as CDI names transient specs.

    Raises:
        ClaimError: the UID is unsafe in a file name.
    """
    validate_claim_uid(uid)
    # CDI replaces "/" in the transient ID; a validated UID has none.
    return f"{SPEC_FILE_PREFIX}{uid}{SPEC_FILE_SUFFIX}"


def write_claim_spec(cdi_root: Path, spec: Mapping[str, Any], uid: str) -> Path:
    """Write a claim's spec atomically; blocking (a tmpfs write, not fsync'd).

    Creates `cdi_root` when missing (it is a tmpfs that a reboot empties).
    Returns the file's path.
    """
    path = cdi_root / spec_file_name(uid)
    data = spec_bytes(spec)
    # Atomic (the runtime never reads half a spec) but not fsync'd: the CDI root is
    # a tmpfs that a power loss empties anyway, the checkpoint (which is fsync'd) is
    # the record, and the plugin re-creates missing or unreadable specs at start.
    try:
        atomic_write_bytes(path, data, durable=False)
    except FileNotFoundError:
        cdi_root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, durable=False)
    return path


def remove_claim_spec(cdi_root: Path, uid: str) -> bool:
    """Remove a claim's spec; False when there was none. Blocking."""
    return remove_durably(cdi_root / spec_file_name(uid), durable=False)


def list_claim_specs(cdi_root: Path) -> dict[str, dict[str, Any]]:
    """Our claim specs in `cdi_root`, by claim UID.

    Files of other drivers are ignored; ours that cannot be read or parsed
    are skipped with a warning (the runtime would refuse them too).
    """
    specs: dict[str, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(cdi_root))
    except FileNotFoundError:
        return specs
    for entry in entries:
        name = entry.name
        if not (name.startswith(SPEC_FILE_PREFIX) and name.endswith(SPEC_FILE_SUFFIX)):
            continue
        uid = name[len(SPEC_FILE_PREFIX) : -len(SPEC_FILE_SUFFIX)]
        try:
            validate_claim_uid(uid)
            spec = orjson.loads(Path(entry.path).read_bytes())
            if not isinstance(spec, dict) or spec.get("kind") != CDI_KIND:
                raise ValueError(f"not a CDI spec of kind {CDI_KIND}")
        except (OSError, ValueError) as exc:
            log.warning("ignoring CDI spec %s: %s", entry.path, exc)
            continue
        specs[uid] = spec
    return specs


def prepared_claim_from_spec(spec: Mapping[str, Any]) -> PreparedClaim:
    """Recover the `PreparedClaim` a spec was written for, from its annotation.

    Raises:
        ValueError: the annotation is missing or malformed.
    """
    annotations = spec.get("annotations") or {}
    raw = annotations.get(CLAIM_ANNOTATION) if isinstance(annotations, Mapping) else None
    if not isinstance(raw, str):
        raise ValueError(f"CDI spec has no {CLAIM_ANNOTATION} annotation")
    return PreparedClaim.from_dict(orjson.loads(raw))
