"""The import graph, read from the source: no circles, and no room imports what ARCHITECTURE.md forbids.

The rules are not written here: they are the "Import rules" table of docs/ARCHITECTURE.md, parsed by
this test, so the design doc and the check cannot drift apart. Imports are read with `ast` from every
module of every room (pyproject's package-dir says which folder is which room), including imports
inside functions: a lazy import is still a dependency, it only moves the cost.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "eyecare_edge"


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (resolved; the longest project module prefix for our own names)
    line: int
    lazy: bool  # inside a function (not run at import time)


@dataclass(frozen=True)
class Rule:
    room: str  # module prefix
    never: tuple[str, ...]  # not anywhere in the room's code
    not_at_import: tuple[str, ...]  # not at module level (inside functions allowed)


def _package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject (the rooms are top-level folders mapped into one namespace)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / folder for name, folder in cfg.get("package-dir", {}).items()}
    dirs.setdefault(PACKAGE, ROOT / PACKAGE)
    return dirs


def project_modules() -> dict[str, Path]:
    """Every module of the distribution by dotted name, read from the folders pyproject maps."""
    modules: dict[str, Path] = {}
    for pkg, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            modules[".".join([pkg, *(p for p in rel.parts if p != "__init__")])] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of `name` that is a project module (or `name`'s top level if external)."""
    if not name.startswith(PACKAGE):
        return name.split(".")[0]
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return name


def read_imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: never executed
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, _resolve(alias.name, modules), child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, is_pkg, child)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    target = _resolve(full, modules) if full in modules else _resolve(base, modules)
                    found.append(Import(module, target, child.lineno, lazy))
            visit(child, child_lazy)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in sorted(modules.items()) for imp in read_imports(name, path, modules)]


def read_rules(doc: Path = ROOT / "docs" / "ARCHITECTURE.md") -> list[Rule]:
    """The "Import rules" table of ARCHITECTURE.md: | room | never imports | not at import time |."""
    text = doc.read_text()
    m = re.search(r"^## Import rules.*?\n(\|.*?)(?:\n\n|\Z)", text, re.S | re.M)
    assert m, f"{doc}: no '## Import rules' table"
    rules = []
    for row in m.group(1).splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        room, never, lazy_only = [*cells, "", ""][:3]
        ticks = lambda s: tuple(re.findall(r"`([^`]+)`", s))  # noqa: E731
        for prefix in ticks(room):
            rules.append(Rule(prefix, ticks(never), ticks(lazy_only)))
    assert rules, f"{doc}: the 'Import rules' table has no rows"
    return rules


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(module: str, rules: list[Rule]) -> Rule | None:
    matching = [r for r in rules if _within(module, r.room)]
    return max(matching, key=lambda r: len(r.room)) if matching else None


def violations(imports: list[Import], rules: list[Rule]) -> list[str]:
    out = []
    for imp in imports:
        rule = rule_for(imp.source, rules)
        if rule is None:
            continue
        banned = [p for p in rule.never if _within(imp.target, p)]
        if not imp.lazy:
            banned += [p for p in rule.not_at_import if _within(imp.target, p)]
        # a room may always import itself (a rule banning a parent room does not ban the room's own code)
        banned = [p for p in banned if not _within(imp.target, rule.room)]
        for p in banned:
            where = "inside a function" if imp.lazy else "at import time"
            out.append(f"{imp.source}:{imp.line} imports {imp.target} {where} (room {rule.room} forbids {p})")
    return out


def circles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's imports of its own
    sub-modules (re-exports in __init__) are structure, not a dependency, and are left out."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source and not _within(imp.target, imp.source):
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_no_import_circles():
    modules = set(project_modules())
    found = circles(all_imports(), modules)
    assert not found, "import circles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_room_imports_what_architecture_forbids():
    bad = violations(all_imports(), read_rules())
    assert not bad, "imports ARCHITECTURE.md's 'Import rules' forbid:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_room():
    rules = read_rules()
    homeless = sorted(m for m in project_modules() if rule_for(m, rules) is None)
    assert not homeless, f"modules no row of the 'Import rules' table covers: {homeless}"


# The checker itself must be able to fail: a fake tree with a circle and a forbidden import.
def test_checker_finds_a_circle_and_a_forbidden_import():
    imports = [
        Import("eyecare_edge.a", "eyecare_edge.b", 1, True),
        Import("eyecare_edge.b", "eyecare_edge.a", 1, False),
        Import("eyecare_edge.c", "torch", 3, True),
        Import("eyecare_edge.commands.x", "eyecare_edge.training.model", 5, False),
        Import("eyecare_edge.commands.y", "eyecare_edge.training.model", 5, True),
        Import("eyecare_edge.pkg", "eyecare_edge.pkg.sub", 1, False),
        Import("eyecare_edge.pkg.sub", "eyecare_edge.pkg", 1, False),
    ]
    mods = {"eyecare_edge.a", "eyecare_edge.b", "eyecare_edge.c", "eyecare_edge.pkg", "eyecare_edge.pkg.sub"}
    assert circles(imports, mods) == [["eyecare_edge.a", "eyecare_edge.b"]]
    rules = [
        Rule("eyecare_edge", ("torch", "eyecare_edge.training"), ()),
        Rule("eyecare_edge.commands", (), ("eyecare_edge.training",)),
    ]
    bad = violations(imports, rules)
    assert len(bad) == 2, bad
    assert "eyecare_edge.c:3 imports torch inside a function" in bad[0]
    assert "eyecare_edge.commands.x:5" in bad[1]


@pytest.mark.parametrize("room", ["eyecare_edge", "eyecare_edge.commands", "eyecare_edge.training"])
def test_rules_table_names_the_main_rooms(room):
    assert any(r.room == room for r in read_rules())
