# SPDX-License-Identifier: Apache-2.0
"""What IBM's Go driver leaves on a node, and how this plugin takes it over.

Both drivers use the same driver name, plugin directory, state file name and
CDI kind, so installing this plugin in place of IBM's one finds IBM's files:

- the state file `<plugin dir>/checkpoint.json`, written by the kubelet's
  checkpoint manager: `{"checksum": <uint32>, "v1": {"preparedClaims":
  {<claim UID>: [<device>, ...]}}}`, each device the DRA v1 `Device`
  message as JSON (`request_names`, `pool_name`, `device_name`,
  `cdi_device_ids`) plus the `ContainerEdits` IBM computed (and never used);
- a permanent CDI spec `k8s.nx.device.power.ibm.com-nx_common.yaml` (device
  `common`) and one per claim, `k8s.nx.device.power.ibm.com-nx_<uid>.yaml`
  (device `<uid>-crypto-nx-gzip`); a claim's CDI IDs name both devices.

Pods started by IBM's driver keep running on those CDI IDs: the kubelet
remembers them and hands them to the runtime again when it re-creates a
container. So an adopted claim keeps IBM's CDI IDs and IBM's spec files for
as long as it lives: the plugin re-creates them when missing (a reboot empties
the CDI directory), removes a claim's spec when the kubelet unprepares it, and
the common spec once no adopted claim needs it. An adopted claim holds one
credit (IBM's device is the whole accelerator to one pod; here it is one
user among others), which the plugin keeps back from its own slice because
the scheduler counts it against IBM's device `cryptonxgzip`, not ours.

The checksum is the kubelet checkpoint manager's
(`pkg/kubelet/checkpointmanager/checksum`): FNV-32a over the go-spew `%#v`
rendering (`k8s.io/utils/dump.ForHash`) of the compact JSON of the document
with its checksum set to 0; for a byte slice that rendering is
`([]uint8)[b0 b1 ...]`, the bytes in decimal.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from controller.nx.names import DEVICE_PATH
from kubeletplugin.atomic_write import atomic_write_bytes, remove_durably

from .cdi import SPEC_FILE_PREFIX, minimum_cdi_version
from .claims import CDI_KIND, PreparedClaim, PreparedDevice, validate_claim_uid

log = logging.getLogger(__name__)

IBM_DEVICE_NAME = "cryptonxgzip"
IBM_SPEC_SUFFIX = ".yaml"
IBM_COMMON_DEVICE = "common"
IBM_COMMON_SPEC_FILE = f"{SPEC_FILE_PREFIX}{IBM_COMMON_DEVICE}{IBM_SPEC_SUFFIX}"
IBM_COMMON_CDI_ID = f"{CDI_KIND}={IBM_COMMON_DEVICE}"
# What IBM's specs put in the container besides the device node.
IBM_SPEC_ENV = "NX_DEVICE_CLAIM=added"
# IBM's device is exclusive; here an adopted claim is one user among others.
ADOPTED_CLAIM_CREDITS = 1

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193
_CHECKSUM_FIELD = re.compile(rb'\A\s*\{"checksum":(\d+),')


class IbmCheckpointError(ValueError):
    """IBM's state file is damaged: its checksum or structure does not hold."""


# --- names --------------------------------------------------------------------------------


def ibm_claim_device(uid: str) -> str:
    """The CDI device IBM's per-claim spec defines: `<uid>-crypto-nx-gzip`."""
    return f"{uid}-crypto-nx-gzip"


def ibm_cdi_device_ids(uid: str) -> tuple[str, str]:
    """The CDI device IDs IBM's driver answers for a claim: common, then the claim's."""
    return IBM_COMMON_CDI_ID, f"{CDI_KIND}={ibm_claim_device(uid)}"


def ibm_claim_spec_file(uid: str) -> str:
    """IBM's per-claim spec file name (a CDI transient spec name, YAML).

    Raises:
        ClaimError: the UID is unsafe in a file name.
    """
    validate_claim_uid(uid)
    return f"{SPEC_FILE_PREFIX}{uid}{IBM_SPEC_SUFFIX}"


def uses_ibm_specs(claim: PreparedClaim) -> bool:
    """Whether the claim's CDI devices are defined by IBM's spec files (an adopted claim)."""
    return any(IBM_COMMON_CDI_ID in d.cdi_device_ids for d in claim.devices)


