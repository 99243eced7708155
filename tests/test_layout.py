"""The layout stays as docs/guide.md's code map describes it: small modules, a thin command line, no import cycles,
and capabilities checked through the model interface rather than hasattr."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "elbox"


def modules() -> dict[str, Path]:
    return {
        ".".join(("elbox", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }


def runtime_nodes(tree: ast.AST):
    """Every node of a module but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports(path: Path, known: set[str]) -> set[str]:
    """The elbox modules a file imports (at the top or inside functions; not those for annotations only)."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elbox"):
            found.update(t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    return found


# The layers, from the bottom: a module imports from its own layer and the layers below, never above (the package
# itself, elbox/__init__.py and __main__.py, is the top)
LAYERS = ["core", "data", "models", "io", "training", "evaluation", "present", "cli"]


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_every_module_is_in_a_layer():
    assert not [m for m in modules() if layer(m) == len(LAYERS) and m not in ("elbox", "elbox.__main__")]


def test_imports_go_only_down_through_the_layers():
    """(The command line calls the public API, `import elbox`.)"""
    mods = modules()
    upward = [
        f"{m} imports {t}"
        for m, p in mods.items()
        for t in imports(p, set(mods))
        if layer(t) > layer(m) and not (t == "elbox" and m.startswith("elbox.cli."))
    ]
    assert not upward


def test_module_sizes():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert sizes["elbox.cli.main"] < 300
    assert max(sizes.values()) <= 450, {k: v for k, v in sizes.items() if v > 450}


def test_no_import_cycles():
    """Depth-first search over the import graph (a package's imports of its own submodules are re-exports, left out)."""
    mods = modules()
    graph = {m: {t for t in imports(p, set(mods)) if t != m and not t.startswith(m + ".")} for m, p in mods.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph[m]):
            assert state.get(t) != "open", (
                "import cycle: " + " -> ".join([*path[path.index(t) :], t]) if t in path else t
            )
            if t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_hasattr_capability_checks():
    offenders = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "hasattr(" in line
    ]
    assert not offenders


def calls_and_compares():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            yield path, node


def test_no_getattr_with_a_literal_name():
    """A question asked of an object is a Protocol it implements or an attribute its class declares: never
    getattr(obj, "name", default)."""
    offenders = [
        f"{p.relative_to(SRC)}:{n.lineno}"
        for p, n in calls_and_compares()
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id == "getattr"
        and len(n.args) >= 2
        and isinstance(n.args[1], ast.Constant)
    ]
    assert not offenders


def test_no_method_identity_tests():
    """No `type(model).method is Base.method`: a model that has a capability implements its Protocol."""
    offenders = [
        f"{p.relative_to(SRC)}:{n.lineno}"
        for p, n in calls_and_compares()
        if isinstance(n, ast.Compare)
        and any(isinstance(op, (ast.Is, ast.IsNot)) for op in n.ops)
        and isinstance(n.left, ast.Attribute)
        and all(isinstance(c, ast.Attribute) for c in n.comparators)
    ]
    assert not offenders


def test_declared_capabilities_are_never_properties():
    """LatentVariableModel declares its capability flags with defaults; a model whose answer depends on its config
    sets the attribute in __init__, so the built model answers, never the class (a class flag overridden by a
    property once made resume read the class's default)."""
    base = next(
        n
        for n in ast.walk(ast.parse((SRC / "models" / "base.py").read_text()))
        if isinstance(n, ast.ClassDef) and n.name == "LatentVariableModel"
    )
    flags = {
        n.target.id
        for n in base.body
        if isinstance(n, ast.AnnAssign)
        and (
            isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, bool)
            or isinstance(n.value, ast.Call)
            and ast.unparse(n.value) == "frozenset()"
        )
    }
    assert {"trains_by_gradient", "inexact_kl_terms", "trains_on_surrogate", "detachable_posterior"} <= flags
    offenders = [
        f"{p.relative_to(SRC)}:{n.lineno} {n.name}"
        for p, n in calls_and_compares()
        if isinstance(n, ast.FunctionDef) and n.name in flags
    ]
    assert not offenders


def test_library_code_prints_nothing():
    """Messages go through logging (elbox.core.log); only the command line prints."""
    found = []
    for name, path in modules().items():
        if name.startswith("elbox.cli") or name == "elbox.core.log":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("print", "tqdm.write", "sys.stderr.write"):
                found.append(f"{name}:{node.lineno}")
    assert not found
