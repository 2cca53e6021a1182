"""The package layout is a contract (docs/architecture.md): import rules and no cycles.

`make lint` runs import-linter's contracts from pyproject.toml; this test adds what those
contracts cannot say: no module imports, directly or through others, a module that imports it
back, and at most 10 modules sit directly in ``palate/``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

PKG = Path(__file__).resolve().parents[1] / "daemon" / "palate"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan), over module-to-module imports."""
    mods = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("palate")
    assert _cycles(graph) == []


def test_a_cycle_is_seen() -> None:
    """The cycle finder itself: two modules importing each other form one component."""
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 10, top
    assert not [p for p in PKG.rglob("*_extra.py")]


def test_every_subpackage_says_what_it_owns_and_must_not_import() -> None:
    for init in PKG.glob("*/__init__.py"):
        doc = init.read_text().split('"""')[1]
        assert "never" in doc.lower() or "nothing imports" in doc.lower(), init


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("evaluation/gate.py", "import mlx.core as mx\n"),
        ("model/losses.py", "import palate.store.database\n"),
        ("adapters/tabby.py", "import palate.model.scoring\n"),
    ],
)
def test_import_contracts_fail_when_broken(tmp_path: Path, module: str, line: str) -> None:
    """lint-imports really rejects a forbidden import (run on a copy of the package)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(PKG, tmp_path / "palate", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "palate" / module
    target.write_text(line + target.read_text())
    env_path = f"{tmp_path}"
    lint = Path(sys.executable).parent / "lint-imports"
    ok = subprocess.run(
        [str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert ok.returncode != 0, ok.stdout
    assert "BROKEN" in ok.stdout
