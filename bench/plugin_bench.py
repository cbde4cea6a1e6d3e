# SPDX-License-Identifier: Apache-2.0
"""Plugin benchmark: prepare/unprepare latency through an independent gRPC
client (grpcio), start-up times, memory, against the real kube-apiserver.

    python -m bench.plugin_bench [--cycles 300] [--batches 20] [--soak 10000]

Claims are created and given an allocation by the bench itself (as the
scheduler would), so the figures are the plugin's own: GET claim, decide,
CDI spec + checkpoint write, answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml

from controller.kube.client import ApiClient
from controller.kube.kubeconfig import load_cluster_config
from controller.kube.resources import resource_kinds
from kubeletplugin.atomic_write import atomic_write_bytes
from tests import grpc_stubs
from tests.harness.cluster import ControlPlane
from tests.harness.plugin import DRIVER, PluginProcess

NODE = "bench-node"
NS = "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) in milliseconds of values in seconds."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k] * 1000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched_ns(pid: int) -> tuple[int, int]:
    """CPU time all threads of the process have used so far, and the time they were
    ready to run but waited for a CPU, in nanoseconds (schedstat: exact, where
    /proc/<pid>/stat counts clock ticks)."""
    cpu = waited = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            cpu += int(fields[0])
            waited += int(fields[1])
    return cpu, waited


def state_kib(plugin: PluginProcess) -> float:
    """Size of the plugin's state on disk (snapshot and journal)."""
    files = [plugin.checkpoint, plugin.checkpoint.with_name("checkpoint.journal")]
    return sum(p.stat().st_size for p in files if p.exists()) / 1024


def claim_obj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"devices": {"requests": [{"name": "nx", "exactly": {"deviceClassName": DRIVER}}]}},
    }


async def make_claims(api: ApiClient, count: int) -> list[tuple[str, str]]:
    """Create `count` claims allocated to the bench node's nx-gzip and reserved for a
    pod, as the scheduler leaves them before the kubelet asks; return (name, uid)."""
    res = resource_kinds("v1")["ResourceClaim"]
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[str, str]:
        async with sem:
            created = await api.create(res, claim_obj(f"c{i}"))
            created["status"] = {
                "allocation": {
                    "devices": {
                        "results": [
                            {"request": "nx", "driver": DRIVER, "pool": NODE, "device": "nx-gzip"}
                        ]
                    }
                },
                "reservedFor": [{"resource": "pods", "name": f"p{i}", "uid": str(uuid.uuid4())}],
            }
            await api.replace(res, created, subresource="status")
            return created["metadata"]["name"], created["metadata"]["uid"]

    return await asyncio.gather(*(one(i) for i in range(count)))


# Calls are timed back to back in blocks of this many cycles (as the issue timed
# both drivers), each block followed by as many floor samples: the floor sees the
# same load as the calls without its own work landing between two calls.
BLOCK = 50
# Cycles of the separate pass that reads the plugin's CPU time around each call.
CPU_CYCLES = 100
# Start-up figures: the median of this many starts of the plugin and of its floor.
STARTS = 5


