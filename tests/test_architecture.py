"""The layering of fastenc, read from its import graph (every import, lazy ones inside functions included).

The layers and the data flow are described in fastenc/ARCHITECTURE.md; this test keeps that description true:
every import points down the layer table (LAYERS), no import cycles between modules, no module under eval/ or
analysis/ importing the engine (they read a run through fastenc.run), run-dir file names spelled only in
fastenc/run/layout.py, and no function over 80 lines unless a comment on the line above its `def` says why
(`# long: <reason>`).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fastenc")
MAX_FUNCTION_LINES = 80
# Bottom to top; a module may import from its own layer and the layers below it. fastenc/ARCHITECTURE.md says what
# each layer owns.
LAYERS = [
    ("fastenc", "fastenc.errors", "fastenc.utils", "fastenc.run.layout"),
    ("fastenc.models", "fastenc.losses", "fastenc.kernels"),
    ("fastenc.data",),
    ("fastenc.objectives",),
    ("fastenc.config",),
    ("fastenc.datatools",),
    ("fastenc.run",),
    ("fastenc.analysis",),
    ("fastenc.eval",),
    ("fastenc.engine",),
    ("fastenc.study",),
    ("fastenc.cli",),
]


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module in fastenc/."""
    mods = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), path) for name, path in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The fastenc module an import of `name` loads (a name inside a module resolves to that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {_resolve(f"{base}.{a.name}") or _resolve(base) for a in node.names}
    return out - {None, module}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "fastenc.run.layout" in GRAPH["fastenc.engine.trainer"]  # the parser sees top-level imports
    assert "fastenc.objectives" in GRAPH["fastenc.config"]  # ... and lazy ones inside functions
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _layer(module: str) -> int:
    """The index in LAYERS of the longest package prefix of `module`."""
    best = None
    for i, layer in enumerate(LAYERS):
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    assert best is not None, f"{module} is in no layer of LAYERS: add its package there (and to ARCHITECTURE.md)"
    return best[0]


def test_imports_point_down_the_layers():
    up = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m))
    assert up == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("reader", ["fastenc.eval", "fastenc.analysis"])
def test_readers_do_not_import_the_engine(reader):
    up = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith(reader)
                for t in targets if t.startswith("fastenc.engine"))
    assert up == [], "read runs through fastenc.run, not the engine"


def _strings(tree: ast.AST):
    """(line, text) of every string constant that is not documentation (a string statement: docstrings of modules,
    classes, functions and fields)."""
    docs = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_run_dir_file_names_live_in_the_layout_module():
    from fastenc.run import layout

    names = [layout.CONFIG, layout.FINGERPRINT, layout.METRICS, layout.LOSS_PLOT, layout.ENCODER, layout.OBJECTIVE]
    found = [f"{MODULES[m]}:{line}: {text!r}" for m, tree in TREES.items() if m != "fastenc.run.layout"
             for line, text in _strings(tree) if any(n in text for n in names)]
    assert found == [], "use fastenc.run.layout (RunDir) instead of spelling run-dir file names"


def test_functions_fit_on_a_screen():
    long = []
    for m, tree in TREES.items():
        lines = open(MODULES[m]).read().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith("# long:"):
                    long.append(f"{MODULES[m]}:{node.lineno} {node.name}: {size} lines")
    assert long == [], "split these, or say why above the def with `# long: ...`"


def test_the_architecture_doc_shows_these_layers():
    """fastenc/ARCHITECTURE.md's layer table lists LAYERS in the same order (so the doc stays true)."""
    import re

    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", open(os.path.join(PACKAGE, "ARCHITECTURE.md")).read(), re.M)
    documented = [set(re.findall(r"`(fastenc[\w.]*)`", packages)) for _, packages in rows]
    assert documented == [set(layer) - {"fastenc"} for layer in LAYERS]
