# SPDX-License-Identifier: Apache-2.0
"""A tenant's odd objects cannot stall the controller, and /readyz tells the truth.

Runs the real `power-dra-controller` process with a ServiceAccount bound to
the documented RBAC (docs/RBAC-controller.md) against the real control plane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.kube.client import ApiClient
from controller.kube.deep_json import PRUNED, contains_pruned, decode_pruning, prune_deep
from controller.kube.errors import Undecodable
from controller.kube.kubeconfig import ClusterConfig
from controller.kube.resources import resource_kinds
from tests.harness.cluster import ControlPlane, free_port, write_kubeconfig
from tests.metrics_text import sample_value
from tests.test_controller_claim_status import DRIVER, NX, OTHER, _entries, _setup, _teardown
from tests.test_leader import _documented_rbac, restricted_config

REPO = Path(__file__).resolve().parents[1]
DEPTH = 1100  # deeper than orjson's 1,024 levels; the API server takes up to 10,000


def _deep_claim(namespace: str, name: str, depth: int = DEPTH) -> str:
    """A small ResourceClaim for another driver with parameters `depth` levels deep.

    Written by hand: json.dumps itself would hit Python's recursion limit.
    """
    params = '{"x":' + "[" * depth + "]" * depth + "}"
    return (
        '{"apiVersion":"resource.k8s.io/v1","kind":"ResourceClaim",'
        f'"metadata":{{"name":"{name}","namespace":"{namespace}"}},'
        '"spec":{"devices":{"requests":[{"name":"r","exactly":{"deviceClassName":"x"}}],'
        f'"config":[{{"opaque":{{"driver":"{OTHER}","parameters":{params}}}}}]}}}}}}'
    )


def _huge_claim(namespace: str, name: str) -> dict[str, Any]:
    """A ResourceClaim for another driver as large as the API server takes: 250 KB of
    annotations (the limit is 256 KiB) and 10 KB of parameters (the limit)."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {f"example.com/a{i}": "x" * 25_000 for i in range(10)},
        },
        "spec": {
            "devices": {
                "requests": [{"name": "r", "exactly": {"deviceClassName": "x"}}],
                "config": [
                    {
                        "opaque": {
                            "driver": OTHER,
                            "parameters": {"list": list(range(1800))},
                        }
                    }
                ],
            }
        },
    }


# --- the decoder ----------------------------------------------------------------------


def test_values_deeper_than_orjson_reads_are_pruned_and_the_rest_decodes() -> None:
    deep = '{"metadata":{"name":"deep","note":"[{\\"]"},"spec":' + "[" * 3000 + "]" * 3000 + "}"
    raw = ('{"items":[{"metadata":{"name":"a"}},' + deep + ',{"metadata":{"name":"b"}}]}').encode()
    page, pruned = decode_pruning(raw)
    assert pruned == 1
    names = [i["metadata"]["name"] for i in page["items"]]
    assert names == ["a", "deep", "b"]
    assert [contains_pruned(i) for i in page["items"]] == [False, True, False]
    assert page["items"][1]["metadata"]["note"] == '[{"]'  # brackets in strings are text


def test_json_within_orjsons_depth_is_decoded_untouched() -> None:
    raw = b'{"a":[[[1]]],"b":"]]]"}'
    assert decode_pruning(raw) == ({"a": [[[1]]], "b": "]]]"}, 0)
    marker = json.dumps(PRUNED).encode()
    assert prune_deep(raw, max_depth=2) == (b'{"a":[' + marker + b'],"b":"]]]"}', 1)


# --- against the real control plane ---------------------------------------------------


@pytest.mark.cluster
@pytest.mark.anyio
async def test_reading_a_claim_too_deep_to_decode_says_so_and_invents_nothing(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    # What the plugin's prepare does with such a claim: one GET, a clear error (before,
    # request() made up {"message": ...} and the plugin said "UID None ... re-created").
    control_plane.create_namespace(unique_name)
    control_plane.kubectl("create", "-f", "-", input=_deep_claim(unique_name, "deep"))
    claims = resource_kinds(await api.resource_api_version())["ResourceClaim"]
    try:
        # orjson says "depth limit exceeded" (3.13) or "recursion depth exceeded" (3.11).
        with pytest.raises(Undecodable, match="depth") as caught:
            await api.get(claims, "deep", unique_name)
        assert caught.value.status == 200
        assert not caught.value.retryable
        # A list holding it fails the same way unless the caller takes the unreadable items.
        with pytest.raises(Undecodable, match=f"{unique_name}/deep is nested deeper"):
            await api.list(claims, unique_name)
        skipped: list[dict[str, Any]] = []
        listing = await api.list(claims, unique_name, quarantine=skipped.append)
        assert listing["items"] == []
        assert [o["metadata"]["name"] for o in skipped] == ["deep"]
    finally:
        # Gone now, not when the namespace is: later tests count deep claims.
        control_plane.kubectl("delete", "resourceclaim", "deep", "-n", unique_name)
        control_plane.kubectl("delete", "namespace", unique_name, "--wait=false")


def sa_kubeconfig(config: ClusterConfig, path: Path) -> Path:
    assert config.token and config.ca_file
    return write_kubeconfig(path, config.server, Path(config.ca_file), config.token, "controller")


@contextmanager
def run_controller(
    kubeconfig: Path, namespace: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, Path]]:
    """The real controller process; yields its metrics port and its log file."""
    port = free_port()
    log_path = kubeconfig.with_suffix(".log")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")},
        **(env or {}),
    }
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.main",
                f"--kubeconfig={kubeconfig}",
                f"--namespace={namespace}",
                f"--metrics-bind-address=127.0.0.1:{port}",
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
        try:
            yield port, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(0.05)


