# SPDX-License-Identifier: Apache-2.0
"""Import contracts of our packages (docs/CONTRACTS.md): imports run down the
layers and never in a circle.

Layers, from the bottom:
- `controller.kube`: the generic Kubernetes client layer; imports none of ours
  outside itself;
- `controller.nx` (the driver's domain model) and `controller.process` (process
  plumbing): may import `controller.kube`, not each other;
- the controller (modules at the top of `controller/`) and the node plugin
  (`kubeletplugin`): may import the shared layers, never each other; only the
  plugin imports `proto_gen`;
- `proto_gen` imports none of ours.

No import cycle between our modules either, lazy (function-level) imports
included: a cycle hidden in a function still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness.cluster import REPO

PACKAGES = ("controller", "kubeletplugin", "proto_gen")

# layer -> the layers its modules may import (their own included).
ALLOWED: dict[str, frozenset[str]] = {
    "kube": frozenset({"kube"}),
    "nx": frozenset({"nx", "kube"}),
    "process": frozenset({"process", "kube"}),
    "controller": frozenset({"controller", "kube", "nx", "process"}),
    "kubeletplugin": frozenset({"kubeletplugin", "kube", "nx", "process", "proto_gen"}),
    "proto_gen": frozenset({"proto_gen"}),
}


def layer(module: str) -> str:
    """The layer a module of ours belongs to, from its import path alone."""
    parts = module.split(".")
    if parts[0] == "controller" and len(parts) >= 2 and parts[1] in ("kube", "nx", "process"):
        return parts[1]
    return parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (src, dst)
        for src, dsts in graph.items()
        for dst in dsts
        if layer(dst) not in ALLOWED[layer(src)]
    )


def our_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            if "generated" in rel.parts:
                continue  # generated betterproto code imports only its own runtime
            name = ".".join(rel.parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> our modules it imports (absolute, relative, top-level or lazy)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_our_modules() -> None:
    assert cycles(import_graph(our_modules())) == []


def test_imports_run_down_the_layers() -> None:
    assert layer_violations(import_graph(our_modules())) == []


def test_every_module_has_a_layer() -> None:
    assert {layer(name) for name in our_modules()} <= set(ALLOWED)


def test_the_layer_is_told_by_the_import_path() -> None:
    assert layer("controller.kube.client") == "kube"
    assert layer("controller.nx") == "nx"
    assert layer("controller.process.metrics") == "process"
    assert layer("controller.claim_status") == "controller"
    assert layer("controller") == "controller"
    assert layer("kubeletplugin.slices") == "kubeletplugin"


def test_the_checker_sees_an_upward_import() -> None:
    # The shared layer importing the controller, the plugin importing the
    # controller's top level, and the controller importing the plugin.
    graph = {
        "controller.kube.client": {"controller.leader"},
        "kubeletplugin.driver": {"controller.claim_status", "controller.kube.errors"},
        "controller.main": {"kubeletplugin.slices", "controller.nx.names"},
        "controller.nx.names": set(),
    }
    assert layer_violations(graph) == [
        ("controller.kube.client", "controller.leader"),
        ("controller.main", "kubeletplugin.slices"),
        ("kubeletplugin.driver", "controller.claim_status"),
    ]


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    # The checker itself, on two modules whose circle closes in a function body.
    (tmp_path / "x.py").write_text("from .y import helper\n")
    (tmp_path / "y.py").write_text("def helper():\n    from .x import thing\n")
    (tmp_path / "z.py").write_text("import os\n")
    graph = import_graph({f"pkg.{n}": tmp_path / f"{n}.py" for n in ("x", "y", "z")})
    assert graph == {"pkg.x": {"pkg.y"}, "pkg.y": {"pkg.x"}, "pkg.z": set()}
    assert cycles(graph) == [["pkg.x", "pkg.y"]]
