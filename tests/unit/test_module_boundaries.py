"""The package's module boundaries, checked from the source text (nothing is imported).

1. The import graph of `collapse_jax` has no cycle. Every import statement counts, wherever it
   sits: at the top, inside a function, or under `if TYPE_CHECKING:` (a function-level import
   only hides a circle until the function runs).
2. No module imports another module's private (`_x`) name, neither `from m import _x` nor
   `m._x` on a module bound by an import; nor does any file of tests/ or benchmarks/ (they use
   the package's public names: a seam a test or benchmark needs is promoted), and no benchmark
   script imports another script (shared code lives in `collapse_jax.bench`).
3. Imports sit at the top of the module (ruff's PLC0415), except the optional heavy dependencies
   that pyproject.toml lists under `banned-module-level-imports` (ruff's TID253 allow-list).

Each failure names the file and line of every offending import.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import pathlib
import subprocess
import sys

# The repository root: the first folder above this file with a pyproject.toml (tests move).
REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PACKAGE = "collapse_jax"
ROOT = REPO / PACKAGE


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import statement of `source` that loads the module `target`."""

    source: str
    target: str
    path: pathlib.Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    assert (ROOT / "__init__.py").is_file(), f"no package at {ROOT}"
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


@functools.cache
def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by a `from ... import` (resolving leading dots)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module) -> list[tuple[ast.AST, str, str | None]]:
    """(node, imported module, imported name or None) of every import in `module` (parsed as
    `tree`) of our own modules; `from pkg import sub` names the submodule when `sub` is one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((node, alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    found.append((node, sub, None))
                else:
                    found.append((node, base, alias.name))
    return found


def import_graph() -> dict[str, list[Edge]]:
    """Module -> the edges to the modules it imports (our own modules only)."""
    graph: dict[str, list[Edge]] = {m: [] for m in MODULES}
    for module in MODULES:
        for node, target, _ in _imports(module, _parse(module)):
            if target not in MODULES:
                raise AssertionError(
                    f"{MODULES[module].relative_to(REPO)}:{node.lineno}: imports {target}, "
                    "which is not a module of the package"
                )
            if target != module:
                graph[module].append(Edge(module, target, MODULES[module], node.lineno))
    return graph


def _strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_in(component: list[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """One shortest cycle through the first module of a strongly connected component."""
    start, members = component[0], set(component)
    parent: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.target == start:
                    cycle = [e]
                    while cycle[0].source != start:
                        cycle.insert(0, parent[cycle[0].source])
                    return cycle
                if e.target in members and e.target not in parent:
                    parent[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a component


def test_graph_resolves_relative_and_function_level_imports():
    """The walker sees what the checks below rely on: a function-level import and a package
    import (`from collapse_jax import config`) both become edges to the right module."""
    graph = import_graph()
    assert {e.target for e in graph["collapse_jax.cli"]} >= {"collapse_jax.config"}
    mod = ast.parse("from . import opt\nfrom .. import config\nfrom .data import x\n")
    resolved = [_absolute("collapse_jax.lm.train", n) for n in mod.body]
    assert resolved == ["collapse_jax.lm", "collapse_jax", "collapse_jax.lm.data"]


def test_cycle_check_finds_a_planted_cycle():
    """a -> b -> c -> a (and c -> d, outside the cycle) is found, with every import's line."""
    here = pathlib.Path(__file__)
    graph = {
        "a": [Edge("a", "b", here, 1)],
        "b": [Edge("b", "c", here, 2)],
        "c": [Edge("c", "a", here, 3), Edge("c", "d", here, 4)],
        "d": [],
    }
    [component] = _strongly_connected(graph)
    assert component == ["a", "b", "c"]
    assert [(e.source, e.target, e.line) for e in _cycle_in(component, graph)] == [
        ("a", "b", 1),
        ("b", "c", 2),
        ("c", "a", 3),
    ]