QUARANTINED = "power_dra_controller_informer_quarantined_objects"
CLAIMS = {"controller": "claim-status", "resource": "resourceclaims"}


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_deep_and_a_huge_claim_elsewhere_do_not_stop_our_claims_status(
    api: ApiClient, control_plane: ControlPlane, unique_name: str, tmp_path: Path
) -> None:
    cp = control_plane
    ns, hostile, home = unique_name, f"{unique_name}-t", f"{unique_name}-c"
    cp.create_namespace(hostile)
    cp.create_namespace(home)
    cp.kubectl("create", "-f", "-", input=_deep_claim(hostile, "deep"))
    cp.kubectl("create", "-f", "-", input=json.dumps(_huge_claim(hostile, "huge")))
    kubeconfig = sa_kubeconfig(restricted_config(cp, home, ns), tmp_path / "sa.kubeconfig")
    claims = resource_kinds(await api.resource_api_version())["ResourceClaim"]
    set_up = False
    try:
        with run_controller(kubeconfig, home) as (port, log_path):
            await _until(lambda: http_get(port, "/readyz")[0] == 200, 30, "the controller ready")

            def quarantine_total() -> float:
                total = sample_value(
                    http_get(port, "/metrics")[1], f"{QUARANTINED}_total", **CLAIMS
                )
                return total or 0.0

            # A change to the deep claim and one to the huge claim arrive on the watch
            # ahead of ours.
            cp.kubectl("label", "resourceclaim", "deep", "-n", hostile, "touched=yes")
            cp.kubectl("label", "resourceclaim", "huge", "-n", hostile, "touched=yes")
            _setup(cp, ns, {**NX, "verbose": 1})
            set_up = True
            allocated_at = 0.0
            with anyio.fail_after(30):
                while True:
                    claim = await api.get(claims, "claim", ns)
                    if not allocated_at and claim.get("status", {}).get("allocation"):
                        allocated_at = time.monotonic()
                    if _entries(claim, DRIVER):
                        break
                    await anyio.sleep(0.02)
            took = time.monotonic() - allocated_at
            print(f"our claim's status {took * 1000:.0f} ms after its allocation was seen")
            (entry,) = _entries(claim, DRIVER)
            assert entry["conditions"][0]["status"] == "True"

            # The deep claim was skipped twice (listed, then changed), and said so.
            await _until(lambda: quarantine_total() >= 2, 10, "the deep claim quarantined")
            status, body = http_get(port, "/readyz")
            assert status == 200, body
            assert sample_value(http_get(port, "/metrics")[1], QUARANTINED, **CLAIMS) == 1.0
            # Deleting it is seen too: nothing left in quarantine.
            cp.kubectl("delete", "resourceclaim", "deep", "-n", hostile)
            await _until(
                lambda: sample_value(http_get(port, "/metrics")[1], QUARANTINED, **CLAIMS) == 0.0,
                10,
                "the deleted deep claim out of quarantine",
            )
        logged = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        skipped = [e for e in logged if "nested too deep" in e.get("msg", "")]
        assert skipped and skipped[0]["key"] == f"{hostile}/deep", skipped
    finally:
        if set_up:
            _teardown(cp, ns)
        cp.kubectl("delete", "namespace", hostile, home, "--wait=false")
        cp.kubectl("delete", "clusterrole,clusterrolebinding", ns, "--ignore-not-found")


@pytest.mark.cluster
@pytest.mark.anyio
async def test_readyz_fails_naming_the_resource_while_its_watch_is_refused(
    control_plane: ControlPlane, unique_name: str, tmp_path: Path
) -> None:
    cp = control_plane
    home = unique_name
    cp.create_namespace(home)
    config = restricted_config(cp, home, home)
    # Take `watch` on claims away: the list works (the cache syncs), every watch is refused.
    role = _documented_rbac("ClusterRole")
    role["metadata"] = {"name": home}
    full_rules = json.loads(json.dumps(role["rules"]))
    for rule in role["rules"]:
        if rule["resources"] == ["resourceclaims"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
    cp.apply(role)
    kubeconfig = sa_kubeconfig(config, tmp_path / "sa.kubeconfig")
    try:
        with run_controller(kubeconfig, home, "--watch-stall-timeout=1s") as (port, _):

            def refused() -> bool:
                status, body = http_get(port, "/readyz")
                return status == 503 and "resourceclaims" in body

            await _until(refused, 30, "/readyz to fail over the refused claims watch")
            _, body = http_get(port, "/readyz")
            assert "claim-status: resourceclaims: list/watch failing" in body, body
            assert "Forbidden" in body, body
            role["rules"] = full_rules
            cp.apply(role)
            await _until(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz back to 200")
    finally:
        cp.kubectl("delete", "namespace", home, "--wait=false")
        cp.kubectl("delete", "clusterrole,clusterrolebinding", home, "--ignore-not-found")