class Floor:
    """What a call cannot go below, sampled in blocks between blocks of the plugin's
    calls (so that the floor sees the same load they do): one GET of a claim from
    the API server's watch cache (the plugin's default read) over a kept-alive
    connection of the same client, one atomic fsync'd write, and one round trip
    to a plain grpclib server (its own process, called with grpcio)."""

    def __init__(self, kubeconfig: str, claim: str) -> None:
        self.gets: list[float] = []
        self.writes: list[float] = []
        self.rtts: list[float] = []
        self.batch_gets: list[float] = []
        self._claim = claim
        self._dir = tempfile.TemporaryDirectory(dir=RESULTS)
        self._payload = os.urandom(4096)
        self._runner = asyncio.Runner()
        self._res = resource_kinds("v1")["ResourceClaim"]

        async def client() -> ApiClient:
            return ApiClient(await load_cluster_config(kubeconfig), qps=0)

        self._api = self._runner.run(client())
        sock = Path(self._dir.name) / "floor.sock"
        self._server = subprocess.Popen(
            [sys.executable, "-m", "bench.grpclib_floor", str(sock)],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self._server.stdout is not None
        if self._server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the grpclib floor server did not start")
        apis = grpc_stubs.load()
        pb2 = apis.dra_v1.pb2
        self._request = pb2.NodeUnprepareResourcesRequest(
            claims=[pb2.Claim(namespace=NS, name="c", uid="00000000-0000-4000-8000-000000000000")]
        )
        self._channel = grpc.insecure_channel(f"unix:{sock}")
        self._stub = apis.dra_v1.grpc.DRAPluginStub(self._channel)
        for _ in range(10):  # warm-up: connections
            self.sample()
        self.gets.clear()
        self.writes.clear()
        self.rtts.clear()
        self._server_cpu = cpu_seconds(self._server.pid)

    def sample(self) -> None:
        t = time.perf_counter()
        self._runner.run(self._api.get(self._res, self._claim, NS, from_cache=True))
        self.gets.append(time.perf_counter() - t)
        t = time.perf_counter()
        atomic_write_bytes(Path(self._dir.name) / "state.json", self._payload)
        self.writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        self._stub.NodeUnprepareResources(self._request, timeout=10)
        self.rtts.append(time.perf_counter() - t)

    def sample_batch(self, n: int) -> None:
        """`n` concurrent GETs of the claim: what a batch of `n` claims cannot go below."""

        async def gets() -> None:
            await asyncio.gather(
                *(self._api.get(self._res, self._claim, NS, from_cache=True) for _ in range(n))
            )

        t = time.perf_counter()
        self._runner.run(gets())
        self.batch_gets.append(time.perf_counter() - t)

    def server_cpu_ms_per_call(self) -> float:
        """CPU the plain grpclib server spent per round trip so far."""
        used = cpu_seconds(self._server.pid) - self._server_cpu
        return used * 1000 / max(1, len(self.rtts))

    def close(self) -> None:
        self._channel.close()
        self._server.kill()
        self._server.wait()
        self._runner.run(self._api.close())
        self._runner.close()
        self._dir.cleanup()

    def figures(self) -> dict[str, float]:
        return {
            "get_claim_p50_ms": pct(self.gets, 50),
            "get_claim_p99_ms": pct(self.gets, 99),
            "atomic_write_p50_ms": pct(self.writes, 50),
            "atomic_write_p99_ms": pct(self.writes, 99),
            "grpclib_rtt_p50_ms": pct(self.rtts, 50),
            "grpclib_rtt_p99_ms": pct(self.rtts, 99),
            "batch_gets_p50_ms": pct(self.batch_gets, 50) if self.batch_gets else 0.0,
            "grpclib_cpu_ms_per_call": self.server_cpu_ms_per_call(),
            "floor_samples": len(self.gets),
        }


def timed_cycles(
    client: Client, claims: list[tuple[str, str]], floor: Floor
) -> tuple[list[float], list[float]]:
    """Prepare then unprepare each claim, timed back to back in blocks of BLOCK
    cycles, each block followed by as many floor samples; the prepare and
    unprepare latencies."""
    prepares: list[float] = []
    unprepares: list[float] = []
    for start in range(0, len(claims), BLOCK):
        block = claims[start : start + BLOCK]
        for c in block:
            prepares.append(client.prepare([c]))
            unprepares.append(client.unprepare([c]))
        for _ in block:
            floor.sample()
    return prepares, unprepares


class Client:
    """The kubelet's side of the DRA v1 service, on grpcio."""

    def __init__(self, plugin: PluginProcess) -> None:
        self.apis = grpc_stubs.load()
        self.channel = grpc.insecure_channel(f"unix:{plugin.dra_socket}")
        self.pb2 = self.apis.dra_v1.pb2
        self.stub = self.apis.dra_v1.grpc.DRAPluginStub(self.channel)

    def _claims(self, claims: list[tuple[str, str]]) -> list[Any]:
        return [self.pb2.Claim(namespace=NS, name=n, uid=u) for n, u in claims]

    def prepare(self, claims: list[tuple[str, str]]) -> float:
        t = time.perf_counter()
        resp = self.stub.NodePrepareResources(
            self.pb2.NodePrepareResourcesRequest(claims=self._claims(claims)), timeout=45
        )
        elapsed = time.perf_counter() - t
        for uid, r in resp.claims.items():
            if r.error or not r.devices:
                raise RuntimeError(f"prepare of {uid} failed: {r.error!r}")
        return elapsed

    def unprepare(self, claims: list[tuple[str, str]]) -> float:
        t = time.perf_counter()
        resp = self.stub.NodeUnprepareResources(
            self.pb2.NodeUnprepareResourcesRequest(claims=self._claims(claims)), timeout=45
        )
        elapsed = time.perf_counter() - t
        for uid, r in resp.claims.items():
            if r.error:
                raise RuntimeError(f"unprepare of {uid} failed: {r.error!r}")
        return elapsed


def _time_getinfo(plugin: PluginProcess, t0: float, out: dict[str, float]) -> None:
    """In its own thread: when the registration socket appears, and when GetInfo answers."""
    apis = grpc_stubs.load()
    while not plugin.registration_socket.exists():
        if time.perf_counter() - t0 > 30:
            return
        time.sleep(0.0005)
    out["socket"] = time.perf_counter() - t0
    with grpc.insecure_channel(f"unix:{plugin.registration_socket}") as channel:
        stub = apis.registration.grpc.RegistrationStub(channel)
        while time.perf_counter() - t0 < 30:
            try:
                stub.GetInfo(apis.registration.pb2.InfoRequest(), timeout=1)
            except grpc.RpcError:
                continue
            out["getinfo"] = time.perf_counter() - t0
            return


def installed_python(workdir: Path) -> str:
    """An interpreter that finds the driver the way the image's does: a venv whose
    site-packages holds one plain path file (the checkout and the development
    venv's packages), where the development venv's editable install adds an
    import hook to every Python start, which the image has not."""
    venv = workdir / "installed-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    packages = sysconfig.get_path("purelib")  # the development venv's, this interpreter's
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    root = Path(__file__).resolve().parent.parent
    (Path(site) / "power-dra-driver.pth").write_text(f"{root}\n{packages}\n")
    return str(python)


def compile_bytecode() -> None:
    """Compile the driver's packages as the image's install does: without it (the
    development environment sets PYTHONDONTWRITEBYTECODE) every start of the plugin
    would compile its sources first, a sixth of its start-up that a pod never pays."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "controller", "kubeletplugin", "proto_gen"],
        cwd=root,
        check=True,
    )


def time_floor_start(workdir: Path, python: str) -> dict[str, float]:
    """The start-up and memory floor: a plain grpclib server (`bench.grpclib_floor`:
    Python, asyncio, grpclib and the DRA v1 messages) started the way the plugin is,
    timed the same way (its socket appearing, its first answer to grpcio), and its
    idle RSS."""
    sock = workdir / "floor-start.sock"
    sock.unlink(missing_ok=True)
    request = grpc_stubs.load().dra_v1.pb2.NodeUnprepareResourcesRequest()
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [python, "-m", "bench.grpclib_floor", str(sock)],
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        while not sock.exists():
            if time.perf_counter() - t0 > 30:
                raise RuntimeError("the grpclib floor server did not start")
            time.sleep(0.0005)
        socket_s = time.perf_counter() - t0
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = grpc_stubs.load().dra_v1.grpc.DRAPluginStub(channel)
            while True:
                try:
                    stub.NodeUnprepareResources(request, timeout=1)
                    break
                except grpc.RpcError:
                    if time.perf_counter() - t0 > 30:
                        raise
            answer_s = time.perf_counter() - t0
        time.sleep(1)
        return {
            "floor_start_to_socket_s": socket_s,
            "floor_start_to_answer_s": answer_s,
            "floor_rss_idle_mib": rss_mib(server.pid),
        }
    finally:
        server.kill()
        server.wait()


class Busy:
    """`n` busy-looping processes for the bench's duration (a load average of ~n)."""

    def __init__(self, n: int) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)
        ]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def time_startup(
    cp: ControlPlane, workdir: Path, python: str
) -> tuple[float, float, float, float, PluginProcess]:
    """Seconds from process start to the registration socket appearing, to GetInfo
    answering, from the socket appearing to GetInfo answering (the kubelet asks as
    soon as it sees the socket, with a 1 s timeout), and from start to the slice
    being visible."""
    # In a pod the plugin reads its service account and loads no YAML parser; a
    # kubeconfig in JSON keeps that true here (a YAML one would add ~0.9 MiB).
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = workdir / "plugin-kubeconfig.json"
    kubeconfig.write_text(json.dumps(yaml.safe_load(Path(cp.kubeconfig).read_text())))
    kubeconfig.chmod(0o600)
    plugin = PluginProcess(
        cp,
        NODE,
        workdir,
        total_credits=2000,
        # The client's rate limit off, as the issue timed both drivers: its default
        # (100 requests/s after a burst of 1000) paces the bench's ~2,000 claim
        # reads in a few seconds, and the filled-node figures would time the pacing.
        extra_args=("-v0", "--kube-api-qps=0"),
        kubeconfig=str(kubeconfig),
        python=python,
    )
    t0 = time.perf_counter()
    plugin.start(wait=False)
    seen: dict[str, float] = {}
    watcher = threading.Thread(target=_time_getinfo, args=(plugin, t0, seen))
    watcher.start()
    slice_seen = 0.0
    while not slice_seen:
        now = time.perf_counter() - t0
        if now > 30:
            raise RuntimeError(f"plugin start timed out:\n{plugin.log()}")
        if not slice_seen:
            out = cp.kubectl(
                "get", "resourceslices", f"--field-selector=spec.nodeName={NODE}", "-o", "name"
            ).stdout
            if out.strip():
                slice_seen = time.perf_counter() - t0
        time.sleep(0.005)
    watcher.join()
    if "getinfo" not in seen:
        raise RuntimeError(f"GetInfo never answered:\n{plugin.log()}")
    return seen["socket"], seen["getinfo"], seen["getinfo"] - seen["socket"], slice_seen, plugin


