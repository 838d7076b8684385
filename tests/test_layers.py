"""The package's shape: imports point down, with no circle, and modules stay readable.

Layers, lowest first (a module may import only from its own layer or below):
collectives → sync backends → strategies → loops → benchmarks; experiments sit above all. Checked
on the import statements (``ast``), not by importing, so it costs nothing.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxsync")
MAX_LINES = 400


def _modules():
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path, modules):
    """The jaxsync modules ``path`` imports (``from jaxsync.x import y`` counts x.y when y is a
    module, else x)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


GRAPH = {m: _imports(p, _modules()) for m, p in _modules().items()}


def test_nothing_outside_benchmarks_imports_them():
    bad = [
        (m, d)
        for m, deps in GRAPH.items()
        if not m.startswith("jaxsync.benchmarks")
        for d in deps
        if d.startswith("jaxsync.benchmarks")
    ]
    assert not bad


def test_no_import_circle():
    # Package __init__ files re-export their children, so an edge into a package's own child
    # from the package is not a circle of modules.
    def deps(m):
        return {d for d in GRAPH[m] if not d.startswith(m + ".")}

    state = {}
    path = []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in deps(m):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_sync_backends_do_not_import_strategies_or_loops():
    above = ("jaxsync.parallel", "jaxsync.train", "jaxsync.async_ps", "jaxsync.agents")
    bad = [(m, d) for m, deps in GRAPH.items() if m.startswith("jaxsync.sync") for d in deps]
    assert not [(m, d) for m, d in bad if d.startswith(above)]


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(open(p).readlines())) > MAX_LINES}
    assert not long, f"split these (> {MAX_LINES} lines): {long}"


def test_cluster_depends_on_numpy_and_config_error_only():
    """jaxsync.cluster (the simulated clock) sits beside the sync backends: it imports numpy, the
    standard library, ``jaxsync.ConfigError`` and itself; nothing in jaxsync.sync imports it."""
    import sys

    allowed = {"numpy", "jaxsync", "__future__", *sys.stdlib_module_names}
    for m, path in _modules().items():
        if not m.startswith("jaxsync.cluster"):
            continue
        assert GRAPH[m] <= {"jaxsync"} | {d for d in GRAPH if d.startswith("jaxsync.cluster")}, m
        tree = ast.parse(open(path).read())
        roots = {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        roots |= {
            n.module.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
        }
        assert roots <= allowed, (m, roots - allowed)
    assert not [
        (m, d)
        for m, deps in GRAPH.items()
        if m.startswith("jaxsync.sync")
        for d in deps
        if d.startswith("jaxsync.cluster")
    ]
