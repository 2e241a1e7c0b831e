"""The import graph of ``src/odm_sr``: no cycles (function-level imports included: an import that dodges a cycle
by living in a function is still one) and no import from a lower layer to a higher one (``LAYERS``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of odm_sr (a package by its ``__init__.py``)."""
    found = {}
    for path in (SRC / "odm_sr").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The odm_sr modules that ``name`` imports anywhere in its file (``from .x import y``: ``x.y`` where that is
    a module, else ``x``); a package's own ``__init__`` is not counted as a dependency of its submodules."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    deps = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return deps


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_through_three_modules_and_none_in_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "odm_sr"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from .quant import base\n")
    (pkg / "quant" / "__init__.py").write_text("from .base import Bits\n")
    (pkg / "quant" / "base.py").write_text("from odm_sr.config import f\n")
    known = {"odm_sr": pkg / "__init__.py", "odm_sr.config": pkg / "config.py",
             "odm_sr.quant": pkg / "quant" / "__init__.py", "odm_sr.quant.base": pkg / "quant" / "base.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph["odm_sr.config"] == {"odm_sr.quant", "odm_sr.quant.base"}
    assert graph["odm_sr.quant"] == {"odm_sr.quant.base"}
    assert cycles(graph) == [["odm_sr.config", "odm_sr.quant", "odm_sr.quant.base"]]


def test_odm_sr_has_no_import_cycle():
    graph = import_graph()
    assert "odm_sr.quant.base" in graph and "odm_sr.config" in graph["odm_sr.train"]
    assert cycles(graph) == []


# The layers of odm_sr, lowest first: a module imports from its own layer or below, never above (a module's layer
# is that of its longest listed prefix).
LAYERS = (
    ("odm_sr", "odm_sr.checks", "odm_sr.files", "odm_sr.console", "odm_sr.precision", "odm_sr.metrics",
     "odm_sr.inference"),
    ("odm_sr.config", "odm_sr.stored_config"),  # config plumbing; a config read from a file checked
    ("odm_sr.models", "odm_sr.data"),  # backbones and data know no quantization
    ("odm_sr.quant",),
    ("odm_sr.builders", "odm_sr.trained", "odm_sr.resume", "odm_sr.evaluation", "odm_sr.lit_module",
     "odm_sr.callbacks"),  # objects built from a config, the LightningModule, evaluation
    ("odm_sr.analysis", "odm_sr.export"),
    # the command-line entry points and what they run (train's analyze.after_fit runs odm-sr-analyze in-process)
    ("odm_sr.cli", "odm_sr.train", "odm_sr.eval", "odm_sr.upscale"),
)


def layer(module: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: in no layer of LAYERS (add it)"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def test_layer_is_the_longest_prefix():
    assert layer("odm_sr.cli.analyze") == 6 and layer("odm_sr.analysis.complexity") == 5
    assert layer("odm_sr.quant.odm") == 3 and layer("odm_sr.config") == 1 and layer("odm_sr") == 0
    graph = {"odm_sr.models.x": {"odm_sr.quant.y", "odm_sr.checks"}}
    assert upward_imports(graph) == ["odm_sr.models.x -> odm_sr.quant.y"]


def test_no_import_points_to_a_higher_layer():
    graph = import_graph()
    assert graph["odm_sr.config"] <= {"odm_sr.checks"}  # config imports nothing above checks
    assert upward_imports(graph) == []
