"""The layout docs/architecture.md describes holds: entry points on top, short; library code in
subpackages; no import cycles between ldm_jax modules (counting imports inside functions
too: a lazy import that closes a cycle is still a knot in the design); no references to
documents outside the repository."""

import ast
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "ldm_jax")
ENTRY_POINTS = {"train", "precompute_latents", "sample", "evaluate", "export"}
MAX_ENTRY_POINT_LINES = 100


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module in ldm_jax."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(dirpath, name)
    return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: ldm_jax modules it imports anywhere in its body}."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles():
    assert find_cycles(import_graph(_modules())) == []


def test_top_level_holds_only_entry_points_and_subpackages():
    entries = sorted(os.listdir(PACKAGE))
    modules = {e[:-3] for e in entries if e.endswith(".py")} - {"__init__"}
    assert modules == ENTRY_POINTS
    packages = {e for e in entries if os.path.isfile(os.path.join(PACKAGE, e, "__init__.py"))}
    assert {"config", "cli", "training", "parallel", "storage", "data", "tasks", "models",
            "diffusion", "evaluation", "inference", "convert"} <= packages


def test_entry_points_are_short():
    paths = [os.path.join(PACKAGE, f"{name}.py") for name in ENTRY_POINTS]
    paths.append(os.path.join(PACKAGE, "convert", "__main__.py"))
    for path in paths:
        lines = len(open(path).read().splitlines())
        assert lines <= MAX_ENTRY_POINT_LINES, (path, lines)


def test_no_reference_to_documents_outside_the_repository():
    offenders = []
    for top in ("ldm_jax", "tests", "launch", "configs", "bench", "docs"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, top)):
            for name in filenames:
                if name.endswith((".py", ".md", ".sh", ".sbatch")):
                    path = os.path.join(dirpath, name)
                    if re.search(r"DESIGN\.md|\.\./shared", open(path).read()) and \
                            path != os.path.abspath(__file__):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_architecture_document_exists_and_readme_links_it():
    assert os.path.isfile(os.path.join(ROOT, "docs", "architecture.md"))
    assert "docs/architecture.md" in open(os.path.join(ROOT, "README.md")).read()