def credits_outside_our_slice(claims: Iterable[PreparedClaim]) -> int:
    """Credits of prepared claims allocated from IBM's device, which the scheduler
    does not count against ours: adopted claims, and claims it allocated from
    IBM's slice before this plugin replaced it."""
    return sum(d.credits for c in claims for d in c.devices if d.device_name == IBM_DEVICE_NAME)


# --- the state file -----------------------------------------------------------------------


def ibm_checksum(zeroed_json: bytes) -> int:
    """The checkpoint manager's checksum of the document's JSON with checksum 0."""
    rendered = "([]uint8)[" + " ".join(map(str, zeroed_json)) + "]"
    value = _FNV32_OFFSET
    for byte in rendered.encode():
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def go_json(value: Any) -> bytes:
    """`value` as Go's encoding/json writes it: compact, keys in the given order,
    `<`, `>`, `&`, U+2028 and U+2029 escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text.encode()


def looks_like_ibm_checkpoint(document: Any) -> bool:
    """Whether a parsed state file has the shape IBM's driver writes (not ours)."""
    return (
        isinstance(document, dict)
        and "version" not in document
        and isinstance(document.get("checksum"), int)
        and set(document) <= {"checksum", "v1"}
    )


def _verify_ibm_checksum(data: bytes, document: Mapping[str, Any]) -> None:
    stored = document["checksum"]
    # The bytes IBM's driver hashed are the file with its checksum zeroed; a file
    # re-formatted by hand is checked the way its driver checks it, re-encoded.
    match = _CHECKSUM_FIELD.match(data)
    candidates = []
    if match:
        candidates.append(data[: match.start(1)] + b"0" + data[match.end(1) :].rstrip())
    candidates.append(go_json({**document, "checksum": 0}))
    if not any(ibm_checksum(c) == stored for c in candidates):
        raise IbmCheckpointError(
            f"checksum mismatch (stored {stored}, computed "
            f"{ibm_checksum(candidates[-1])}): the file was damaged or edited"
        )


def decode_ibm_checkpoint(data: bytes) -> dict[str, PreparedClaim]:
    """IBM's prepared claims from its state file, as claims this plugin owns.

    Each of IBM's devices becomes a prepared device of one credit that keeps
    IBM's request names, pool, device name and CDI device IDs (the kubelet
    has them). Namespace and name are not in IBM's file; they stay empty.

    Raises:
        IbmCheckpointError: not IBM's format, wrong checksum, or malformed.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise IbmCheckpointError(f"not valid JSON: {exc}") from None
    if not looks_like_ibm_checkpoint(document):
        raise IbmCheckpointError("not the state file of IBM's driver")
    _verify_ibm_checksum(data, document)
    v1 = document.get("v1") or {}
    raw_claims = v1.get("preparedClaims") or {} if isinstance(v1, dict) else None
    if not isinstance(raw_claims, dict):
        raise IbmCheckpointError("v1.preparedClaims must be an object")
    claims: dict[str, PreparedClaim] = {}
    for uid, raw_devices in raw_claims.items():
        try:
            validate_claim_uid(uid)
            devices = tuple(_adopted_device(d) for d in raw_devices or [])
        except (ValueError, TypeError, AttributeError) as exc:
            raise IbmCheckpointError(f"claim {uid}: {exc}") from None
        # IBM's driver records a claim with none of its devices as prepared with
        # nothing: there is nothing to keep, and its unprepare succeeds anyway.
        if devices:
            claims[uid] = PreparedClaim(uid=uid, namespace="", name="", devices=devices)
    return claims


def _strings(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _adopted_device(raw: Any) -> PreparedDevice:
    if not isinstance(raw, Mapping):
        raise ValueError(f"device must be an object, got {type(raw).__name__}")
    pool, device = raw.get("pool_name"), raw.get("device_name")
    if not isinstance(pool, str) or not isinstance(device, str) or not device:
        raise ValueError("device: pool_name and device_name must be strings")
    return PreparedDevice(
        request_names=_strings(raw, "request_names"),
        pool_name=pool,
        device_name=device,
        cdi_device_ids=_strings(raw, "cdi_device_ids"),
        credits=ADOPTED_CLAIM_CREDITS,
        env={},
    )


# --- the CDI spec files -------------------------------------------------------------------


def _ibm_spec(device: str, device_path: str, host_path: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": CDI_KIND,
        "devices": [
            {
                "name": device,
                "containerEdits": {
                    "env": [IBM_SPEC_ENV],
                    "deviceNodes": [{"path": device_path, "hostPath": host_path or device_path}],
                },
            }
        ],
    }
    return {"cdiVersion": minimum_cdi_version(spec), **spec}


def ibm_spec_files(uid: str) -> tuple[str, str]:
    """The two spec files an adopted claim's CDI IDs resolve through."""
    return IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(uid)


