# SPDX-License-Identifier: Apache-2.0
"""A stand-in for IBM's Go driver on a real node, to test taking a node over from it.

It does, on the node's files and with the node's API credentials, what IBM's
driver (github.com/IBM/power-dra-driver) does, as far as a later plugin can see:

- publishes IBM's ResourceSlice: pool = node name, one device `cryptonxgzip`
  with attribute `index` (int 0) and capacity `nxgzip`, as the node itself
  (the node authorizer lets a node write slices that name it);
- registers with the kubelet (`<driver>-reg.sock`, DRA v1 on `dra.sock` in
  the plugin directory) and serves NodePrepareResources and
  NodeUnprepareResources with grpcio;
- writes IBM's permanent CDI spec `..._common.yaml` at start, one spec per
  claim `..._<uid>.yaml` (YAML, as IBM's CDI library writes them) and its
  state file `checkpoint.json` in the kubelet checkpoint manager's format
  with a valid checksum; answers the CDI IDs `.../nx=common` and
  `.../nx=<uid>-crypto-nx-gzip`.

Nothing of it is shipped; `stop()` removes its sockets (its DaemonSet pod
going away) and deletes its slice only when asked (IBM's driver leaves it).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml

from kubeletplugin.ibm_state import (
    IBM_COMMON_DEVICE,
    IBM_COMMON_SPEC_FILE,
    IBM_DEVICE_NAME,
    IBM_SPEC_ENV,
    go_json,
    ibm_cdi_device_ids,
    ibm_checksum,
    ibm_claim_device,
    ibm_claim_spec_file,
)
from tests import grpc_stubs
from tests.harness.node import Api, RealNode
from tests.harness.plugin import DRIVER

SLICES = "/apis/resource.k8s.io/v1/resourceslices"
CDI_KIND = "k8s.nx.device.power.ibm.com/nx"
# What IBM's applyConfig puts in each device's ContainerEdits (recorded, never applied).
IBM_DEVICE_ENV = (
    f"NX_DEVICE={IBM_DEVICE_NAME}",
    "NX_DEVICE_SHARING_STRATEGY=TimeSlicing",
    "NX_DEVICE_TIMESLICE_INTERVAL=Default",
)


def encode_ibm_checkpoint(prepared: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """IBM's state file holding `prepared` (claim UID -> IBM device dicts), as its
    driver writes it: Go's JSON (map keys sorted, struct fields in order) with
    the checksum. The inverse of `decode_ibm_checkpoint`."""
    v1: dict[str, Any] = {}
    if prepared:  # `preparedClaims,omitempty`
        v1["preparedClaims"] = {uid: list(prepared[uid]) for uid in sorted(prepared)}
    document: dict[str, Any] = {"checksum": 0, "v1": v1}
    document["checksum"] = ibm_checksum(go_json(document))
    return go_json(document)


def ibm_device(uid: str, node_name: str, request: str, env: Sequence[str] = ()) -> dict[str, Any]:
    """One device entry of IBM's state file, in Go's field order."""
    device: dict[str, Any] = {
        "request_names": [request],
        "pool_name": node_name,
        "device_name": IBM_DEVICE_NAME,
        "cdi_device_ids": list(ibm_cdi_device_ids(uid)),
        "ContainerEdits": {"env": list(env)} if env else None,
    }
    return device


def ibm_slice(node: str) -> dict[str, Any]:
    """IBM's driver's ResourceSlice for `node`."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"generateName": f"{node}-{DRIVER}-"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {
                    "name": IBM_DEVICE_NAME,
                    "attributes": {"index": {"int": 0}},
                    "capacity": {"nxgzip": {"value": "1"}},
                }
            ],
        },
    }


