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


# The served state has one writer per file: the registry (servers.json) is written by serving.record only
# (its update / change_model are the one way to change it); a proxy's two files (proxy.json, control.json)
# by serving.proxying only, through control.save_proxy_conf / save_control.
FILE_OWNERS = {"servers.json": "loradeploy.serving.record", "proxy.json": "loradeploy.serving.proxying",
               "control.json": "loradeploy.serving.proxying"}
WRITER_OWNERS = {"save_control": "loradeploy.serving.proxying", "save_proxy_conf": "loradeploy.serving.proxying",
                 "registry_path": "loradeploy.serving.record", "to_dict": "loradeploy.serving.record"}
RAW_WRITES = {"atomic_write_text", "write_text", "write_bytes", "atomic_output", "dump", "open", "save_control",
              "save_proxy_conf", "write_private"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _called(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _state_writes(name: str, source: str) -> list[str]:
    tree = ast.parse(source)
    docs, bad = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            bad += [f"{name} names {f}" for f, owner in FILE_OWNERS.items() if f in node.value and name != owner]
        elif isinstance(node, ast.Call):
            fn = _called(node)
            if fn in WRITER_OWNERS and name != WRITER_OWNERS[fn] and fn != "to_dict":
                bad.append(f"{name} calls {fn}")
            elif fn in RAW_WRITES and name not in FILE_OWNERS.values():
                args = " ".join(ast.unparse(a) for a in [*node.args, *(k.value for k in node.keywords)])
                if any(w in args for w in ("registry_path(", "control_path(", "conf_path(cfg", "servers.json")):
                    bad.append(f"{name} writes served state: {ast.unparse(node)[:80]}")
    return bad


def test_served_state_has_one_writer():
    bad = [b for name, path in MODULES.items() for b in _state_writes(name, path.read_text())]
    assert bad == []


def test_the_one_writer_check_sees_a_stray_write():
    stray = ("from .record import registry_path\n"
             "def f(cfg):\n    atomic_write_text(registry_path(cfg), '{}')\n"
             "def g(c, p):\n    save_control(c, p)\n"
             "X = 'control.json'\n")
    assert len(_state_writes("loradeploy.serving.switch", stray)) == 4