def ibm_specs_present(cdi_root: Path, uid: str) -> bool:
    """Whether both spec files of an adopted claim exist."""
    return all((cdi_root / name).exists() for name in ibm_spec_files(uid))


def write_ibm_specs(
    cdi_root: Path,
    uid: str,
    device_path: str = DEVICE_PATH,
    host_path: str | None = None,
) -> list[str]:
    """Re-create the missing spec files of an adopted claim, as IBM's driver wrote
    them (JSON, which YAML parsers read too); returns the names written. Blocking."""
    written = []
    for name, device in (
        (IBM_COMMON_SPEC_FILE, IBM_COMMON_DEVICE),
        (ibm_claim_spec_file(uid), ibm_claim_device(uid)),
    ):
        path = cdi_root / name
        if path.exists():
            continue
        data = orjson.dumps(
            _ibm_spec(device, device_path, host_path), option=orjson.OPT_APPEND_NEWLINE
        )
        try:
            atomic_write_bytes(path, data, durable=False)
        except FileNotFoundError:
            cdi_root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, durable=False)
        written.append(name)
    return written


def ibm_claim_spec_uids(cdi_root: Path) -> set[str]:
    """Claim UIDs of IBM's per-claim spec files in `cdi_root`."""
    try:
        names = os.listdir(cdi_root)
    except FileNotFoundError:
        return set()
    uids = set()
    for name in names:
        if not (name.startswith(SPEC_FILE_PREFIX) and name.endswith(IBM_SPEC_SUFFIX)):
            continue
        uid = name[len(SPEC_FILE_PREFIX) : -len(IBM_SPEC_SUFFIX)]
        if uid != IBM_COMMON_DEVICE:
            uids.add(uid)
    return uids


def remove_ibm_specs(
    cdi_root: Path, uids: Iterable[str], remaining: Iterable[PreparedClaim]
) -> list[str]:
    """Remove IBM's spec files of claims that are gone, and the common spec once
    no remaining claim uses IBM's specs; returns the names removed. Blocking."""
    removed = []
    for uid in uids:
        try:
            name = ibm_claim_spec_file(uid)
        except ValueError:
            continue
        if remove_durably(cdi_root / name, durable=False):
            removed.append(name)
    # Looking for the common spec first: without it (a node that never ran IBM's
    # driver, or one whose take-over is complete) the claims need no scan.
    common = cdi_root / IBM_COMMON_SPEC_FILE
    if (
        common.exists()
        and not any(uses_ibm_specs(c) for c in remaining)
        and remove_durably(common, durable=False)
    ):
        removed.append(IBM_COMMON_SPEC_FILE)
    return removed


def reconcile_ibm_specs(
    cdi_root: Path,
    claims: Mapping[str, PreparedClaim],
    device_path: str = DEVICE_PATH,
    host_path: str | None = None,
) -> list[str]:
    """Make IBM's spec files match the prepared claims; notes for the operator. Blocking.

    An adopted claim gets its two files back when missing; a per-claim file of
    a claim that is not prepared (IBM's driver wrote it and died before
    recording the claim, or the claim is gone) is removed, and the common
    file too once no claim uses it.
    """
    notes = []
    adopted = {uid for uid, c in claims.items() if uses_ibm_specs(c)}
    for uid in sorted(adopted):
        for name in write_ibm_specs(cdi_root, uid, device_path, host_path):
            notes.append(f"re-created CDI spec {name} of claim {uid} adopted from IBM's driver")
    stale = sorted(ibm_claim_spec_uids(cdi_root) - adopted)
    for name in remove_ibm_specs(cdi_root, stale, claims.values()):
        notes.append(f"removed CDI spec {name} of IBM's driver: no prepared claim uses it")
    return notes
