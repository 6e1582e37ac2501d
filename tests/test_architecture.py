"""The package's shape holds: no import circles, and nothing imports upward.

Floors, lowest first: the core (qwen3_mlx/*.py), the wings (cpu/, parallel/, quantize/), the front
ends (cli/, server/, mcp/). A module may import its own floor and the floors below it, except
through the documented seams: the model asks cpu/ for its kernels (model, rope, loading and
model_facts import cpu/), the package's __init__ preloads the system BLAS before mlx loads, and
`python -m qwen3_mlx` starts the CLI. Every import that runs counts, module-level or inside a
function; those under `if TYPE_CHECKING:` (annotations only) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONT_ENDS = ("qwen3_mlx.cli", "qwen3_mlx.server", "qwen3_mlx.mcp")
WINGS = ("qwen3_mlx.cpu", "qwen3_mlx.parallel", "qwen3_mlx.quantize")
SEAMS = {
    "qwen3_mlx": {"qwen3_mlx.cpu"},
    "qwen3_mlx.__main__": {"qwen3_mlx.cli"},
    "qwen3_mlx.model": {"qwen3_mlx.cpu"},
    "qwen3_mlx.rope": {"qwen3_mlx.cpu"},
    "qwen3_mlx.loading": {"qwen3_mlx.cpu"},
    "qwen3_mlx.model_facts": {"qwen3_mlx.cpu"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "quantize":  # installed as qwen3_mlx.quantize (setup.py's package_dir)
        parts.insert(0, "qwen3_mlx")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never run)."""
    found: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, anywhere in its body."""
    files = [*(REPO / "qwen3_mlx").rglob("*.py"), *(REPO / "quantize").rglob("*.py")]
    modules = {_module_name(path): path for path in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*stem, base] if base else stem)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _floor(name: str) -> int:
    if name.startswith(FRONT_ENDS):
        return 2
    return 1 if name.startswith(WINGS) else 0


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert _circles(import_graph()) == []


def test_nothing_imports_upward_except_through_the_seams():
    upward = []
    for name, targets in import_graph().items():
        for target in targets:
            allowed = any(target.startswith(seam) for seam in SEAMS.get(name, ()))
            if _floor(target) > _floor(name) and not allowed:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "qwen3_mlx.server.app" not in graph["qwen3_mlx.server.guard"]  # TYPE_CHECKING only
    assert "qwen3_mlx.parallel.shard_loading" in graph["qwen3_mlx.parallel.distributed"]
    assert "qwen3_mlx.cpu.native" in graph["qwen3_mlx.cpu.ops"]
    assert "qwen3_mlx.quantize.convert" in graph["qwen3_mlx.quantize"]
