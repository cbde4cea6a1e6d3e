# SPDX-License-Identifier: Apache-2.0
"""Leader election: the pure decision, electors on a real Lease, and two real processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from controller.kube.client import ApiClient
from controller.kube.kubeconfig import ClusterConfig
from controller.kube.resources import LEASES
from controller.leader import (
    LeaderElector,
    format_micro_time,
    lease_for,
    lease_holder,
    parse_time,
    should_acquire,
)
from tests.harness.cluster import ControlPlane
from tests.metrics_text import sample

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _lease(holder: str | None, renewed: datetime | None = NOW, duration: int | None = 15) -> Any:
    spec: dict[str, Any] = {"holderIdentity": holder, "leaseDurationSeconds": duration}
    if renewed is not None:
        spec["renewTime"] = format_micro_time(renewed)
    return {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"}, "spec": spec}


# --- the pure decision --------------------------------------------------------------


def test_a_missing_lease_can_be_taken() -> None:
    assert should_acquire(None, NOW, "me")


def test_a_released_lease_can_be_taken_at_once() -> None:
    assert should_acquire(_lease(None), NOW, "me")
    assert should_acquire(_lease(""), NOW, "me")


def test_our_own_lease_is_renewed() -> None:
    assert should_acquire(_lease("me"), NOW + timedelta(hours=1), "me")


def test_another_holders_live_lease_is_left_alone() -> None:
    assert not should_acquire(_lease("other"), NOW + timedelta(seconds=14.9), "me")


def test_another_holders_expired_lease_can_be_taken() -> None:
    assert should_acquire(_lease("other"), NOW + timedelta(seconds=15), "me")


def test_expiry_counts_from_our_own_observation_when_given() -> None:
    # The holder's clock says it renewed long ago, but we only just saw that record:
    # a skewed clock must not let us take a lease that may still be in use.
    lease = _lease("other", renewed=NOW - timedelta(hours=1))
    assert not should_acquire(lease, NOW + timedelta(seconds=10), "me", observed_at=NOW)
    assert should_acquire(lease, NOW + timedelta(seconds=15), "me", observed_at=NOW)


def test_a_lease_without_renew_time_or_duration_counts_as_expired() -> None:
    assert should_acquire(_lease("other", renewed=None), NOW, "me")
    assert should_acquire(_lease("other", duration=None), NOW, "me")


def test_taking_a_lease_counts_a_transition_and_renewing_does_not() -> None:
    taken = lease_for(_lease("other"), "me", NOW, 15, namespace="ns", name="l")
    assert lease_holder(taken) == "me"
    assert taken["spec"]["leaseTransitions"] == 1
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == format_micro_time(NOW)
    assert taken["metadata"]["resourceVersion"] == "7"  # optimistic concurrency
    later = NOW + timedelta(seconds=2)
    renewed = lease_for(taken, "me", later, 15, namespace="ns", name="l")
    assert renewed["spec"]["leaseTransitions"] == 1
    assert renewed["spec"]["acquireTime"] == format_micro_time(NOW)
    assert renewed["spec"]["renewTime"] == format_micro_time(later)


def test_a_new_lease_starts_with_no_transitions() -> None:
    created = lease_for(None, "me", NOW, 15, namespace="ns", name="l")
    assert created["metadata"] == {"name": "l", "namespace": "ns"}
    assert created["spec"]["leaseTransitions"] == 0
    assert created["spec"]["leaseDurationSeconds"] == 15


def test_micro_times_round_trip() -> None:
    text = format_micro_time(NOW)
    assert text == "2026-01-02T03:04:05.000000Z"
    assert parse_time(text) == NOW
    assert parse_time("nonsense") is None


def test_electors_refuse_inconsistent_timings() -> None:
    with pytest.raises(ValueError, match="lease duration > renew deadline > retry period"):
        LeaderElector(
            None,  # type: ignore[arg-type]
            namespace="ns",
            name="l",
            identity="me",
            lease_duration=5,
            renew_deadline=5,
            retry_period=1,
        )


# --- electors on a real Lease, with only the documented RBAC --------------------------


def _documented_rbac(kind: str) -> dict[str, Any]:
    text = (REPO / "docs" / "RBAC-controller.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        doc = yaml.safe_load(block)
        if doc["kind"] == kind:
            return dict(doc)
    raise AssertionError(f"no {kind} in docs/RBAC-controller.md")


def restricted_config(
    cp: ControlPlane,
    namespace: str,
    name: str,
    *,
    without_driver_rule: bool = False,
    class_names: tuple[str, ...] = (),
) -> ClusterConfig:
    """A ServiceAccount bound to exactly the documented Role and ClusterRole.

    `without_driver_rule` leaves out the resourceclaims/driver rule, to show it is needed;
    `class_names` are DeviceClasses the controller may change and delete besides ours.
    """
    cluster_role = _documented_rbac("ClusterRole")
    cluster_role["metadata"] = {"name": name}
    for rule in cluster_role["rules"]:
        if rule["resources"] == ["deviceclasses"] and "resourceNames" in rule:
            rule["resourceNames"] = [*rule["resourceNames"], *class_names]
    if without_driver_rule:
        cluster_role["rules"] = [
            r for r in cluster_role["rules"] if r["resources"] != ["resourceclaims/driver"]
        ]
    role = _documented_rbac("Role")
    role["metadata"] = {"name": name, "namespace": namespace}
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    cp.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": role["metadata"]},
            cluster_role,
            role,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": subject,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subject,
            },
        ]
    )
    token = cp.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    return ClusterConfig(server=cp.server, ca_file=str(cp.ca_file), token=token)


LEASE_NAME = "power-dra-controller"  # the name the documented Role allows


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_released_lease_passes_to_the_waiting_elector_at_once(
    control_plane: ControlPlane,
    api: ApiClient,
    unique_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    control_plane.kubectl("create", "namespace", unique_name)
    config = restricted_config(control_plane, unique_name, unique_name)
    leading: list[str] = []

    # A lease far longer than the test: b can only get it because a released it.
    def elector(client: ApiClient, identity: str) -> LeaderElector:
        return LeaderElector(
            client,
            namespace=unique_name,
            name=LEASE_NAME,
            identity=identity,
            lease_duration=600,
            renew_deadline=300,
            retry_period=0.2,
        )

    def renew_time(lease: dict[str, Any]) -> str:
        return str(lease["spec"].get("renewTime") or "")

    async def lead_as(identity: str) -> None:
        leading.append(identity)
        await anyio.sleep_forever()

    async with ApiClient(config) as client_a, ApiClient(config) as client_b:
        a, b = elector(client_a, "a"), elector(client_b, "b")
        async with anyio.create_task_group() as tg:
            scope_a = anyio.CancelScope()

            async def run_a() -> None:
                with scope_a:
                    await a.run(lambda: lead_as("a"))

            tg.start_soon(run_a)
            with anyio.fail_after(5):
                while leading != ["a"]:
                    await anyio.sleep(0.02)
            with caplog.at_level(logging.INFO, logger="controller.leader"):
                tg.start_soon(b.run, lambda: lead_as("b"))
                # b found a holding the lease, and a renewed it twice after that.
                with anyio.fail_after(15):
                    while not [
                        r for r in caplog.records if r.msg == "waiting for the leader lease"
                    ]:
                        await anyio.sleep(0.02)
                    renewals = [renew_time(await api.get(LEASES, LEASE_NAME, unique_name))]
                    while len(set(renewals)) < 3:
                        await anyio.sleep(0.05)
                        renewals.append(renew_time(await api.get(LEASES, LEASE_NAME, unique_name)))
            assert leading == ["a"]
            assert not b.is_leader
            lease = await api.get(LEASES, LEASE_NAME, unique_name)
            assert lease_holder(lease) == "a"
            scope_a.cancel()  # shutdown: a releases the lease
            with anyio.fail_after(30):  # far within the 600 s lease: it was released
                while leading != ["a", "b"]:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    lease = await api.get(LEASES, LEASE_NAME, unique_name)
    assert lease_holder(lease) == ""
    assert lease["spec"]["leaseTransitions"] == 1
    control_plane.kubectl("delete", "namespace", unique_name, "--wait=false")


@pytest.mark.cluster
@pytest.mark.anyio
async def test_the_leader_stops_at_once_when_another_holder_takes_the_lease(
    control_plane: ControlPlane, api: ApiClient, unique_name: str
) -> None:
    stopped = anyio.Event()
    started = anyio.Event()

    async def leading() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    # Deadlines far longer than the test: it stops because it saw the new holder.
    elector = LeaderElector(
        api,
        namespace="default",
        name=unique_name,
        identity="me",
        lease_duration=600,
        renew_deadline=300,
        retry_period=0.2,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(elector.run, leading)
        with anyio.fail_after(5):
            await started.wait()
        lease = await api.get(LEASES, unique_name, "default")
        lease["spec"]["holderIdentity"] = "intruder"
        lease["spec"]["renewTime"] = format_micro_time(datetime.now(UTC))
        await api.replace(LEASES, lease)
        with anyio.fail_after(30):
            await stopped.wait()
        assert not elector.is_leader
        tg.cancel_scope.cancel()
    # It did not release a lease it no longer holds.
    assert lease_holder(await api.get(LEASES, unique_name, "default")) == "intruder"
    await api.delete(LEASES, unique_name, "default")


# --- two real controller processes -------------------------------------------------------


class ControllerProcess:
    """`power-dra-controller` as a child process; its JSON log lines collected."""

    def __init__(self, args: list[str], kubeconfig: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.main", f"--kubeconfig={kubeconfig}", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"msg": line.rstrip()})

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("msg") == msg]

    def wait_logged(self, msg: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.logged(msg):
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {msg!r} within {timeout}s; log:\n{self.lines}")

    @property
    def identity(self) -> str:
        return str(self.wait_logged("connected", 10)["identity"])

    def metric(self, name: str) -> float:
        port = self.wait_logged("serving /healthz, /readyz and /metrics", 10)["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return sample(resp.read().decode(), name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def processes() -> Iterator[list[ControllerProcess]]:
    started: list[ControllerProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.mark.cluster
def test_two_controllers_one_leader_and_a_takeover_after_kill(
    control_plane: ControlPlane, processes: list[ControllerProcess], unique_name: str
) -> None:
    lease_duration = 3.0
    args = [
        "--leader-elect",
        "--leader-election-namespace=default",
        f"--leader-election-id={unique_name}",
        f"--lease-duration={lease_duration:g}s",
        "--renew-deadline=2s",
        "--retry-period=0.5s",
        "--orphan-grace=1h",
        "--metrics-bind-address=127.0.0.1:0",
    ]
    for _ in range(2):
        processes.append(ControllerProcess(args, control_plane.kubeconfig))
    ids = {p.identity: p for p in processes}

    def lease_spec() -> dict[str, Any]:
        out = control_plane.kubectl("get", "lease", unique_name, "-n", "default", "-o", "json")
        spec: dict[str, Any] = json.loads(out.stdout)["spec"]
        return spec

    def holder() -> str:
        return str(lease_spec().get("holderIdentity") or "")

    deadline = time.monotonic() + 10
    while holder() not in ids and time.monotonic() < deadline:
        time.sleep(0.1)
    leader = ids[holder()]
    follower = next(p for p in processes if p is not leader)
    leader.wait_logged("controllers running", 10)
    # The follower found the lease held, and the leader renewed it twice after that:
    # the follower stays a follower.
    follower.wait_logged("waiting for the leader lease", 10)
    renewals = {str(lease_spec().get("renewTime"))}
    deadline = time.monotonic() + 15
    while len(renewals) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        renewals.add(str(lease_spec().get("renewTime")))
    assert len(renewals) == 3, renewals
    assert holder() == leader.identity
    assert not follower.logged("controllers running")
    assert not follower.logged("became leader")
    assert leader.metric("power_dra_controller_leader") == 1
    assert follower.metric("power_dra_controller_leader") == 0

    leader.proc.send_signal(signal.SIGKILL)  # no release: the lease must expire
    killed = time.monotonic()
    follower.wait_logged("controllers running", 60)
    # Expiry is counted from the follower's last observation of a renewal (at
    # most one retry period before the kill), plus one retry period to notice.
    print(f"follower leading {time.monotonic() - killed:.1f}s after the leader's kill")
    assert holder() == follower.identity

    follower.proc.send_signal(signal.SIGTERM)
    assert follower.proc.wait(10) == 0
    assert follower.logged("released leader lease")
    assert holder() == ""
    control_plane.kubectl("delete", "lease", unique_name, "-n", "default")
