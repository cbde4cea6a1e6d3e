# SPDX-License-Identifier: Apache-2.0
"""The plugin process under faults of its API connection and its own parts.

The plugin reaches the real API server through a TCP proxy the test controls
(tests.harness.tcpproxy): refused (the server is down), forwarded again, or
blackholed (connections stay open and carry nothing). The kubelet's side is
grpcio; claims are real ones the scheduler allocated.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.dra_objects import allocate_claims, claim, device_class, pod
from tests.harness.cluster import ControlPlane, write_kubeconfig
from tests.harness.plugin import DRIVER, PluginProcess
from tests.harness.tcpproxy import TcpProxy
from tests.kubelet_standin import ClaimName, DraClient, PrepareAnswer, get_plugin_info

pytestmark = pytest.mark.cluster

TIMEOUT = 60.0
# The kubelet allows a DRA call 45 s; a shorter deadline shows the plugin
# answers within whatever deadline its caller set.
SHORT_DEADLINE = 6.0


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet
        return 0, str(exc)


def wait_until(pred: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} after {timeout} s")


def fresh_socket_answers(path: Path, stale_inode: int) -> bool:
    try:
        if path.stat().st_ino == stale_inode:
            return False
        get_plugin_info(path)
    except (OSError, grpc.RpcError):
        return False
    return True


@dataclass
class ProxiedNode:
    cp: ControlPlane
    name: str
    ns: str
    nx_class: str
    proxy: TcpProxy
    plugin: PluginProcess

    def readyz(self) -> tuple[int, str]:
        return http_get(self.plugin.metrics_port, "/readyz")

    def healthz(self) -> tuple[int, str]:
        return http_get(self.plugin.metrics_port, "/healthz")


def proxied_kubeconfig(cp: ControlPlane, proxy: TcpProxy, path: Path) -> str:
    return str(
        write_kubeconfig(
            path, f"https://127.0.0.1:{proxy.port}", cp.ca_file, cp.tokens["admin"], "admin"
        )
    )


@pytest.fixture
def proxied(control_plane: ControlPlane) -> Iterator[ProxiedNode]:
    """A node whose plugin talks to the API server through a proxy (not started yet)."""
    suffix = uuid.uuid4().hex[:6]
    name, ns, cls = f"fault-{suffix}", f"fault-{suffix}", f"nx-fault-{suffix}"
    root = Path(tempfile.mkdtemp(prefix="nxf-", dir="/tmp"))  # short socket paths
    control_plane.create_node(name)
    control_plane.create_namespace(ns)
    control_plane.apply(device_class(cls))
    proxy = TcpProxy("127.0.0.1", control_plane.port).start()
    plugin = PluginProcess(
        control_plane,
        name,
        root,
        total_credits=64,
        kubeconfig=proxied_kubeconfig(control_plane, proxy, root / "kubeconfig"),
        extra_args=("--watch-timeout=4s", "--health-probe-interval=0.2s"),
    )
    try:
        yield ProxiedNode(control_plane, name, ns, cls, proxy, plugin)
    finally:
        plugin.stop()
        proxy.stop()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        control_plane.kubectl("delete", "deviceclass", cls, "--wait=false", check=False)
        control_plane.kubectl("delete", "node", name, "--wait=false", check=False)
        shutil.rmtree(root, ignore_errors=True)


# --- the API server is down -----------------------------------------------------------


def test_plugin_serves_the_kubelet_while_the_api_server_is_unreachable(
    proxied: ProxiedNode,
) -> None:
    proxied.proxy.refuse()
    proxied.plugin.start()
    assert get_plugin_info(proxied.plugin.registration_socket).name == DRIVER
    status, body = wait_until(
        lambda: next((r for r in [proxied.readyz()] if "unreachable" in r[1]), None),
        "/readyz reason",
    )
    assert status == 503
    assert "ResourceSlice not published: waiting for the API server, unreachable" in body
    assert proxied.plugin.process is not None and proxied.plugin.process.alive()
    # The server comes back: the plugin publishes without a restart.
    proxied.proxy.accept()
    proxied.plugin.wait_for_slices(TIMEOUT)
    wait_until(lambda: proxied.readyz()[0] == 200, "/readyz 200")


def logged_retry_delays(plugin: PluginProcess, msg: str) -> list[float]:
    """The `retryIn` of each of the plugin's log lines with this message."""
    return [float(r["retryIn"]) for r in plugin.log_records() if r.get("msg") == msg]


def test_the_first_publish_waits_longer_after_each_refused_connection_then_succeeds(
    proxied: ProxiedNode,
) -> None:
    proxied.proxy.refuse()  # the API server is not up yet when the plugin starts
    plugin = proxied.plugin.start()

    def four_retries() -> list[float] | None:
        delays = logged_retry_delays(plugin, "API server unreachable, retrying")
        return delays if len(delays) >= 4 else None

    delays = wait_until(four_retries, "four retries of the first connection")
    # Backoff, not a spin: each wait is longer than the one before (the jitter is
    # smaller than the doubling).
    assert all(later > earlier for earlier, later in itertools.pairwise(delays[:5])), delays
    assert proxied.plugin.process is not None and proxied.plugin.process.alive()
    proxied.proxy.accept()
    proxied.plugin.wait_for_slices(TIMEOUT)
    wait_until(lambda: proxied.readyz()[0] == 200, "/readyz 200")


