"""The shape of the code, checked from its AST: no import cycles (function-level imports included),
layers that only look down, one place that starts processes, modules small enough to read."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "loradeploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """Every loradeploy module ``name`` imports at run time, wherever the import statement sits.
    Imports under ``if TYPE_CHECKING:`` never run, so they cannot form a cycle."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & MODULES.keys()
            out.update(subs)  # `from pkg import submodule` imports the submodule (pkg is its parent, loaded anyway)
            if len(subs) < len(node.names):
                out.add(mod)  # names defined in mod itself
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    # serving.worker imports its backend inside main(): the graph must see it
    assert "loradeploy.serving.backend" in GRAPH["loradeploy.serving.worker"]


def test_no_import_cycles():
    assert _cycles() == []


def _within(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


LOWER = ["loradeploy.serving", "loradeploy.tools", "loradeploy.llamacpp", "loradeploy.fetch", "loradeploy.merge",
         "loradeploy.gguf", "loradeploy.evaluation", "loradeploy.health", "loradeploy.testing", "loradeploy.lora",
         "loradeploy.verify", "loradeploy.quantize"]
UPPER = ["loradeploy.stages", "loradeploy.deploy", "loradeploy.cli", "loradeploy.pipeline"]


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_never_import_upper_ones(lower):
    bad = sorted((src, dst) for src, dsts in GRAPH.items() if _within(src, lower)
                 for dst in dsts if any(_within(dst, up) for up in UPPER))
    assert bad == []


def test_popen_only_in_tools_proc():
    users = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "Popen") or \
                    (isinstance(node, ast.alias) and node.name == "Popen"):
                users.append(name)
    assert set(users) == {"loradeploy.tools.proc"}


def test_modules_stay_small():
    big = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert big == {}


def test_stages_are_thin_adapters():
    fat = {p.name: n for p in (PKG / "stages").glob("*.py") if (n := len(p.read_text().splitlines())) >= 150}
    assert fat == {}
