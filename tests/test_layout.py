"""Architecture tests: the package's layers, import cycles and which modules may touch the tools.

Layers, lowest first (a module imports only modules of lower layers, or of its own package):

    0 results, errors, schema   (leaf modules; schema builds on errors)
    1 image   2 models   3 io   4 data   5 paper, improved   6 analysis
    7 config, project   8 mlops   9 cli

The layer rule counts every import, also those inside functions (they run as surely, only later).
The cycle check counts module-level imports only (function-level imports are how a cycle is legally
broken), and ignores a module's own parent packages (always imported first, never a real cycle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from stm_defects.mlops.dag import PACKAGE, _imports, _module_file, package_dir

LAYERS = {
    "results": 0, "errors": 0, "schema": 0,
    "image": 1, "models": 2, "io": 3, "data": 4, "paper": 5, "improved": 5, "analysis": 6,
    "config": 7, "project": 7, "mlops": 8, "cli": 9,
}
# The leaf modules of layer 0 form one group: schema may raise errors' ConfigError.
GROUP = {"results": "core", "errors": "core", "schema": "core"}
LIBRARY_TOP = 6                     # layers 0..6 are the library (below config)
TOOLS = ("mlflow", "dvc", "typer", "great_expectations")
TOOL_EXCEPTIONS = {f"{PACKAGE}.data.validate": {"great_expectations"}}


def all_modules() -> list[str]:
    out = []
    for f in sorted(package_dir().rglob("*.py")):
        parts = list(f.relative_to(package_dir().parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


MODULES = all_modules()
LIBRARY = [m for m in MODULES if m != PACKAGE and LAYERS.get(m.split(".")[1], 99) <= LIBRARY_TOP]


def top(module: str) -> str | None:
    """The first-level part of a package module (`stm_defects.paper.masks` -> `paper`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def group(module: str) -> str | None:
    t = top(module)
    return GROUP.get(t, t)


def _tree(module: str) -> ast.Module:
    path = _module_file(module)
    return ast.parse(path.read_text(), str(path))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = _module_file(module).name == "__init__.py"
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_module(name: str) -> str | None:
    """The longest prefix of `name` that is a module of the package (None for other packages)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")
    while parts and _module_file(".".join(parts)) is None:
        parts.pop()
    return ".".join(parts) if parts else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(module: str) -> set[str]:
    """Package modules `module` imports when it is imported: not inside functions, not under
    `if TYPE_CHECKING:`; each with the packages above it (importing a.b.c runs a/b/__init__)."""
    found: set[str] = set()

    def visit(stmts) -> None:
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                stem = _resolve(module, node)
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []) or [])
                continue
            for n in names:
                m = _package_module(n)
                if m:
                    parts = m.split(".")
                    found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    visit(_tree(module).body)
    own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return found - own_parents - {module}


def external_imports(module: str) -> set[str]:
    """Top-level names of the non-package modules `module` imports anywhere (functions included)."""
    out: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {PACKAGE}


def string_constants(module: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals in `module`'s code, docstrings left out."""
    tree = _tree(module)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


# ----------------------------------------------------------------------------------- sanity
def test_every_module_has_a_layer():
    tops = {top(m) for m in MODULES if m != PACKAGE}
    assert tops <= set(LAYERS), f"modules outside the layer table: {sorted(tops - set(LAYERS))}"
    assert len(MODULES) > 40 and f"{PACKAGE}.cli" in MODULES and f"{PACKAGE}.mlops.stages.data" in MODULES


def test_the_helpers_see_imports():
    """The walkers above find what they must (guards against a test that passes vacuously)."""
    assert f"{PACKAGE}.results" in module_level_imports(f"{PACKAGE}.paper.method")
    assert f"{PACKAGE}.analysis.dispatch" not in module_level_imports(f"{PACKAGE}.config")  # in a function
    assert f"{PACKAGE}.analysis.dispatch" in _imports(f"{PACKAGE}.config")
    assert "great_expectations" in external_imports(f"{PACKAGE}.data.validate")             # in a function
    assert "typer" in external_imports(f"{PACKAGE}.cli")
    assert (0, "params.yaml") in [(0, s) for _, s in string_constants(f"{PACKAGE}.config")]
    assert not any("params.yaml" in s for _, s in string_constants(f"{PACKAGE}.schema"))    # docstring only


# ----------------------------------------------------------------------------------- layers
def layer_violations() -> list[str]:
    bad = []
    for m in MODULES:
        if m == PACKAGE:
            continue
        for imp in sorted(_imports(m)):
            if imp == PACKAGE or group(imp) == group(m):
                continue
            if LAYERS[top(imp)] >= LAYERS[top(m)]:
                bad.append(f"{m} (layer {LAYERS[top(m)]}) imports {imp} (layer {LAYERS[top(imp)]})")
    return bad


def test_modules_import_only_downwards():
    bad = layer_violations()
    assert not bad, "imports that go up or sideways in the layer order:\n  " + "\n  ".join(bad)


def test_the_two_methods_do_not_import_each_other():
    for m in MODULES:
        if top(m) in ("paper", "improved"):
            other = "improved" if top(m) == "paper" else "paper"
            assert not {i for i in _imports(m) if top(i) == other}, f"{m} imports the {other} method"


def test_results_is_a_leaf():
    for leaf in ("results", "errors"):
        assert _imports(f"{PACKAGE}.{leaf}") == set(), f"{leaf} must import nothing of the package"


# ----------------------------------------------------------------------------------- cycles
def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop): Tarjan."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycles():
    graph = {m: module_level_imports(m) for m in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------ tools
@pytest.mark.parametrize("module", LIBRARY)
def test_library_modules_do_not_import_the_tools(module):
    allowed = TOOL_EXCEPTIONS.get(module, set())
    used = {t for t in TOOLS if t in external_imports(module)} - allowed
    assert not used, f"{module} (a library module, layer <= {LIBRARY_TOP}) imports {sorted(used)}"


PARAMS_READERS = ("load_params", "load_raw", "params_path")      # config / project: what reads the file


@pytest.mark.parametrize("module", LIBRARY)
def test_library_modules_do_not_read_params_yaml(module):
    """No file name params.yaml in code (docstrings and comments may mention it), no YAML reader,
    no call of the functions that find and read it."""
    hits = [f"line {n}: {s!r}" for n, s in string_constants(module)
            if re.fullmatch(r"[\w./{}-]*params\.ya?ml", s.strip())]
    hits += [f"imports {name}" for name in ("yaml", "ruamel") if name in external_imports(module)]
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in PARAMS_READERS:
                hits.append(f"line {node.lineno}: calls {name}()")
    assert not hits, f"{module} reads params.yaml: " + "; ".join(hits)


def test_library_is_the_expected_set():
    tops = {top(m) for m in LIBRARY}
    assert tops == {"results", "errors", "schema", "image", "models", "io", "data", "paper", "improved",
                    "analysis"}
    assert not any(top(m) in ("config", "project", "mlops", "cli") for m in LIBRARY)
    assert Path(_module_file(f"{PACKAGE}.data.validate")).is_file()