def _one_claim_prepared_of_two(
    proxied: ProxiedNode,
) -> tuple[PluginProcess, ClaimName, ClaimName, PrepareAnswer]:
    """The plugin serving, two claims allocated on its node, the first prepared
    while the API server is up: (plugin, known, new, the known claim's answer)."""
    plugin = proxied.plugin.start()
    plugin.wait_for_slices(TIMEOUT)
    known, new = allocate_claims(
        proxied.cp, proxied.ns, proxied.name, device_class_name=proxied.nx_class, count=2
    )
    with DraClient(plugin.dra_socket) as client:
        first = client.prepare([known], timeout=SHORT_DEADLINE)[known.uid]
    assert first.error == ""
    return plugin, known, new, first


def test_a_batch_with_one_unreadable_claim_answers_the_others_within_the_deadline(
    proxied: ProxiedNode,
) -> None:
    plugin, known, new, first = _one_claim_prepared_of_two(proxied)
    with DraClient(plugin.dra_socket) as client:
        proxied.proxy.refuse()  # the API server goes down
        answers = client.prepare([known, new], timeout=SHORT_DEADLINE)
    assert answers[known.uid] == first  # from the checkpoint, no API needed
    assert answers[new.uid].devices == ()
    assert answers[new.uid].error.startswith(f"claim {new.namespace}/{new.name}: deadline exceeded")
    assert "reading the claim from the API server" in answers[new.uid].error


def test_a_plugin_restarted_while_the_api_server_is_down_prepares_known_claims(
    proxied: ProxiedNode,
) -> None:
    plugin, known, new, first = _one_claim_prepared_of_two(proxied)
    proxied.proxy.refuse()
    stale = plugin.registration_socket.stat().st_ino
    plugin.kill()
    plugin.start(wait=False)
    plugin.wait_for(
        lambda: fresh_socket_answers(plugin.registration_socket, stale),
        TIMEOUT,
        "a fresh registration socket answering GetInfo",
    )
    # Registration answers while the plugin still loads; DRA serves after its repair.
    plugin.wait_for_dra(TIMEOUT)
    with DraClient(plugin.dra_socket) as client:
        answers = client.prepare([known, new], timeout=SHORT_DEADLINE)
    assert answers[known.uid] == first
    assert "deadline exceeded" in answers[new.uid].error
    proxied.proxy.accept()
    with DraClient(plugin.dra_socket) as client:
        again = client.prepare([new], timeout=TIMEOUT)[new.uid]
    assert again.error == "" and again.devices


# --- a silently dead connection -----------------------------------------------------------


def test_a_blackholed_watch_is_noticed_and_reopened(proxied: ProxiedNode) -> None:
    plugin = proxied.plugin.start()
    [published] = plugin.wait_for_slices(TIMEOUT)
    before = proxied.proxy.connections
    proxied.proxy.blackhole()  # the plugin's open connections now carry nothing
    name = published["metadata"]["name"]
    proxied.cp.kubectl("delete", "resourceslice", name)
    # Only a re-opened watch can learn of the deletion and restore the slice.
    restored = wait_until(
        lambda: [
            s for s in plugin.slices() if s["metadata"]["uid"] != published["metadata"]["uid"]
        ],
        "restored ResourceSlice",
        timeout=120,
    )
    assert restored[0]["spec"]["nodeName"] == proxied.name
    assert proxied.proxy.connections > before


# --- liveness -------------------------------------------------------------------------------


def test_healthz_fails_when_the_plugin_no_longer_answers_on_its_socket(
    proxied: ProxiedNode,
) -> None:
    plugin = proxied.plugin.start()
    wait_until(lambda: proxied.healthz()[0] == 200, "/healthz 200")
    plugin.registration_socket.unlink()  # the kubelet can no longer reach us either
    _, body = wait_until(
        lambda: next((r for r in [proxied.healthz()] if r[0] == 503), None), "/healthz 503"
    )
    assert f"registration socket {plugin.registration_socket}: GetInfo failed" in body


# --- prioritized list (firstAvailable) -------------------------------------------------------


def first_available_claim(ns: str, name: str, nx_class: str) -> dict[str, Any]:
    spec = {
        "devices": {
            "requests": [
                {
                    "name": "nx",
                    "firstAvailable": [
                        {
                            "name": "big",  # more credits than the node has
                            "deviceClassName": nx_class,
                            "capacity": {"requests": {"credits": "100000"}},
                        },
                        {"name": "shared", "deviceClassName": nx_class},
                    ],
                }
            ]
        }
    }
    return claim(ns, name, spec)


def test_a_first_available_claim_is_answered_under_its_parent_request_with_its_share_id(
    proxied: ProxiedNode,
) -> None:
    plugin = proxied.plugin.start()
    plugin.wait_for_slices(TIMEOUT)
    cp, ns = proxied.cp, proxied.ns
    cp.apply(
        [
            first_available_claim(ns, "fa", proxied.nx_class),
            pod(ns, "holder", proxied.name, claims={"nx": "fa"}),
        ]
    )

    def allocation() -> dict[str, Any] | None:
        obj = json.loads(cp.kubectl("get", "resourceclaim", "fa", "-n", ns, "-o", "json").stdout)
        return obj if (obj.get("status") or {}).get("allocation") else None

    obj = wait_until(allocation, "allocation of the firstAvailable claim")
    [result] = obj["status"]["allocation"]["devices"]["results"]
    assert result["request"] == "nx/shared"  # the scheduler picked the subrequest
    ref = ClaimName(ns, obj["metadata"]["uid"], "fa")
    with DraClient(plugin.dra_socket) as client:
        answer = client.prepare([ref])[ref.uid]
    assert answer.error == ""
    [device] = answer.devices
    assert device.request_names == ("nx",)  # what the container's claim entry names
    assert device.share_id == result.get("shareID", "")
    assert device.share_id  # shared mode: the device is allocated more than once