def time_startups(
    cp: ControlPlane, work: Path, python: str
) -> tuple[dict[str, float], tuple[float, ...], PluginProcess]:
    """The start-up figures of the floor server and of the plugin, each the median of
    STARTS starts taken in turns (a single start is at the mercy of whatever else the
    machine does in its 0.1 s); the plugin of the last start is left running."""
    floors: list[dict[str, float]] = []
    plugins: list[tuple[float, ...]] = []
    plugin: PluginProcess | None = None
    for i in range(STARTS):
        if plugin is not None:
            plugin.stop()
            # The next start is timed until its slice appears.
            cp.kubectl("delete", "resourceslices", f"--field-selector=spec.nodeName={NODE}")
            time.sleep(1)  # the API server's work for the deletion done before either start
        floors.append(time_floor_start(work, python))
        *times, plugin = time_startup(cp, work / f"node-{i}", python)
        plugins.append(tuple(times))
    assert plugin is not None
    floor = {key: statistics.median(f[key] for f in floors) for key in floors[0]}
    return floor, tuple(statistics.median(column) for column in zip(*plugins, strict=True)), plugin


Row = tuple[str, str, float | None, str, str | None]


def table_rows(result: dict[str, Any], held_levels: list[int], bs: int, soak: int) -> list[Row]:
    """The printed figures: (name, key in the JSON, target, unit, floor it is divided by)."""
    rows: list[Row] = [
        ("prepare 1 claim p50", "prepare_1_p50_ms", 4.5, "ms", "prepare"),
        ("prepare 1 claim p90", "prepare_1_p90_ms", None, "ms", "prepare"),
        ("prepare 1 claim p99", "prepare_1_p99_ms", 7.5, "ms", "prepare"),
        ("unprepare 1 claim p50", "unprepare_1_p50_ms", 1.7, "ms", "unprepare"),
        ("unprepare 1 claim p99", "unprepare_1_p99_ms", None, "ms", "unprepare"),
        (f"prepare {bs} claims p50", f"prepare_{bs}_p50_ms", 25.0, "ms", "batch"),
        (f"prepare {bs} claims p99", f"prepare_{bs}_p99_ms", None, "ms", "batch"),
    ]
    # The reference for a filled node: the empty node measured just before it.
    empty_p50 = result.get("held_0_prepare_p50_ms", result.get("prepare_1_p50_ms", 0.0))
    for n in held_levels:
        kib = result.get(f"held_{n}_state_kib", 0.0)
        rows.append(
            (
                f"prepare p50, {n} held ({kib:.0f} KiB)",
                f"held_{n}_prepare_p50_ms",
                1.2 * empty_p50,
                "ms",
                f"prepare {n}",
            )
        )
        rows.append(
            (f"unprepare p50, {n} held", f"held_{n}_unprepare_p50_ms", None, "ms", f"unprepare {n}")
        )
    return [
        *rows,
        ("start -> registration socket", "start_to_registration_socket_s", None, "s", "socket"),
        ("start -> GetInfo", "start_to_getinfo_s", 0.1, "s", "answer"),
        ("registration socket -> GetInfo", "socket_to_getinfo_s", 0.1, "s", None),
        ("start -> slice visible", "start_to_slice_s", 1.0, "s", "answer"),
        ("RSS idle", "rss_idle_mib", 41.0, "MiB", "rss"),
        ("RSS after load", "rss_after_load_mib", None, "MiB", "rss"),
        (f"RSS growth over {soak} cycles", "rss_growth_mib", 5.0, "MiB", None),
        ("plugin CPU for the run", "cpu_s_for_the_run", None, "s", None),
        ("plugin CPU per call", "cpu_ms_per_call", None, "ms", "cpu"),
        ("plugin CPU per prepare of 1 claim p50", "cpu_ms_per_prepare_1", None, "ms", "cpu"),
        ("plugin CPU per unprepare of 1 claim p50", "cpu_ms_per_unprepare_1", None, "ms", "cpu"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--soak", type=int, default=10000, help="prepare/unprepare cycles for RSS growth"
    )
    parser.add_argument(
        "--held",
        default="0,100,1000",
        help="claims already prepared for the filled-node figures (comma-separated; 0 is "
        "the empty node measured in the same phase, the reference of the others)",
    )
    parser.add_argument("--held-cycles", type=int, default=100, help="cycles per filled figure")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="run N busy-looping processes beside the bench (load average ~N); the figures "
        "are compared with the last run without them (bench/results/plugin.json) and "
        "written to bench/results/plugin-busy.json",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("plugin-busy.json" if args.busy else "plugin.json")
    quiet: dict[str, float] = {}
    if args.busy and (RESULTS / "plugin.json").exists():
        quiet = json.loads((RESULTS / "plugin.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="power-dra-bench-"))
    cp = ControlPlane(work / "cp", scheduler=False, controller_manager=False).start()
    plugin: PluginProcess | None = None
    busy = Busy(args.busy)
    load_at_start = os.getloadavg()[0]
    try:
        cp.create_node(NODE)
        cp.create_namespace(NS)
        # Start-up is measured before anything else loads the machine, right after
        # its floor (a plain grpclib server started the same way).
        compile_bytecode()
        python = installed_python(work)
        start_floor, (socket_s, getinfo_s, socket_getinfo_s, slice_s), plugin = time_startups(
            cp, work, python
        )
        time.sleep(2)
        rss_idle = rss_mib(plugin.process.pid)  # type: ignore[union-attr]

        async def setup() -> list[tuple[str, str]]:
            cfg = await load_cluster_config(cp.kubeconfig)
            async with ApiClient(cfg, qps=0) as api:
                return await make_claims(
                    api, args.cycles + args.batches * args.batch_size + max(held_levels, default=0)
                )

        held_levels = [int(n) for n in args.held.split(",") if n]
        claims = asyncio.run(setup())
        singles = claims[: args.cycles]
        batch_claims = claims[args.cycles : args.cycles + args.batches * args.batch_size]
        fill = claims[args.cycles + args.batches * args.batch_size :]
        client = Client(plugin)
        floor_sampler = Floor(cp.kubeconfig, claims[0][0])
        pid = plugin.process.pid  # type: ignore[union-attr]
        cpu_start = cpu_seconds(pid)
        for c in singles[:10]:  # warm-up
            client.prepare([c])
            client.unprepare([c])
        prep, unprep = timed_cycles(client, singles, floor_sampler)
        # The plugin's CPU per call, in a pass of its own: reading /proc between
        # the calls would slow the calls timed above.
        # The same pass counts the time its threads were ready but waited for a CPU:
        # what a loaded machine adds to a call.
        prep_cpu, unprep_cpu, prep_wait, unprep_wait = [], [], [], []
        for c in singles[:CPU_CYCLES]:
            before = sched_ns(pid)
            client.prepare([c])
            between = sched_ns(pid)
            client.unprepare([c])
            after = sched_ns(pid)
            prep_cpu.append(between[0] - before[0])
            unprep_cpu.append(after[0] - between[0])
            prep_wait.append(between[1] - before[1])
            unprep_wait.append(after[1] - between[1])
        batch = []
        for i in range(args.batches):
            group = batch_claims[i * args.batch_size : (i + 1) * args.batch_size]
            batch.append(client.prepare(group))
            client.unprepare(group)
            floor_sampler.sample_batch(len(group))
        cpu_run = cpu_seconds(pid) - cpu_start
        floor = floor_sampler.figures()
        # The node fills up: the cost of one claim with N already prepared.
        held: dict[int, dict[str, float]] = {}
        done = 0
        for level in held_levels:
            while done < level:
                group = fill[done : min(level, done + args.batch_size)]
                client.prepare(group)
                done += len(group)
            first = len(floor_sampler.gets)
            p, u = timed_cycles(client, singles[: args.held_cycles], floor_sampler)
            # This phase's own floor: a load burst during one phase moves both.
            phase = {
                k: pct(getattr(floor_sampler, k)[first:], 50) for k in ("gets", "writes", "rtts")
            }
            held[level] = {
                "prepare_p50_ms": pct(p, 50),
                "prepare_p99_ms": pct(p, 99),
                "unprepare_p50_ms": pct(u, 50),
                "state_kib": state_kib(plugin),
                "prepare_floor_ms": phase["gets"] + phase["writes"] + phase["rtts"],
                "unprepare_floor_ms": phase["writes"] + phase["rtts"],
            }
        for i in range(0, done, args.batch_size):
            client.unprepare(fill[i : min(done, i + args.batch_size)])
        rss_before_soak = rss_mib(plugin.process.pid)  # type: ignore[union-attr]
        for i in range(args.soak):
            c = singles[i % len(singles)]
            client.prepare([c])
            client.unprepare([c])
        rss_after = rss_mib(plugin.process.pid)  # type: ignore[union-attr]
        floor_sampler.close()
    finally:
        busy.stop()
        if plugin is not None:
            plugin.stop()
        cp.stop()
    result = {
        "prepare_1_p50_ms": pct(prep, 50),
        "prepare_1_p90_ms": pct(prep, 90),
        "prepare_1_p99_ms": pct(prep, 99),
        "unprepare_1_p50_ms": pct(unprep, 50),
        "unprepare_1_p99_ms": pct(unprep, 99),
        f"prepare_{args.batch_size}_p50_ms": pct(batch, 50),
        f"prepare_{args.batch_size}_p99_ms": pct(batch, 99),
        "start_to_registration_socket_s": socket_s,
        "start_to_getinfo_s": getinfo_s,
        "socket_to_getinfo_s": socket_getinfo_s,
        "start_to_slice_s": slice_s,
        "rss_idle_mib": rss_idle,
        "rss_after_load_mib": rss_before_soak,
        f"rss_after_{args.soak}_cycles_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before_soak,
        "cpu_s_for_the_run": cpu_run,
        "cpu_ms_per_cycle": cpu_run * 1000 / (args.cycles + args.batches),
        "cpu_ms_per_call": cpu_run * 1000 / (args.cycles + args.batches) / 2,
        "cpu_ms_per_prepare_1": statistics.median(prep_cpu) / 1e6,
        "cpu_ms_per_unprepare_1": statistics.median(unprep_cpu) / 1e6,
        "cpu_wait_ms_per_prepare_1": statistics.median(prep_wait) / 1e6,
        "cpu_wait_ms_per_unprepare_1": statistics.median(unprep_wait) / 1e6,
        **{f"held_{n}_{k}": v for n, figures in held.items() for k, v in figures.items()},
        **floor,
        **start_floor,
        "busy_processes": args.busy,
        "load_average_1m_at_start": load_at_start,
        "load_average_1m": os.getloadavg()[0],
        "cycles": args.cycles,
        "batches": args.batches,
        "mean_prepare_ms": statistics.mean(prep) * 1000,
    }
    call_floor = {
        # What a call cannot go below: its GET, its durable write, a gRPC round trip.
        "prepare": floor["get_claim_p50_ms"]
        + floor["atomic_write_p50_ms"]
        + floor["grpclib_rtt_p50_ms"],
        "unprepare": floor["atomic_write_p50_ms"] + floor["grpclib_rtt_p50_ms"],
        # Start-up, memory and CPU: the plain grpclib server (Python, asyncio, grpclib,
        # the DRA v1 messages) started, timed and called the same way.
        "socket": start_floor["floor_start_to_socket_s"],
        "answer": start_floor["floor_start_to_answer_s"],
        "rss": start_floor["floor_rss_idle_mib"],
        "cpu": floor["grpclib_cpu_ms_per_call"],
        # A batch: its GETs all at once, one durable write, one round trip.
        "batch": floor["batch_gets_p50_ms"]
        + floor["atomic_write_p50_ms"]
        + floor["grpclib_rtt_p50_ms"],
    }
    for n in held_levels:
        call_floor[f"prepare {n}"] = held[n]["prepare_floor_ms"]
        call_floor[f"unprepare {n}"] = held[n]["unprepare_floor_ms"]
    bs = args.batch_size
    rows = table_rows(result, held_levels, bs, args.soak)
    # The same figures of the quiet run, for --busy: which ones a loaded machine moves.
    quiet_values = {
        key: quiet[key]
        for _, key, *_ in table_rows(quiet, held_levels, bs, args.soak)
        if quiet.get(key)
    }
    header = f"\n{'figure':40} {'value':>10} {'target':>10}  met  x floor"
    print(header + ("  x quiet" if quiet_values else ""))
    for name, key, target, unit, kind in rows:
        value = result[key]
        ratio = f"{value / call_floor[kind]:6.1f}" if kind else "     -"
        goal = f"{target:8.2f}{unit:>3}" if target is not None else " " * 11
        met = "   " if target is None else ("yes" if value <= target else "NO ")
        line = f"{name:40} {value:8.2f}{unit:>3} {goal}  {met}  {ratio}"
        if key in quiet_values:
            moved = value / quiet_values[key]
            line += f"  {moved:6.1f}{' > 1.5' if moved > 1.5 else ''}"
        print(line)
    print(
        f"\nfloor (same run): GET claim from the watch cache p50 {floor['get_claim_p50_ms']:.2f} ms "
        f"(p99 {floor['get_claim_p99_ms']:.2f}); atomic write+fsync p50 "
        f"{floor['atomic_write_p50_ms']:.2f} ms (p99 {floor['atomic_write_p99_ms']:.2f}); "
        f"grpclib round trip p50 {floor['grpclib_rtt_p50_ms']:.2f} ms "
        f"(p99 {floor['grpclib_rtt_p99_ms']:.2f}); prepare floor {call_floor['prepare']:.2f} ms, "
        f"unprepare floor {call_floor['unprepare']:.2f} ms; {bs} concurrent GETs p50 "
        f"{floor['batch_gets_p50_ms']:.2f} ms, batch floor {call_floor['batch']:.2f} ms"
    )
    print(
        f"start-up floor (same run): a plain grpclib server's socket after "
        f"{start_floor['floor_start_to_socket_s']:.3f} s, first answer after "
        f"{start_floor['floor_start_to_answer_s']:.3f} s, idle RSS "
        f"{start_floor['floor_rss_idle_mib']:.1f} MiB; its CPU per round trip "
        f"{floor['grpclib_cpu_ms_per_call']:.2f} ms"
    )
    print(
        f"start-up figures: the median of {STARTS} starts each of the plugin and of the floor "
        "server, taken in turns"
    )
    print(
        f"the plugin's threads waited for a CPU (ready to run, schedstat) "
        f"{result['cpu_wait_ms_per_prepare_1']:.2f} ms per prepare and "
        f"{result['cpu_wait_ms_per_unprepare_1']:.2f} ms per unprepare (p50)"
    )
    if quiet.get("grpclib_rtt_p50_ms"):
        moved = {
            name: result[key] / quiet[key]
            for name, key in (
                ("GET claim", "get_claim_p50_ms"),
                ("atomic write+fsync", "atomic_write_p50_ms"),
                ("grpclib round trip", "grpclib_rtt_p50_ms"),
                ("plain grpclib server's first answer", "floor_start_to_answer_s"),
            )
            if quiet.get(key)
        }
        print(
            "the floors against the quiet run's: "
            + ", ".join(f"{name} x{ratio:.1f}" for name, ratio in moved.items())
        )
    print(
        "the plugin's client rate limit is off (--kube-api-qps=0), as the issue timed both drivers"
    )
    print(
        f"load average (1 min): {load_at_start:.1f} at the start, "
        f"{result['load_average_1m']:.1f} at the end"
        + (f"; {args.busy} busy-looping processes beside the bench" if args.busy else "")
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
