"""The package's import structure against docs/architecture.md: `pytest tests/test_architecture.py`.

The import graph is read from the source with `ast` (every `import` and `from ... import`,
module-level or inside a function, since a function-level import is still a dependency), so no
module is executed. Two rules:
- no cycle among kat_megatron's modules;
- every import goes from a room (a top-level subpackage or module) to a room of a lower layer,
  or stays inside its room; the layers are the table in docs/architecture.md's "Layers" block.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "kat_megatron"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kat_megatron modules `name` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("kat_megatron") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kat_megatron"


def _layers() -> dict[str, int]:
    """room -> layer number, from the fenced block after '## Layers' in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"## Layers\n.*?```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no '## Layers' section with a fenced table"
    layers: dict[str, int] = {}
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(.+?)\s*(#.*)?$", line)
        if m:
            for room in m.group(2).split():
                layers[room] = int(m.group(1))
    return layers


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _modules()} - {"kat_megatron"}
    layers = _layers()
    assert rooms - set(layers) == set(), "rooms missing from docs/architecture.md's Layers"
    assert set(layers) - rooms == set(), "Layers names a room that does not exist"


def test_imports_point_down_the_layers():
    layers = _layers()
    wrong = []
    for module, targets in sorted(_graph().items()):
        src = _room(module)
        for target in sorted(targets):
            dst = _room(target)
            if src == dst or "kat_megatron" in (src, dst):
                continue
            if layers[dst] >= layers[src]:
                wrong.append(f"{module} ({src}, layer {layers[src]}) imports {target} "
                             f"({dst}, layer {layers[dst]})")  # fmt: skip
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_graph_sees_function_level_imports():
    # stages.py imports its trainers inside functions; a graph of module-level imports only
    # would miss the arrow.
    assert "kat_megatron.rl.trainer" in _graph()["kat_megatron.stages"]