def ibm_spec_yaml(device: str) -> str:
    """A CDI spec as IBM's driver writes it (cdiVersion from the CDI library's rules)."""
    spec = {
        "cdiVersion": "0.5.0",  # hostPath and device names starting with a digit
        "kind": CDI_KIND,
        "devices": [
            {
                "name": device,
                "containerEdits": {
                    "env": [IBM_SPEC_ENV],
                    "deviceNodes": [
                        {"path": "/dev/crypto/nx-gzip", "hostPath": "/dev/crypto/nx-gzip"}
                    ],
                },
            }
        ],
        "containerEdits": {},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def write_ibm_files(plugin_dir: Path, cdi_root: Path, node: str, uids: list[str]) -> None:
    """The files IBM's driver leaves on a node whose claims `uids` it prepared."""
    plugin_dir.mkdir(parents=True, exist_ok=True)
    cdi_root.mkdir(parents=True, exist_ok=True)
    (plugin_dir / "checkpoint.json").write_bytes(
        encode_ibm_checkpoint(
            {u: [ibm_device(u, node, "crypto-nx-gzip", IBM_DEVICE_ENV)] for u in uids}
        )
    )
    (cdi_root / IBM_COMMON_SPEC_FILE).write_text(ibm_spec_yaml(IBM_COMMON_DEVICE))
    for u in uids:
        (cdi_root / ibm_claim_spec_file(u)).write_text(ibm_spec_yaml(ibm_claim_device(u)))


class IbmDriverStandin:
    """IBM's Go driver on `node`, played in this process (grpcio threads)."""

    def __init__(self, node: RealNode) -> None:
        self.node = node
        self.plugin_dir = node.kubelet_dir / "plugins" / DRIVER
        self.registration_socket = node.kubelet_dir / "plugins_registry" / f"{DRIVER}-reg.sock"
        self.dra_socket = self.plugin_dir / "dra.sock"
        self.checkpoint = self.plugin_dir / "checkpoint.json"
        self.cdi_root = node.cdi_dir
        self.admin = node.api
        self.as_node = Api(node.cp)
        self.as_node.token = node.cp.tokens[f"system:node:{node.name}"]
        self.prepared: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, claim UID)
        self.registered = threading.Event()
        self.slice_name = ""
        self._lock = threading.Lock()
        self._servers: list[grpc.Server] = []

    # --- files ------------------------------------------------------------------------

    def _write(self, path: Path, text: str | bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        tmp.rename(path)

    def _save(self) -> None:
        self._write(self.checkpoint, encode_ibm_checkpoint(self.prepared))

    # --- gRPC -------------------------------------------------------------------------

    def _prepare_one(self, ref: Any) -> Any:
        dra = grpc_stubs.load().dra_v1.pb2
        claim = self.admin.get(
            f"/apis/resource.k8s.io/v1/namespaces/{ref.namespace}/resourceclaims/{ref.name}"
        )
        if claim is None or claim["metadata"]["uid"] != ref.uid:
            return dra.NodePrepareResourceResponse(error=f"claim {ref.uid} not found")
        results = [
            r for r in claim["status"]["allocation"]["devices"]["results"] if r["driver"] == DRIVER
        ]
        if any(r["device"] != IBM_DEVICE_NAME for r in results):
            return dra.NodePrepareResourceResponse(error="requested Nx is not allocatable")
        with self._lock:
            if ref.uid not in self.prepared:
                self._write(
                    self.cdi_root / ibm_claim_spec_file(ref.uid),
                    ibm_spec_yaml(ibm_claim_device(ref.uid)),
                )
                self.prepared[ref.uid] = [
                    {
                        "request_names": [r["request"]],
                        "pool_name": r["pool"],
                        "device_name": r["device"],
                        "cdi_device_ids": list(ibm_cdi_device_ids(ref.uid)),
                        "ContainerEdits": {"env": list(IBM_DEVICE_ENV)},
                    }
                    for r in results
                ]
                self._save()
            devices = self.prepared[ref.uid]
        self.calls.append(("prepare", ref.uid))
        return dra.NodePrepareResourceResponse(
            devices=[
                dra.Device(
                    request_names=d["request_names"],
                    pool_name=d["pool_name"],
                    device_name=d["device_name"],
                    cdi_device_ids=d["cdi_device_ids"],
                )
                for d in devices
            ]
        )

    def _unprepare_one(self, ref: Any) -> Any:
        dra = grpc_stubs.load().dra_v1.pb2
        with self._lock:
            if ref.uid in self.prepared:
                (self.cdi_root / ibm_claim_spec_file(ref.uid)).unlink(missing_ok=True)
                del self.prepared[ref.uid]
                self._save()
        self.calls.append(("unprepare", ref.uid))
        return dra.NodeUnprepareResourceResponse()

    def _servicers(self) -> tuple[Any, Any]:
        apis = grpc_stubs.load()
        standin = self

        class Registration(apis.registration.grpc.RegistrationServicer):  # type: ignore[misc,name-defined]
            def GetInfo(self, request: Any, context: Any) -> Any:
                return apis.registration.pb2.PluginInfo(
                    type="DRAPlugin",
                    name=DRIVER,
                    endpoint=f"/var/lib/kubelet/plugins/{DRIVER}/dra.sock",
                    supported_versions=["v1.DRAPlugin"],
                )

            def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
                if request.plugin_registered:
                    standin.registered.set()
                return apis.registration.pb2.RegistrationStatusResponse()

        class Dra(apis.dra_v1.grpc.DRAPluginServicer):  # type: ignore[misc,name-defined]
            def NodePrepareResources(self, request: Any, context: Any) -> Any:
                answers = {c.uid: standin._prepare_one(c) for c in request.claims}
                return apis.dra_v1.pb2.NodePrepareResourcesResponse(claims=answers)

            def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
                answers = {c.uid: standin._unprepare_one(c) for c in request.claims}
                return apis.dra_v1.pb2.NodeUnprepareResourcesResponse(claims=answers)

        return Registration(), Dra()

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> IbmDriverStandin:
        """Write the common spec and an empty state file, publish the slice, serve."""
        apis = grpc_stubs.load()
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.cdi_root.mkdir(parents=True, exist_ok=True)
        self._write(self.cdi_root / IBM_COMMON_SPEC_FILE, ibm_spec_yaml(IBM_COMMON_DEVICE))
        if not self.checkpoint.exists():
            self._save()
        created = self.as_node.request("POST", SLICES, ibm_slice(self.node.name))
        self.slice_name = created["metadata"]["name"]
        registration, dra = self._servicers()
        for socket, add in (
            (self.dra_socket, lambda s: apis.dra_v1.grpc.add_DRAPluginServicer_to_server(dra, s)),
            (
                self.registration_socket,
                lambda s: apis.registration.grpc.add_RegistrationServicer_to_server(
                    registration, s
                ),
            ),
        ):
            socket.unlink(missing_ok=True)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            add(server)
            server.add_insecure_port(f"unix://{socket}")
            server.start()
            self._servers.append(server)
        return self

    def wait_registered(self, timeout: float = 30.0) -> None:
        if not self.registered.wait(timeout):
            raise TimeoutError(f"the kubelet did not register IBM's stand-in within {timeout}s")

    def stop(self) -> None:
        """Stop serving and remove the sockets (the DaemonSet pod is gone); the
        slice, the state file and the CDI specs stay, as IBM's driver leaves them."""
        for server in self._servers:
            server.stop(grace=1).wait()
        self._servers.clear()
        self.registration_socket.unlink(missing_ok=True)
        self.dra_socket.unlink(missing_ok=True)
