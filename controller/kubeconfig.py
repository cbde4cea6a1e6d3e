# SPDX-License-Identifier: Apache-2.0
"""Where the API server is and how to authenticate: kubeconfig or in-cluster.

Token, token file and client certificates are handled here without importing
kubernetes-asyncio (importing it costs ~70 MiB and most of a second). Other
kubeconfig user types (exec plugins, auth providers) are resolved by
kubernetes-asyncio's loader, imported only then; it is the optional extra
`exec-auth` (not in the image: in a pod both processes use the service account).
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigError(Exception):
    """The cluster connection could not be configured; the message says what to fix."""


@dataclass(frozen=True)
class ClusterConfig:
    """Everything needed to open a connection to the API server."""

    server: str
    ca_file: str | None = None
    insecure_skip_tls_verify: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    namespace: str = "default"
    source: str = ""
    # Temporary files holding inline (base64 `*-data`) credentials; removed on exit.
    temp_files: tuple[str, ...] = field(default=(), compare=False)

    def bearer_token(self) -> str | None:
        """The current bearer token; a token file is re-read as kubelets rotate it."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        return self.token


def _inline_to_file(data_b64: str, what: str) -> str:
    try:
        raw = base64.b64decode(data_b64, validate=True)
    except ValueError as exc:
        raise ConfigError(f"kubeconfig: {what} is not valid base64") from exc
    fd, path = tempfile.mkstemp(prefix="power-dra-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


def _named(entries: Any, name: str, what: str, source: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(what)
            return value if isinstance(value, dict) else {}
    raise ConfigError(f"kubeconfig {source}: no {what} named {name!r}")


def _resolve(path_value: str | None, base: Path) -> str | None:
    if not path_value:
        return None
    p = Path(path_value)
    return str(p if p.is_absolute() else base / p)


def needs_full_loader(kubeconfig: Mapping[str, Any], context: str | None = None) -> bool:
    """Whether the selected user authenticates in a way only kubernetes-asyncio handles."""
    ctx_name = context or kubeconfig.get("current-context")
    if not ctx_name:
        return False
    try:
        ctx = _named(kubeconfig.get("contexts"), str(ctx_name), "context", "")
        user = _named(kubeconfig.get("users"), str(ctx.get("user", "")), "user", "")
    except ConfigError:
        return False
    return "exec" in user or "auth-provider" in user


def parse_kubeconfig(
    kubeconfig: Mapping[str, Any], base_dir: Path, source: str, context: str | None = None
) -> ClusterConfig:
    """Build a ClusterConfig from a parsed kubeconfig (token or client certificate users)."""
    ctx_name = context or kubeconfig.get("current-context")
    if not ctx_name:
        raise ConfigError(f"kubeconfig {source}: no current-context set and no --context given")
    ctx = _named(kubeconfig.get("contexts"), str(ctx_name), "context", source)
    cluster = _named(kubeconfig.get("clusters"), str(ctx.get("cluster", "")), "cluster", source)
    user = _named(kubeconfig.get("users"), str(ctx.get("user", "")), "user", source)
    server = cluster.get("server")
    if not server:
        raise ConfigError(f"kubeconfig {source}: cluster {ctx.get('cluster')!r} has no server")
    temps: list[str] = []
    ca_file = _resolve(cluster.get("certificate-authority"), base_dir)
    if cluster.get("certificate-authority-data"):
        ca_file = _inline_to_file(cluster["certificate-authority-data"], "certificate-authority")
        temps.append(ca_file)
    cert = _resolve(user.get("client-certificate"), base_dir)
    if user.get("client-certificate-data"):
        cert = _inline_to_file(user["client-certificate-data"], "client-certificate-data")
        temps.append(cert)
    key = _resolve(user.get("client-key"), base_dir)
    if user.get("client-key-data"):
        key = _inline_to_file(user["client-key-data"], "client-key-data")
        temps.append(key)
    return ClusterConfig(
        server=str(server).rstrip("/"),
        ca_file=ca_file,
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        client_cert_file=cert,
        client_key_file=key,
        token=user.get("token"),
        token_file=_resolve(user.get("tokenFile"), base_dir),
        namespace=str(ctx.get("namespace") or "default"),
        source=source,
        temp_files=tuple(temps),
    )


def in_cluster_config(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ClusterConfig:
    """The pod's own service account, as kubelets mount it."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError(
            "not running in a pod (KUBERNETES_SERVICE_HOST unset) and no kubeconfig given: "
            "pass --kubeconfig or set KUBECONFIG"
        )
    token_file = sa_dir / "token"
    if not token_file.exists():
        raise ConfigError(
            f"in-cluster config: {token_file} is missing (automountServiceAccountToken?)"
        )
    ns_file = sa_dir / "namespace"
    namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return ClusterConfig(
        server=f"https://{host}:{port}",
        ca_file=str(sa_dir / "ca.crt"),
        token_file=str(token_file),
        namespace=namespace,
        source="in-cluster",
    )


async def _full_loader(path: Path, context: str | None) -> ClusterConfig:
    # Lazy on purpose: only kubeconfigs with exec plugins or auth providers pay
    # for it. It is an optional extra, absent from the image (pods use their
    # service account).
    try:
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import config as k8s_config
    except ImportError as exc:
        raise ConfigError(
            f"kubeconfig {path}: its user authenticates with an exec plugin or auth "
            "provider, which needs kubernetes-asyncio: pip install 'power-dra-driver[exec-auth]' "
            "(or use a token or client-certificate kubeconfig)"
        ) from exc

    cfg = k8s_client.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(path), context=context, client_configuration=cfg
    )
    auth = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization") or ""
    token = auth.removeprefix("Bearer ").strip() or None
    return ClusterConfig(
        server=str(cfg.host).rstrip("/"),
        ca_file=cfg.ssl_ca_cert,
        insecure_skip_tls_verify=not cfg.verify_ssl,
        client_cert_file=cfg.cert_file,
        client_key_file=cfg.key_file,
        token=token,
        source=str(path),
    )


async def load_cluster_config(kubeconfig: str | None, context: str | None = None) -> ClusterConfig:
    """Load the connection from a kubeconfig file, else from the pod's service account.

    `kubeconfig` may be a path or None; `KUBECONFIG` should be applied by the
    caller's flag parsing (flags win over the environment).
    """
    if not kubeconfig:
        return in_cluster_config()
    path, data = _read_kubeconfig(kubeconfig)
    if needs_full_loader(data, context):
        return await _full_loader(path, context)
    return parse_kubeconfig(data, path.parent, str(path), context)


def _read_kubeconfig(kubeconfig: str) -> tuple[Path, dict[str, Any]]:
    path = Path(kubeconfig.split(os.pathsep, maxsplit=1)[0]).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)")
    return path, data
