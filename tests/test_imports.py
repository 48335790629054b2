"""The package's import graph: no cycles, and the dependency directions DESIGN.md fixes.

Every `import` / `from ... import` in qvl/ counts, the ones inside functions too (a lazy import still
ties two modules together). Edges go to the module named (or to `pkg.name` when that is a submodule).
"""
from __future__ import annotations

import ast
from pathlib import Path

import qvl

ROOT = Path(qvl.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_is_read():
    g = _graph()
    assert "qvl.models.qwen2_vl.rope" in g["qvl.models.qwen2_vl.processing"]
    assert "qvl.engine.scheduler" in g["qvl.engine.llm_engine"]


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_models_never_import_engine_or_server():
    bad = [(m, t) for m, targets in _graph().items() if m.startswith("qvl.models")
           for t in targets if t.startswith(("qvl.engine", "qvl.server", "qvl.cli", "qvl.llm"))]
    assert not bad, f"models/ imports engine/server code: {bad}"


def test_scheduler_side_imports_no_torch():
    for mod in ("engine/scheduler.py", "engine/block_manager.py", "engine/sequence.py"):
        tree = ast.parse((ROOT / mod).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names, f"qvl/{mod} imports torch"
