"""The package's import graph: no cycles among foam_hf's modules, and the optimizer core free of the trainers.

Read from the source (``ast``), module-level imports only: an import inside a function is a deliberate lazy
edge (Triton, the tools) and does not run when the module loads.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import foam_hf

ROOT = Path(foam_hf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level_imports(path: Path) -> set[str]:
    """foam_hf modules that ``path`` imports when it loads."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and not _is_type_checking(node):
            body += node.body + node.orelse
        elif isinstance(node, ast.Try):
            body += node.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("foam_hf")}
        elif isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else (node.module or "")
            )
            if not base.startswith("foam_hf"):
                continue
            for alias in node.names:  # `from . import x` names a module; `from .m import f` the module m
                candidate = f"{base}.{alias.name}"
                found.add(
                    candidate if (ROOT.parent / Path(*candidate.split("."))).with_suffix(".py").exists() else base
                )
    return {m for m in found if m != name}


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in module_level_imports(path) if m in modules} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_foam_hf_has_no_import_cycles():
    graph = import_graph()
    assert "foam_hf.optim" in graph and "foam_hf.functional" in graph["foam_hf.optim"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_optimizer_core_imports_no_trainer_code():
    graph = import_graph()
    reachable, todo = set(), ["foam_hf.optim"]
    while todo:
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo += graph[module]
    assert not {m for m in reachable if m.startswith("foam_hf.integration")}, sorted(reachable)
    for module in reachable:
        source = (ROOT.parent / Path(*module.split("."))).with_suffix(".py")
        if not source.exists():
            source = source.with_suffix("") / "__init__.py"
        top = {
            (n.module or "").split(".")[0]
            for n in ast.parse(source.read_text()).body
            if isinstance(n, ast.ImportFrom) and not n.level
        } | {
            a.name.split(".")[0]
            for n in ast.parse(source.read_text()).body
            if isinstance(n, ast.Import)
            for a in n.names
        }
        assert not top & {"transformers", "trl", "peft", "accelerate", "deepspeed"}, (module, top)


# The modules that only forward old import paths to the tools (and the ``python -m foam_hf`` entry).
FORWARDERS = {"foam_hf.cli", "foam_hf.__main__"}


def test_the_library_core_never_imports_a_tool():
    graph = import_graph()
    assert "foam_hf.tools.cli" in graph, sorted(graph)  # the checker sees the tools package
    core = {m for m in graph if not m.startswith("foam_hf.tools") and m not in FORWARDERS}
    offenders = {m: sorted(t for t in graph[m] if t.startswith("foam_hf.tools")) for m in core}
    assert not {m: t for m, t in offenders.items() if t}, offenders
