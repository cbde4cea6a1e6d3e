# SPDX-License-Identifier: Apache-2.0
"""Where the API server is and how to authenticate: kubeconfig or in-cluster.

Token, token file, client certificates and exec credential plugins are
handled here without importing kubernetes-asyncio (importing it costs ~70 MiB
and most of a second); auth providers (deprecated upstream) are resolved by
kubernetes-asyncio's loader, imported only then; it is the optional extra
`auth-provider` (not in the image: in a pod both processes use the service
account).

Inline credentials (`*-data`) stay in memory: nothing is written to disk.
An exec plugin's credential is cached until it expires (or the server
answers 401) and then fetched again by running the plugin.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigError(Exception):
    """The cluster connection could not be configured; the message says what to fix."""


# An exec credential is renewed this long before it expires.
EXEC_EXPIRY_MARGIN = 10.0
EXEC_TIMEOUT = 60.0


@dataclass(frozen=True)
class ExecCredential:
    """What an exec plugin returned (client.authentication.k8s.io ExecCredential status)."""

    token: str | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None
    expires_at: float | None = None  # unix time; None: until the server refuses it


class ExecPlugin:
    """A kubeconfig `user.exec` credential plugin, run on demand, its answer cached.

    `credential()` returns the cached credential while it is valid and runs
    the plugin when there is none, it has expired, or `invalidate()` was
    called (after a 401). Blocking (runs a process): call it in a worker thread.
    """

    def __init__(
        self,
        command: str,
        args: tuple[str, ...] = (),
        env: tuple[tuple[str, str], ...] = (),
        api_version: str = "client.authentication.k8s.io/v1",
        base_dir: Path | None = None,
    ) -> None:
        self.command = command
        self.args = args
        self.env = env
        self.api_version = api_version
        self.base_dir = base_dir
        self.runs = 0
        self._cached: ExecCredential | None = None
        self._lock = threading.Lock()

    def valid(self) -> ExecCredential | None:
        """The cached credential if it is still good (no process run)."""
        cached = self._cached
        if cached is None:
            return None
        if cached.expires_at is not None and time.time() + EXEC_EXPIRY_MARGIN >= cached.expires_at:
            return None
        return cached

    def invalidate(self, refused: ExecCredential | None = None) -> None:
        """Forget the cached credential (the server refused it)."""
        with self._lock:
            if refused is None or self._cached is refused:
                self._cached = None

    def credential(self) -> ExecCredential:
        """A valid credential, running the plugin when needed. Blocking.

        Raises:
            ConfigError: the plugin failed or answered something unusable.
        """
        with self._lock:
            cached = self.valid()
            if cached is None:
                cached = self._cached = self._run()
            return cached

    def _argv(self) -> list[str]:
        command = self.command
        if "/" in command and not os.path.isabs(command) and self.base_dir is not None:
            command = str(self.base_dir / command)  # kubectl resolves it this way
        return [command, *self.args]

    def _run(self) -> ExecCredential:
        self.runs += 1
        info = {
            "apiVersion": self.api_version,
            "kind": "ExecCredential",
            "spec": {"interactive": False},
        }
        env = {**os.environ, **dict(self.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            done = subprocess.run(
                self._argv(),
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=EXEC_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"exec credential plugin {self.command}: {exc}") from exc
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-500:]
            raise ConfigError(
                f"exec credential plugin {self.command} exited with {done.returncode}: {err}"
            )
        return parse_exec_credential(done.stdout, self.command)


def parse_exec_credential(output: bytes, command: str = "exec plugin") -> ExecCredential:
    """An ExecCredential document (the plugin's stdout) as an ExecCredential.

    Raises:
        ConfigError: not JSON, no status, or neither a token nor a client certificate.
    """
    try:
        doc = json.loads(output)
    except ValueError as exc:
        raise ConfigError(f"exec credential plugin {command}: output is not JSON") from exc
    status = doc.get("status") if isinstance(doc, dict) else None
    if not isinstance(status, dict):
        raise ConfigError(f"exec credential plugin {command}: output has no status")
    token = status.get("token") or None
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if not token and not (cert and key):
        raise ConfigError(
            f"exec credential plugin {command}: status has neither a token nor a "
            "client certificate and key"
        )
    expires_at = None
    if status.get("expirationTimestamp"):
        stamp = str(status["expirationTimestamp"]).replace("Z", "+00:00")
        try:
            expires_at = datetime.fromisoformat(stamp).timestamp()
        except ValueError as exc:
            raise ConfigError(
                f"exec credential plugin {command}: bad expirationTimestamp {stamp!r}"
            ) from exc
    return ExecCredential(
        token=str(token) if token else None,
        client_cert_data=str(cert).encode() if cert else None,
        client_key_data=str(key).encode() if key else None,
        expires_at=expires_at,
    )


@dataclass(frozen=True)
class ClusterConfig:
    """Everything needed to open a connection to the API server.

    Inline kubeconfig data (`certificate-authority-data`, `client-*-data`)
    is kept as PEM bytes in `ca_data`, `client_cert_data`, `client_key_data`.
    """

    server: str
    ca_file: str | None = None
    insecure_skip_tls_verify: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    namespace: str = "default"
    source: str = ""
    ca_data: bytes | None = field(default=None, repr=False)
    client_cert_data: bytes | None = field(default=None, repr=False)
    client_key_data: bytes | None = field(default=None, repr=False, compare=False)
    exec_plugin: ExecPlugin | None = field(default=None, compare=False)

    def bearer_token(self) -> str | None:
        """The current bearer token; a token file is re-read as kubelets rotate it.

        With an exec plugin: its cached credential's token (refreshed by the
        API client through `exec_plugin.credential()` before it expires).
        """
        if self.exec_plugin is not None:
            cached = self.exec_plugin.valid()
            if cached is not None and cached.token:
                return cached.token
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        return self.token


def _inline(data_b64: str, what: str) -> bytes:
    try:
        return base64.b64decode(data_b64, validate=True)
    except ValueError as exc:
        raise ConfigError(f"kubeconfig: {what} is not valid base64") from exc


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
    """Whether the selected user authenticates in a way only kubernetes-asyncio handles
    (an auth provider)."""
    ctx_name = context or kubeconfig.get("current-context")
    if not ctx_name:
        return False
    try:
        ctx = _named(kubeconfig.get("contexts"), str(ctx_name), "context", "")
        user = _named(kubeconfig.get("users"), str(ctx.get("user", "")), "user", "")
    except ConfigError:
        return False
    return "auth-provider" in user


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
    ca_file = _resolve(cluster.get("certificate-authority"), base_dir)
    ca_data = cert_data = key_data = None
    if cluster.get("certificate-authority-data"):
        ca_data = _inline(cluster["certificate-authority-data"], "certificate-authority-data")
        ca_file = None
    cert = _resolve(user.get("client-certificate"), base_dir)
    if user.get("client-certificate-data"):
        cert_data = _inline(user["client-certificate-data"], "client-certificate-data")
        cert = None
    key = _resolve(user.get("client-key"), base_dir)
    if user.get("client-key-data"):
        key_data = _inline(user["client-key-data"], "client-key-data")
        key = None
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
        ca_data=ca_data,
        client_cert_data=cert_data,
        client_key_data=key_data,
        exec_plugin=_exec_plugin(user.get("exec"), base_dir, source),
    )


def _exec_plugin(spec: Any, base_dir: Path, source: str) -> ExecPlugin | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec.get("command"):
        raise ConfigError(f"kubeconfig {source}: user.exec needs a command")
    env = tuple(
        (str(e.get("name")), str(e.get("value", "")))
        for e in spec.get("env") or []
        if isinstance(e, dict) and e.get("name")
    )
    return ExecPlugin(
        str(spec["command"]),
        tuple(str(a) for a in spec.get("args") or []),
        env,
        str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
        base_dir,
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
    # Lazy on purpose: only kubeconfigs with auth providers pay for it. It is an optional extra, absent from the image (pods use their
    # service account).
    try:
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import config as k8s_config
    except ImportError as exc:
        raise ConfigError(
            f"kubeconfig {path}: its user authenticates with an auth provider, which needs "
            "kubernetes-asyncio: pip install 'power-dra-driver[auth-provider]' (or use a "
            "token, client-certificate or exec-plugin kubeconfig)"
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


def _kubeconfig_path(kubeconfig: str) -> Path:
    """The file a kubeconfig value names (the first of a KUBECONFIG-style list)."""
    return Path(kubeconfig.split(os.pathsep, maxsplit=1)[0]).expanduser()


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def needs_yaml_parser(kubeconfig: str | None) -> bool:
    """Whether loading `kubeconfig` imports the YAML parser: a file in YAML does; one
    in JSON does not, nor does none (in a pod: the service account). An unreadable
    file is left to `load_cluster_config`, which names it."""
    if not kubeconfig:
        return False
    try:
        with _kubeconfig_path(kubeconfig).open(encoding="utf-8", errors="replace") as f:
            head = f.read(256)
    except OSError:
        return False
    return not _is_json(head)


def _read_kubeconfig(kubeconfig: str) -> tuple[Path, dict[str, Any]]:
    path = _kubeconfig_path(kubeconfig)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    data: Any = None
    if _is_json(text):
        # A kubeconfig in JSON (`kubectl config view --raw -o json`) needs no YAML
        # parser: in a pod both processes use the service account and never load
        # it (half a MiB the plugin would otherwise keep).
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # let the YAML parser say what is wrong
    if data is None:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)")
    return path, data
