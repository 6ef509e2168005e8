"""The library's edges: no import cycle, a cheap `import nerd`, nothing that needs the repository around it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nerd

SRC = Path(nerd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the nerd modules it imports at module level (imports inside functions are lazy by design)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    assert "nerd.config" in graph and graph["nerd.models.nerd"]  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_lab():
    lab = {m for m in _imports() if m.startswith("nerd.lab")}
    for name, deps in _imports().items():
        if not name.startswith(("nerd.lab", "nerd.cli")):
            assert not deps & lab, f"{name} imports the lab: {deps & lab}"


def test_no_module_looks_for_the_repository_around_it():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "parents[" not in text and "REPO_ROOT" not in text, f"{path} resolves a repository layout"


def test_import_nerd_and_the_cli_parser_are_cheap():
    code = ("import sys, nerd, nerd.config, nerd.errors, nerd.sigma; from nerd.cli import build_parser; "
            "build_parser(); print(sorted(m for m in ('torch', 'numpy', 'skimage', 'safetensors') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_denoise_module_imports_without_torch():
    """`nerd.denoise` holds the typed result and the report line: reading them needs no torch (it loads on a solve)."""
    code = "import sys, nerd.denoise; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