def test_no_import_cycle():
    graph = import_graph()
    problems = []
    for component in _strongly_connected(graph):
        cycle = _cycle_in(component, graph)
        chain = " -> ".join([cycle[0].source] + [e.target for e in cycle])
        steps = "".join(f"\n    {e.where()}: {e.source} imports {e.target}" for e in cycle)
        problems.append(f"import cycle {chain} (component: {', '.join(component)}){steps}")
    assert not problems, "\n".join(problems)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, "module._name") of every private name of another of our modules that `module`
    (parsed as `tree`) imports or reads as an attribute of a module it imported."""
    found = []
    bound = {}  # local name -> the module of ours it is bound to
    for node, target, name in _imports(module, tree):
        if name is not None and _private(name):
            found.append((node.lineno, f"{target}.{name}"))
        if name is None:
            for alias in node.names:
                if isinstance(node, ast.Import) and alias.asname is None:
                    continue  # `import a.b` binds `a`: `a.b._x` is read as a dotted path below
                if target == alias.name or target.endswith(f".{alias.name}"):
                    bound[alias.asname or alias.name] = target
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        dotted, value = [], node.value
        while isinstance(value, ast.Attribute):
            dotted.insert(0, value.attr)
            value = value.value
        if not isinstance(value, ast.Name):
            continue
        target = ".".join([bound.get(value.id, value.id), *dotted])
        if target in MODULES and target != module:
            found.append((node.lineno, f"{target}.{node.attr}"))
    return found


def test_private_check_sees_every_form():
    """A planted module with each way of reaching a private name: every one is reported."""
    tree = ast.parse(
        "import collapse_jax.lm.data\n"
        "import collapse_jax.lm.train as t\n"
        "from collapse_jax import config as config_lib, lm\n"
        "from collapse_jax.lm.steps import token_nll, _hidden\n"
        "def f():\n"
        "    from collapse_jax.lm import opt\n"
        "    return config_lib._import, t._x, collapse_jax.lm.data._y, opt._z, t.fit\n"
        "lm.search._w\n"
    )
    assert sorted(_private_uses("collapse_jax.cli", tree)) == [
        (4, "collapse_jax.lm.steps._hidden"),
        (7, "collapse_jax.config._import"),
        (7, "collapse_jax.lm.data._y"),
        (7, "collapse_jax.lm.opt._z"),
        (7, "collapse_jax.lm.train._x"),
        (8, "collapse_jax.lm.search._w"),
    ]


def test_no_private_names_across_modules():
    problems = [
        f"{path.relative_to(REPO)}:{line}: uses {name}"
        for module, path in MODULES.items()
        for line, name in _private_uses(module, _parse(module))
    ]
    assert not problems, "private names of other modules:\n" + "\n".join(problems)


# Private names tests/ or benchmarks/ may still reach: (file, "module._name") -> why.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}


def _outside_files() -> list[pathlib.Path]:
    return sorted(p for d in ("tests", "benchmarks") for p in (REPO / d).rglob("*.py"))


def test_tests_and_benchmarks_use_public_names():
    problems = []
    for path in _outside_files():
        rel = path.relative_to(REPO)
        module = ".".join(rel.with_suffix("").parts)
        for line, name in _private_uses(module, ast.parse(path.read_text(), filename=str(path))):
            if (rel.as_posix(), name) not in ALLOWED_PRIVATE:
                problems.append(f"{rel}:{line}: uses {name}")
    assert not problems, "private names of the package:\n" + "\n".join(problems)


def test_benchmark_scripts_do_not_import_each_other():
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    problems = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in scripts or name == "benchmarks":
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {name}")
    assert not problems, "benchmark scripts importing scripts:\n" + "\n".join(problems)


def test_imports_at_top_level():
    """ruff PLC0415 (import outside top level), with TID253's list of the optional heavy
    dependencies (pyproject.toml) as the only imports a function may hold."""
    spec = importlib.util.find_spec("ruff")
    assert spec is not None, "ruff is missing: pip install -e '.[test]'"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--select",
            "PLC0415,TID253",
            "--output-format",
            "concise",
            PACKAGE,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"imports outside the top level:\n{out.stdout}{out.stderr}"
