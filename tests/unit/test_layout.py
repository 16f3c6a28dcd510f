"""The package layout guards: no import circle, the lab stays behind its command, short modules.

Every module under `tracer/` is read with `ast` (nothing is imported), and every import is an
edge: top level and inside functions, absolute and relative, `import_module` with a literal,
and the module names a lazy-loading table hands to `import_module`. Importing `a.b.c` also runs
the `__init__` of `a.b`, so that package is an edge too (unless the importer lives inside it).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tracer"

MAX_LINES = 700
# The `lab` click command: the one lab module that code outside tracer/lab/ may import (the
# command group in tracer/cli/ registers it). If the command moves to tracer/cli/lab.py, that
# module is the command itself and may import the lab freely.
LAB_COMMAND = "tracer.lab.cli"
LAB_COMMAND_IN_CLI = "tracer.cli.lab"
CLICK_ALLOWED_PACKAGE = "tracer.cli"
CLICK_ALLOWED_MODULES = {LAB_COMMAND}


@dataclass(frozen=True)
class Import:
    importer: str        # dotted module doing the import
    target: str          # dotted module imported (tracer modules and third-party alike)
    line: int
    implicit: bool = False   # the __init__ of a package on the way to `target`

    def where(self, root: Path) -> str:
        return f"{module_path(root, self.importer)}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(root: Path, name: str) -> str:
    base = root.parent / Path(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return str(path.relative_to(root.parent))


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(root: Path, name: str, path: Path, known: set[str]) -> list[Import]:
    """Every module `name` imports, wherever in the file the import statement stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(name, is_package, node.level, node.module) if node.level
                    else node.module or "")
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, node.lineno))
            else:
                dynamic = True
    if dynamic:
        # the names a lazy table hands to import_module(variable): every string in the module
        # that names a tracer module exactly
        found += [(n.value, n.lineno) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known]
    edges: list[Import] = []
    own = set(_ancestors(name)) | {name}
    for target, line in found:
        edges.append(Import(name, target, line))
        edges += [Import(name, pkg, line, implicit=True) for pkg in _ancestors(target)
                  if pkg in known and pkg not in own]
    return edges


