"""The house plan: no import circle between twa_scale's modules, and no module imports one from a higher layer.

Every import counts, wherever it stands: module level, inside a function, under ``TYPE_CHECKING``. Importing
``twa_scale.a.b`` also runs ``twa_scale/a/__init__.py``, so it counts as an import of the package ``a`` too
(from outside ``a``). The layer table is documented in docs/development.md ("Layers").
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "twa_scale"

# Lowest first. A module may import its own layer and the layers below it, never one above. An entry names a
# module or a package (everything under it); the longest matching entry wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "knobs", "layout", "cli_parse", "models", "background")),
    ("process", ("comm", "logs", "metrics")),
    ("store", ("store",)),
    ("services", ("checks", "tracking", "evaluation", "report")),
    ("data", ("data",)),
    ("train", ("train",)),
    ("twa", ("twa",)),
    ("entry", ("pipeline", "cli", "__main__")),
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module under twa_scale/ (a package by its own name)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]  # twa_scale.a.b -> [twa_scale.a]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the twa_scale modules (and packages) it imports, anywhere in its source."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package that holds this module
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` too
            else:
                continue
            for target in names:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != PACKAGE:
                    targets.add(target)
        own = set(_ancestors(name)) | {name}
        for t in list(targets):
            targets.update(a for a in _ancestors(t) if a not in own)
        targets -= own
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest entry that names ``module`` or a package above it."""
    rel = module.removeprefix(PACKAGE + ".")
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (rel == entry or rel.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if None not in (layer_of(t), layer_of(mod)) and layer_of(t) > layer_of(mod):  # unplaced: see above
                out.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != PACKAGE and layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYERS in tests/test_layers.py (and docs/development.md): {unplaced}"


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    graph = {m: t for m, t in import_graph().items() if m != PACKAGE}
    bad = upward_imports(graph)
    assert not bad, "imports from a lower layer to a higher one:\n  " + "\n  ".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The graph sees a function-local import and a TYPE_CHECKING one, and both checks catch what they should."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from twa_scale import cli\n")
    (pkg / "cli.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import twa_scale.errors\n")
    graph = import_graph(tmp_path)
    assert graph[f"{PACKAGE}.errors"] == {f"{PACKAGE}.cli"} and graph[f"{PACKAGE}.cli"] == {f"{PACKAGE}.errors"}
    assert find_cycle(graph) in ([f"{PACKAGE}.cli", f"{PACKAGE}.errors", f"{PACKAGE}.cli"],
                                 [f"{PACKAGE}.errors", f"{PACKAGE}.cli", f"{PACKAGE}.errors"])
    assert upward_imports({f"{PACKAGE}.errors": {f"{PACKAGE}.cli"}}) == [
        f"{PACKAGE}.errors (base) imports {PACKAGE}.cli (entry)"]
