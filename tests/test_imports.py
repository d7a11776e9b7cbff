"""Imports among the project's modules run one way: a cycle means a name lives in the wrong file."""
import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the project (tests and virtual environments aside)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] == "tests" or any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, lazily or not, under TYPE_CHECKING or not (all count as edges)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}".strip(".") for alias in node.names}
    return {module for module in found if module in modules and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_project_has_no_import_cycle():
    graph = import_graph(REPO_ROOT)
    assert len(graph) > 20 and "sampling" in graph["sample"]  # the graph is really built
    assert find_cycle(graph) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_a_cycle_is_found_even_through_a_lazy_or_relative_import(tmp_path, lazy):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "low.py").write_text("def f():\n    import pkg.high\n" if lazy else "from pkg import high\n")
    (tmp_path / "pkg" / "high.py").write_text("from . import mid\n")
    (tmp_path / "pkg" / "mid.py").write_text("import low\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle[0] == cycle[-1] and set(cycle) == {"low", "pkg.high", "pkg.mid"}
    (tmp_path / "pkg" / "mid.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) == []
