"""The import graph of `pipeline`, `models` and `kernels`, read with `ast` (a lazy import inside a function counts):
no cycle, no wing importing a wing above it, no private name imported across modules (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "kernels")

# pipeline's wings, lowest first: a module may import its own wing and the wings below it.
WINGS = ("ground", "data", "backends", "evaluation", "convert", "training", "deploy", "top")
GROUND = {"pipeline", "pipeline.config", "pipeline.errors", "pipeline.machine", "pipeline.metrics",
          "pipeline.modelio", "pipeline.plots", "pipeline.rundir"}
TOP = {"pipeline.__main__", "pipeline.cli", "pipeline.stages", "pipeline.doctor", "pipeline.edge", "pipeline.budget"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it or '') for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, "") if full in known else (base, alias.name))
    return out


def owner(target: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `target` names (a submodule's parent package for `pkg.mod.attr`), or None."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, path in known.items():
        edges[name] = {m for t, _ in imports(name, path, known) if (m := owner(t, known)) not in (None, name)}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return []


def wing(name: str) -> str:
    if name in GROUND:
        return "ground"
    if name in TOP:
        return "top"
    return name.split(".")[1]


def test_cycle_finder_finds_a_planted_cycle_and_accepts_a_tree():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_lazy_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n    from pipeline.c import _hidden\n")
    (pkg / "sub" / "b.py").write_text("from pipeline.sub.a import f\n")
    (pkg / "c.py").write_text("_hidden = 1\n")
    known = {n: p for n, p in modules(tmp_path).items()}
    edges = graph(known)
    assert edges["pipeline.sub.a"] == {"pipeline.sub.b", "pipeline.c"}
    assert cycle(edges) == ["pipeline.sub.a", "pipeline.sub.b", "pipeline.sub.a"]
    assert ("pipeline.c", "_hidden") in imports("pipeline.sub.a", known["pipeline.sub.a"], known)


def test_no_import_cycle():
    found = cycle(graph(modules()))
    assert not found, "import cycle: " + " -> ".join(found)


def test_models_and_kernels_import_nothing_of_pipeline():
    edges = graph(modules())
    wrong = {m: sorted(t for t in targets if t.startswith("pipeline")) for m, targets in edges.items()
             if not m.startswith("pipeline")}
    assert not {m: t for m, t in wrong.items() if t}


def test_every_pipeline_module_has_a_wing():
    names = [n for n in modules() if n.startswith("pipeline")]
    assert {wing(n) for n in names} <= set(WINGS), sorted(n for n in names if wing(n) not in WINGS)


def test_no_wing_imports_a_wing_above_it():
    rank = {w: i for i, w in enumerate(WINGS)}
    upward = [f"{m} ({wing(m)}) imports {t} ({wing(t)})" for m, targets in graph(modules()).items()
              if m.startswith("pipeline") for t in targets
              if t.startswith("pipeline") and rank[wing(t)] > rank[wing(m)]]
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{name}: from {module} import {taken}" for name, path in known.items()
               for module, taken in imports(name, path, known)
               if taken.startswith("_") and not taken.endswith("__") and owner(module, known) not in (None, name)]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("package", ["pipeline/training", "pipeline/convert", "pipeline/evaluation",
                                     "pipeline/deploy", "pipeline/backends", "pipeline/data"])
def test_wing_init_files_re_export_nothing(package):
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body), (
        f"{package}/__init__.py holds more than a docstring")
