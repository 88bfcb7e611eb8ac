"""The package's shape: no import cycles (module-level or inside functions), imports that only go downwards, a thin
callback. Reference: the import statements themselves, read with ``ast``."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lightning_mia"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_modules_import_each_other():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of behaviour: drop those edges
    pruned = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    assert _cycles(pruned) == []


@pytest.mark.parametrize("lower, upper", [
    ("lightning_mia.report", "lightning_mia.callbacks"),
    ("lightning_mia.auditor", "lightning_mia.callbacks"),
    ("lightning_mia.protocols", "lightning_mia.callbacks"),
    ("lightning_mia.cli", "lightning_mia.commands"),
    ("lightning_mia.study", "lightning_mia.commands"),
    ("lightning_mia.features", "lightning_mia.extraction"),
    ("lightning_mia.metrics", "lightning_mia.attacks"),
])
def test_imports_go_downwards(lower, upper):
    graph = _graph()
    bad = sorted((m, t) for m, ts in graph.items() if m == lower or m.startswith(lower + ".")
                 for t in ts if t == upper or t.startswith(upper + "."))
    assert bad == []


def test_the_callback_is_thin():
    assert len((PKG / "callbacks" / "monitor.py").read_text().splitlines()) <= 330  # about 300 (the issue-12 core), plus the options later issues added


def test_monitor_help_names_every_feature_and_attack():
    """``lightning-mia fit --help`` shows the monitor's docstring: it must name every registered choice."""
    from lightning_mia.attacks import ATTACKS
    from lightning_mia.callbacks import MembershipInferenceMonitor
    from lightning_mia.features import FEATURES

    doc = " ".join(MembershipInferenceMonitor.__doc__.split())
    for name in list(FEATURES) + list(ATTACKS):
        assert name in doc, name
