"""The package's shape: no import circle among modeconn's modules, counting the imports inside
functions too (a lazy import hides a circle from the interpreter, not from a reader)."""

import ast
from pathlib import Path

from conftest import ROOT


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in (ROOT / "modeconn").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from modeconn.optim import muon` names the module muon; `from modeconn.optim import X` the package
                found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets.update(found or [node.module])
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle_in_modeconn():
    graph = import_graph()
    assert "modeconn.optim.newton_schulz" in graph["modeconn.optim.muon_exchange"]  # the graph is read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
