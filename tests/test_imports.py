"""The package's import graph has no cycle, and the library never reaches outside itself for code.

Read statically with `ast` (nothing is imported), so the test is fast and sees every import, at module level
or inside a function alike: an import moved into a function to dodge a cycle still counts.

How the graph is built (one node per module; a package is the node of its `__init__`, named by the package):
- `import bdsafety.a.b` and `from bdsafety.a import b` (b a submodule) give an edge to `bdsafety.a.b`;
  relative imports are resolved against the importing module's package first.
- `from bdsafety.a import name` where `name` is not a submodule: the edge goes to the module that defines
  `name`, following the re-exports of `a/__init__` (`from .factory import create_model` there sends
  `from bdsafety.a import create_model` to `bdsafety.a.factory`); a name `a/__init__` defines itself gives
  an edge to `bdsafety.a`.
- Importing `bdsafety.a.b` runs `bdsafety/a/__init__` first, so it is an edge to `bdsafety.a` too, except
  from inside `bdsafety.a`: a module's own enclosing packages are already being imported when it runs, so
  they are never edges (a package's `__init__` importing its submodules to register them is no cycle).
  An explicit import of a name its own package's `__init__` defines is an edge, so `pkg -> pkg.m -> pkg`
  is a cycle when `pkg/__init__` imports `m`.
- Imports under `if TYPE_CHECKING:` would count like any other (the package has none).
- `importlib.import_module(...)` with a computed name (the lazy API of `bdsafety/__init__`, the user's
  `--model-factory` module) is not an edge.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "bdsafety"
SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(src: Path, path: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def parse_package(src: Path, package: str) -> dict[str, tuple[Path, ast.Module]]:
    """Every module of `package` under `src`: its dotted name -> (path, syntax tree); parsed once per run."""
    return {module_name(src, path): (path, ast.parse(path.read_text(), str(path)))
            for path in sorted((src / package).rglob("*.py"))}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, its leading dots resolved against the importing module."""
    if node.level == 0:
        return node.module or ""
    here = name.split(".") if is_package(path) else name.split(".")[:-1]
    base = here[:len(here) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def defining_module(modules: dict, package: str, name: str, seen: frozenset = frozenset()) -> str:
    """The module that defines `name` as `package` exports it: a re-export in its `__init__` is followed."""
    if package not in modules or not is_package(modules[package][0]) or package in seen:
        return package
    for node in modules[package][1].body:
        if isinstance(node, ast.ImportFrom) and any((alias.asname or alias.name) == name for alias in node.names):
            source = absolute(package, modules[package][0], node)
            if f"{source}.{name}" in modules:
                return f"{source}.{name}"
            return defining_module(modules, source, name, seen | {package})
    return package


def imported_modules(modules: dict, name: str, path: Path, tree: ast.Module) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (before adding enclosing packages)."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = absolute(name, path, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    targets.add(f"{source}.{alias.name}")
                else:
                    targets.add(defining_module(modules, source, alias.name))
    return {target for target in targets if target in modules}


def with_packages(name: str, target: str) -> set[str]:
    """`target` and the packages whose `__init__` importing it runs, less `name`'s own enclosing packages
    (they are imported before `name` runs) unless `target` is one of them, named by the import itself."""
    parts = target.split(".")
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return (({".".join(parts[:i]) for i in range(1, len(parts))} - own) | {target}) - {name}


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (the rules in the module docstring)."""
    modules = parse_package(src, package)
    return {name: set().union(*(with_packages(name, target)
                                for target in imported_modules(modules, name, path, tree)))
            for name, (path, tree) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as its modules in order (the first repeated at the end), or None."""
    state: dict[str, str] = {}
    for start in sorted(graph):
        if start in state:
            continue
        state[start] = "open"
        stack = [(start, iter(sorted(graph[start])))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
            elif state.get(child) == "open":
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["bdsafety.cli"]  # the walk found the package and its imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def outside_reaches(tree: ast.Module) -> list[str]:
    """The lines of `tree` that import from benchmarks/ or touch sys.path, as `line: what`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "benchmarks"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if (node.module or "").split(".")[0] == "benchmarks":
                found.append(f"{node.lineno}: from {node.module} import")
            elif node.module == "sys" and any(alias.name == "path" for alias in node.names):
                found.append(f"{node.lineno}: from sys import path")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"{node.lineno}: sys.path")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_the_library_imports_no_benchmark_and_leaves_sys_path_alone():
    offences = [f"{name}:{where}" for name, (_, tree) in parse_package(SRC, PACKAGE).items()
                for where in outside_reaches(tree)]
    assert not offences, "\n".join(offences)
    assert outside_reaches(ast.parse("import sys\nsys.path.insert(0, '.')\nfrom benchmarks.bench import main")) == [
        "2: sys.path", "3: from benchmarks.bench import"]


def test_the_cycle_finder_names_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_and_re_exports_resolve_to_the_defining_module():
    graph = import_graph()
    assert "bdsafety.models._common" in graph["bdsafety.models"]  # `from ._common import MODELS, ...`
    assert "bdsafety.registry" in graph["bdsafety.models._common"]  # `from ..registry import Registry`
    assert "bdsafety.models" not in graph["bdsafety.models._common"]  # its own package: already importing


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_re_exports_are_followed_and_a_cycle_through_an_init_is_one(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import b\n",
        "pkg/a.py": "def f(): pass\n",
        "pkg/b.py": "from . import f\n",  # re-exported by pkg/__init__: the edge goes to pkg.a
        "pkg/sub/__init__.py": "from .c import g\n",
        "pkg/sub/c.py": "def g(): pass\n",
        "pkg/d.py": "def h():\n    from .sub.c import g\n",  # importing pkg.sub.c runs pkg/sub/__init__ first
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == set() and find_cycle(graph) is None
    cyclic = write_package(tmp_path / "cyclic", {
        "pkg/__init__.py": "from .a import f\nLIMIT = 1\n",
        "pkg/a.py": "def f():\n    from . import LIMIT\n",  # defined by pkg/__init__ itself, which imports a
    })
    assert find_cycle(import_graph(cyclic, "pkg")) == ["pkg", "pkg.a", "pkg"]