def _is_import_module(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in {"import_module", "__import__"}


def import_graph(root: Path) -> tuple[dict[str, Path], list[Import]]:
    mods = modules(root)
    known = set(mods)
    edges = [e for name, path in mods.items() for e in imports_of(root, name, path, known)]
    return mods, edges


def cycles(edges: list[Import], known: set[str]) -> list[list[Import]]:
    """One shortest circle through every module that sits on a circle, rotations merged."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        if e.target in known and e.target != e.importer:
            graph.setdefault(e.importer, {}).setdefault(e.target, e)
    found: dict[frozenset, list[Import]] = {}
    for start in sorted(graph):
        path = _shortest_path_back(graph, start)
        if path:
            found.setdefault(frozenset((e.importer, e.target) for e in path), path)
    return sorted(found.values(), key=lambda c: (len(c), c[0].importer))


def _shortest_path_back(graph: dict[str, dict[str, Import]], start: str) -> list[Import] | None:
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for mod in frontier:
            for target, edge in sorted(graph.get(mod, {}).items()):
                if target == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came[path[0].importer])
                    return path
                if target not in came:
                    came[target] = edge
                    nxt.append(target)
        frontier = nxt
    return None


def describe_cycle(root: Path, cycle: list[Import]) -> str:
    chain = " -> ".join([cycle[0].importer] + [e.target for e in cycle])
    where = ", ".join(f"{e.where(root)}{' (package __init__)' if e.implicit else ''}" for e in cycle)
    return f"{chain}   [{where}]"


def lab_leaks(root: Path, edges: list[Import]) -> list[str]:
    lab_pkg = f"{root.name}.lab"
    bad = []
    for e in edges:
        if e.implicit or not (e.target == lab_pkg or e.target.startswith(lab_pkg + ".")):
            continue
        if e.importer == lab_pkg or e.importer.startswith(lab_pkg + "."):
            continue
        if e.importer == LAB_COMMAND_IN_CLI:
            continue
        if e.target == LAB_COMMAND and _in_package(e.importer, CLICK_ALLOWED_PACKAGE):
            continue
        bad.append(f"{e.where(root)}: {e.importer} imports {e.target}")
    return sorted(set(bad))


def click_outside_cli(root: Path, edges: list[Import]) -> list[str]:
    return sorted({f"{e.where(root)}: {e.importer} imports {e.target}" for e in edges
                   if (e.target == "click" or e.target.startswith("click."))
                   and not _in_package(e.importer, CLICK_ALLOWED_PACKAGE)
                   and e.importer not in CLICK_ALLOWED_MODULES | {LAB_COMMAND_IN_CLI}})


def long_modules(root: Path) -> list[str]:
    return sorted(f"{p.relative_to(root.parent)}: {n} lines" for p in root.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# --------------------------------------------------------------------------------- the guards

@functools.cache
def tracer_graph() -> tuple[dict[str, Path], list[Import]]:
    return import_graph(PACKAGE)


def test_no_import_circle():
    mods, edges = tracer_graph()
    found = cycles(edges, set(mods))
    assert not found, f"{len(found)} import circle(s) between tracer modules:\n" + "\n".join(
        describe_cycle(PACKAGE, c) for c in found)


def test_lab_imported_only_by_its_command():
    _, edges = tracer_graph()
    bad = lab_leaks(PACKAGE, edges)
    assert not bad, ("tracer.lab imported outside tracer/lab/ (only the lab command, "
                     f"{LAB_COMMAND}, may be imported, by tracer/cli/):\n" + "\n".join(bad))


def test_no_module_longer_than_700_lines():
    bad = long_modules(PACKAGE)
    assert not bad, f"modules longer than {MAX_LINES} lines:\n" + "\n".join(bad)


def test_click_only_in_the_command_line():
    _, edges = tracer_graph()
    bad = click_outside_cli(PACKAGE, edges)
    assert not bad, "click imported outside tracer/cli/ and the lab command:\n" + "\n".join(bad)


def test_the_walk_sees_every_module():
    mods, edges = tracer_graph()
    assert {"tracer", "tracer.cli", "tracer.lab"} <= set(mods)
    importers = {e.importer for e in edges}
    # every module with an import statement shows up as an importer
    with_imports = {name for name, p in mods.items()
                    if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(p.read_text())))}
    assert with_imports <= importers


# ------------------------------------------------------ the walker itself, on a package it knows

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.fixture
def fake(tmp_path):
    """A package `tracer` shaped like the real one, with one of each fault."""
    return _write(tmp_path / "tracer", {
        "__init__.py": "",
        "cli/__init__.py": "from tracer.cli.main import main\n",
        "cli/main.py": ("import click\n"
                        "_LAZY = {'cap': ('tracer.runs.capture', 'capture')}\n"
                        "def _get(name):\n"
                        "    import importlib\n"
                        "    return importlib.import_module(_LAZY[name][0])\n"
                        "def _register():\n"
                        "    from tracer.lab.cli import lab\n"),
        "lab/__init__.py": "",
        "lab/cli.py": "import click\nfrom . import build\n",
        "lab/build.py": "from ..kernel import tc\n",
        "kernel/__init__.py": "",
        "kernel/tc.py": "def attach():\n    from tracer.node import ownership\n",
        "node/__init__.py": "",
        "node/ownership.py": "from tracer import tracefile\n",
        "tracefile.py": "def devices():\n    from tracer.lab.build import observed\n",
        "runs/__init__.py": "",
        "runs/capture.py": "import click\nfrom tracer.cli import main\n" + "x = 1\n" * 700,
    })


def test_walker_finds_function_level_relative_and_lazy_imports(fake):
    mods, edges = import_graph(fake)
    pairs = {(e.importer, e.target) for e in edges}
    assert ("tracer.kernel.tc", "tracer.node.ownership") in pairs          # inside a function
    assert ("tracer.lab.build", "tracer.kernel.tc") in pairs                 # relative, two dots
    assert ("tracer.lab.cli", "tracer.lab.build") in pairs                   # relative, one dot
    assert ("tracer.cli.main", "tracer.runs.capture") in pairs               # lazy table
    assert ("tracer.runs.capture", "tracer.cli") in pairs                    # package import


def test_walker_reports_each_fault(fake):
    mods, edges = import_graph(fake)
    found = [" -> ".join([c[0].importer] + [e.target for e in c]) for c in cycles(edges, set(mods))]
    assert "tracer.kernel.tc -> tracer.node.ownership -> tracer.tracefile -> tracer.lab.build -> tracer.kernel.tc" in {
        _rotate(c, "tracer.kernel.tc") for c in found}
    assert any("tracer.runs.capture" in c and "tracer.cli.main" in c for c in found)
    assert [b.split(": ", 1)[1] for b in lab_leaks(fake, edges)] == [
        "tracer.tracefile imports tracer.lab.build"]
    assert [b.split(": ", 1)[1] for b in click_outside_cli(fake, edges)] == [
        "tracer.runs.capture imports click"]
    assert long_modules(fake) == ["tracer/runs/capture.py: 702 lines"]


def test_walker_passes_a_clean_package(tmp_path):
    root = _write(tmp_path / "tracer", {
        "__init__.py": "",
        "cli/__init__.py": "import click\nfrom tracer.cli import lab\n",
        "cli/lab.py": "import click\nfrom tracer.lab import build\n",
        "lab/__init__.py": "",
        "lab/build.py": "from tracer.kernel import tc\n",
        "kernel/__init__.py": "",
        "kernel/tc.py": "import os\n",
    })
    mods, edges = import_graph(root)
    assert cycles(edges, set(mods)) == []
    assert lab_leaks(root, edges) == [] and click_outside_cli(root, edges) == []
    assert long_modules(root) == []


def _rotate(chain: str, start: str) -> str:
    names = chain.split(" -> ")[:-1]
    i = names.index(start) if start in names else 0
    names = names[i:] + names[:i]
    return " -> ".join(names + [names[0]])
