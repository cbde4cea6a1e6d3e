# SPDX-License-Identifier: Apache-2.0
"""Kubeconfig credentials against the real API server: exec credential plugins
(renewed on expiry and on 401) and inline certificate data (never on disk)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.kube.client import ApiClient
from controller.kube.errors import Unavailable
from controller.kube.kubeconfig import (
    EXEC_EXPIRY_MARGIN,
    ConfigError,
    load_cluster_config,
    needs_yaml_parser,
    parse_exec_credential,
)
from tests.harness.cluster import ControlPlane

# A credential plugin as kubectl runs them: it prints an ExecCredential. Each
# run takes the next token of tokens.json (the last one repeats) and logs itself.
PLUGIN = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    here = Path(sys.argv[1])
    info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    runs = here / "runs"
    n = len(runs.read_text().splitlines()) if runs.exists() else 0
    with runs.open("a") as f:
        f.write(info["apiVersion"] + "\\n")
    tokens = json.loads((here / "tokens.json").read_text())
    token, expires = tokens[min(n, len(tokens) - 1)]
    if token == "FAIL":
        sys.exit("token service unreachable")
    status = {"token": token}
    if expires:
        status["expirationTimestamp"] = expires
    print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                      "status": status}))
    """
)


def kubeconfig(server: str, cluster: dict[str, Any], user: dict[str, Any], path: Path) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    return str(path)


class ExecSetup:
    def __init__(self, cp: ControlPlane, root: Path) -> None:
        self.root = root
        (root / "plugin.py").write_text(PLUGIN)
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(root / "plugin.py"), str(root)],
                "interactiveMode": "Never",
            }
        }
        self.path = kubeconfig(
            cp.server, {"certificate-authority": str(cp.ca_file)}, user, root / "kubeconfig"
        )

    def tokens(self, *tokens: tuple[str, str | None]) -> None:
        (self.root / "tokens.json").write_text(json.dumps(list(tokens)))

    def runs(self) -> int:
        runs = self.root / "runs"
        return len(runs.read_text().splitlines()) if runs.exists() else 0


@pytest.fixture
def exec_setup(control_plane: ControlPlane, tmp_path: Path) -> ExecSetup:
    return ExecSetup(control_plane, tmp_path)


def stamp(seconds_from_now: float) -> str:
    when = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- pure ------------------------------------------------------------------------------------


def test_an_exec_credential_with_expiry_is_parsed() -> None:
    out = b'{"status": {"token": "t", "expirationTimestamp": "2030-01-02T03:04:05Z"}}'
    cred = parse_exec_credential(out)
    assert cred.token == "t"
    assert cred.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


def test_an_exec_credential_without_token_or_certificate_is_refused() -> None:
    with pytest.raises(ConfigError, match="neither a token nor a client certificate"):
        parse_exec_credential(b'{"status": {}}')


# --- against the API server --------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.anyio
async def test_an_expired_exec_credential_is_fetched_again(
    control_plane: ControlPlane, exec_setup: ExecSetup
) -> None:
    admin = control_plane.tokens["admin"]
    exec_setup.tokens((admin, stamp(EXEC_EXPIRY_MARGIN + 2)))
    config = await load_cluster_config(exec_setup.path)
    assert config.exec_plugin is not None
    async with ApiClient(config) as client:
        await client.request("GET", "/version")
        assert exec_setup.runs() == 1
        deadline = time.monotonic() + 30
        while config.exec_plugin.valid() is not None:  # until it is due for renewal
            assert time.monotonic() < deadline
            time.sleep(0.1)
        await client.request("GET", "/version")
    assert exec_setup.runs() == 2


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_refused_exec_credential_is_replaced_and_the_request_repeated(
    control_plane: ControlPlane, exec_setup: ExecSetup
) -> None:
    # The first token is one the server does not know (revoked, rotated away).
    exec_setup.tokens(("revoked-token", stamp(3600)), (control_plane.tokens["admin"], None))
    config = await load_cluster_config(exec_setup.path)
    async with ApiClient(config) as client:
        version = await client.request("GET", "/version")
    assert version["major"]
    assert exec_setup.runs() == 2


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_failing_exec_plugin_is_a_retryable_error(
    control_plane: ControlPlane, exec_setup: ExecSetup
) -> None:
    exec_setup.tokens(("FAIL", None), (control_plane.tokens["admin"], None))
    config = await load_cluster_config(exec_setup.path)
    async with ApiClient(config) as client:
        with pytest.raises(Unavailable, match="token service unreachable") as info:
            await client.request("GET", "/version")
        assert info.value.retryable
        assert (await client.request("GET", "/version"))["major"]
    assert exec_setup.runs() == 2


@pytest.fixture
def private_tmpdir() -> Iterator[Path]:
    old = tempfile.tempdir
    with tempfile.TemporaryDirectory() as d:
        tempfile.tempdir = d
        try:
            yield Path(d)
        finally:
            tempfile.tempdir = old


@pytest.mark.cluster
@pytest.mark.anyio
async def test_inline_certificate_data_leaves_no_file_behind(
    control_plane: ControlPlane, tmp_path: Path, private_tmpdir: Path
) -> None:
    cp = control_plane
    cluster = {"certificate-authority-data": base64.b64encode(cp.ca_file.read_bytes()).decode()}
    user = {
        "client-certificate-data": base64.b64encode(cp.kubelet_client_cert.read_bytes()).decode(),
        "client-key-data": base64.b64encode(cp.kubelet_client_key.read_bytes()).decode(),
    }
    path = kubeconfig(cp.server, cluster, user, tmp_path / "kubeconfig")
    config = await load_cluster_config(path)
    async with ApiClient(config) as client:
        # The certificate authenticates (a 403 would also prove that; /version is open).
        who = await client.request(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
    assert who["status"]["userInfo"]["username"]
    assert list(private_tmpdir.iterdir()) == []
    assert not any(name.startswith("power-dra-") for name in os.listdir(tempfile.gettempdir()))


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_json_kubeconfig_reaches_the_api_server_like_its_yaml_form(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    as_json = tmp_path / "kubeconfig.json"
    as_json.write_text(json.dumps(yaml.safe_load(Path(control_plane.kubeconfig).read_text())))
    from_json = await load_cluster_config(str(as_json))
    from_yaml = await load_cluster_config(control_plane.kubeconfig)
    assert from_json.source == str(as_json)
    assert dataclasses.replace(from_json, source=from_yaml.source) == from_yaml
    async with ApiClient(from_json) as api:
        assert (await api.request("GET", "/version"))["gitVersion"].startswith("v1.")


@pytest.mark.anyio
async def test_a_broken_json_kubeconfig_is_named_with_the_parser_error(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text('{"apiVersion": "v1", "clusters": [')
    with pytest.raises(ConfigError, match=rf"kubeconfig {broken} is not valid YAML"):
        await load_cluster_config(str(broken))


def test_only_a_yaml_kubeconfig_needs_the_yaml_parser(tmp_path: Path) -> None:
    as_yaml = tmp_path / "kubeconfig.yaml"
    as_yaml.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config"}))
    as_json = tmp_path / "kubeconfig.json"
    as_json.write_text('\n  {"apiVersion": "v1", "kind": "Config"}')
    assert needs_yaml_parser(str(as_yaml))
    assert needs_yaml_parser(f"{as_yaml}{os.pathsep}{as_json}")  # the first file counts
    assert not needs_yaml_parser(str(as_json))
    assert not needs_yaml_parser(None)  # the service account
    assert not needs_yaml_parser(str(tmp_path / "missing"))  # load_cluster_config names it
