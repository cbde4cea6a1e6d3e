# SPDX-License-Identifier: Apache-2.0
"""Controller benchmark at cluster scale on the real kube-apiserver.

    python -m bench.controller_bench [--scales 1,2,4] [--nodes 1000] [--claims 10000]

At scale s: s x 1000 Nodes, s x 1000 of our ResourceSlices, s x 10000 allocated
ResourceClaims. Measured, with `power-dra-controller` as a separate process:

- first sync: start to every claim carrying our `status.devices` entry;
- initial sync: a restarted controller (statuses already right) until every
  claim was reconciled once and the queue is empty;
- RSS after sync;
- at 100 claim updates/s (new allocations), p50/p99 from the update to our
  status write being visible on a watch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.plugin_bench import claim_obj, pct, rss_mib
from controller.kube.client import ApiClient
from controller.kube.kubeconfig import load_cluster_config
from controller.kube.resources import NODES, resource_kinds
from controller.nx.names import DRIVER_NAME
from tests.dra_objects import device_class
from tests.harness.cluster import ControlPlane, Process, free_port

DRIVER = "nx.device.power.ibm.com"
NS = "bench"
RESULTS = Path(__file__).resolve().parent / "results"
CLAIMS = resource_kinds("v1")["ResourceClaim"]
SLICES = resource_kinds("v1")["ResourceSlice"]


async def gather_limited(n: int, coros: Any) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def run(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))


def allocation(node: str) -> dict[str, Any]:
    return {
        "devices": {
            "results": [{"request": "nx", "driver": DRIVER, "pool": node, "device": "nx-gzip"}]
        }
    }


async def populate(api: ApiClient, nodes: int, claims: int, offset: int) -> None:
    async def node(i: int) -> None:
        name = f"n{i}"
        await api.create(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        await api.create(
            SLICES,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceSlice",
                "metadata": {"name": f"{name}-nx-gzip-0"},
                "spec": {
                    "driver": DRIVER,
                    "nodeName": name,
                    "pool": {"name": name, "generation": 1, "resourceSliceCount": 1},
                    "devices": [{"name": "nx-gzip"}],
                },
            },
        )

    async def claim(i: int) -> None:
        created = await api.create(CLAIMS, claim_obj(f"c{i}"))
        created["status"] = {"allocation": allocation(f"n{i % nodes}")}
        await api.replace(CLAIMS, created, subresource="status")

    await gather_limited(32, (node(i) for i in range(offset, nodes)))
    await gather_limited(32, (claim(i) for i in range(claims)))


def ours(claim: dict[str, Any]) -> bool:
    return any(d.get("driver") == DRIVER for d in (claim.get("status") or {}).get("devices") or [])


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.M)
    m = pattern.search(text)
    return float(m.group(1)) if m else 0.0


def start_controller(cp: ControlPlane, workdir: Path, name: str) -> tuple[Process, int]:
    port = free_port()
    proc = Process(
        name,
        [
            sys.executable,
            "-m",
            "controller",
            f"--kubeconfig={cp.kubeconfig}",
            f"--metrics-bind-address=127.0.0.1:{port}",
            "--orphan-grace=1h",
        ],
        workdir,
    )
    return proc, port


async def count_ours(api: ApiClient) -> int:
    listing = await api.list(CLAIMS, NS)
    return sum(1 for c in listing["items"] if ours(c))


async def update_latency(api: ApiClient, nodes: int, count: int, rate: float) -> list[float]:
    """New allocations at `rate`/s; seconds from each update until our status is on the watch."""
    names = [f"u{i}" for i in range(count)]
    await gather_limited(32, (api.create(CLAIMS, claim_obj(n)) for n in names))
    listing = await api.list(CLAIMS, NS)
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = asyncio.Event()

    async def watch() -> None:
        rv = listing["metadata"]["resourceVersion"]
        while not done.is_set():
            async for ev in api.watch(CLAIMS, NS, resource_version=rv, timeout_seconds=60):
                obj = ev["object"]
                rv = obj["metadata"].get("resourceVersion", rv)
                name = obj["metadata"].get("name")
                if name in sent and name not in seen and ours(obj):
                    seen[name] = time.perf_counter()
                    if len(seen) == count:
                        done.set()
                        return

    watcher = asyncio.create_task(watch())
    by_name = {c["metadata"]["name"]: c for c in listing["items"]}

    async def allocate(name: str, i: int) -> None:
        claim = by_name[name]
        claim["status"] = {"allocation": allocation(f"n{i % nodes}")}
        sent[name] = time.perf_counter()
        await api.replace(CLAIMS, claim, subresource="status")

    tasks = []
    start = time.perf_counter()
    for i, name in enumerate(names):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(allocate(name, i)))
    await asyncio.gather(*tasks)
    await asyncio.wait_for(done.wait(), timeout=120)
    watcher.cancel()
    return [seen[n] - sent[n] for n in names]


def run_scale(scale: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    nodes, claims = args.nodes * scale, args.claims * scale
    cp = ControlPlane(work / f"cp-{scale}", scheduler=False, controller_manager=False).start()
    procs: list[Process] = []
    try:
        cp.create_namespace(NS)
        cp.apply(device_class(DRIVER_NAME))

        async def setup() -> None:
            cfg = await load_cluster_config(cp.kubeconfig)
            async with ApiClient(cfg, qps=0) as api:
                await populate(api, nodes, claims, 0)

        t = time.perf_counter()
        asyncio.run(setup())
        print(
            f"  scale {scale}: created {nodes} nodes, {nodes} slices, {claims} claims "
            f"in {time.perf_counter() - t:.0f}s",
            flush=True,
        )

        async def wait_all(timeout: float) -> float:
            cfg = await load_cluster_config(cp.kubeconfig)
            async with ApiClient(cfg, qps=0) as api:
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < timeout:
                    if await count_ours(api) >= claims:
                        return time.perf_counter()
                    await asyncio.sleep(0.5)
            raise TimeoutError("controller did not write all statuses")

        t0 = time.perf_counter()
        first, port = start_controller(cp, work, f"controller-{scale}-a")
        procs.append(first)
        first_sync = asyncio.run(wait_all(600)) - t0
        first.stop()

        t0 = time.perf_counter()
        second, port = start_controller(cp, work, f"controller-{scale}-b")
        procs.append(second)
        label = '{controller="claim-status"}'
        while True:
            try:
                done = metric(port, "power_dra_controller_reconcile_total", label)
                depth = metric(port, "power_dra_controller_queue_depth", label)
            except OSError:
                done, depth = 0, 1
            if done >= claims and depth == 0:
                break
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("restarted controller did not drain its queue")
            time.sleep(0.05)
        initial_sync = time.perf_counter() - t0
        rss = rss_mib(second.pid)

        async def latency() -> list[float]:
            cfg = await load_cluster_config(cp.kubeconfig)
            async with ApiClient(cfg, qps=0) as api:
                return await update_latency(api, nodes, args.updates, args.rate)

        lat = asyncio.run(latency())
        return {
            "scale": scale,
            "nodes": nodes,
            "claims": claims,
            "first_sync_s": first_sync,
            "initial_sync_s": initial_sync,
            "rss_mib": rss,
            "update_to_status_p50_ms": pct(lat, 50),
            "update_to_status_p99_ms": pct(lat, 99),
            "update_rate_per_s": args.rate,
        }
    finally:
        for p in procs:
            p.stop()
        cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", default="1")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--claims", type=int, default=10000)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="power-dra-ctl-bench-"))
    rows = [run_scale(int(s), args, work) for s in args.scales.split(",")]
    print(
        f"\n{'scale':>5} {'nodes':>6} {'claims':>7} {'first sync':>11} {'init sync':>10} "
        f"{'RSS MiB':>8} {'upd p50 ms':>10} {'upd p99 ms':>10}"
    )
    for r in rows:
        print(
            f"{r['scale']:>5} {r['nodes']:>6} {r['claims']:>7} {r['first_sync_s']:>10.1f}s "
            f"{r['initial_sync_s']:>9.1f}s {r['rss_mib']:>8.0f} "
            f"{r['update_to_status_p50_ms']:>10.1f} {r['update_to_status_p99_ms']:>10.1f}"
        )
    print("targets at scale 1: initial sync < 30 s, RSS < 300 MiB, update->status p99 < 100 ms")
    out = RESULTS / "controller.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
