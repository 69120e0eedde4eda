"""The layering holds: imports point down, never up, counting imports inside functions.

core (model, kvcache, masks, verify, errors) -> runtime (cudagraph) -> loop (speculative, adaptive) ->
methods (drafters/) -> tools (bench, html_report) -> scripts (train_tiny.py, decode.py, lessons/).
Read from the source with ast, so a cycle hidden in a function body is found too.
"""

import ast

from tests.helpers import ROOT

CORE = {"model", "kvcache", "masks", "verify", "errors"}
LAYER = {**dict.fromkeys(CORE, 0), "cudagraph": 1, "speculative": 2, "adaptive": 2, "drafters": 3, "bench": 4,
         "html_report": 4}


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """The modules a file imports anywhere in it, as dotted names (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def library_graph():
    files = {module_name(p): p for p in (ROOT / "minispec").rglob("*.py")}
    return {name: {m for m in imports(path) if m in files and m != name and m != "minispec"}
            for name, path in files.items()}


def test_no_import_cycle_in_the_library():
    graph = library_graph()
    state = {}

    def visit(name, trail):
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", f"import cycle: {' -> '.join(trail + [other])}"
            if other not in state:
                visit(other, trail + [other])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def layer(name):
    """minispec.X.Y -> the layer of X, None for the package itself and the support modules."""
    return LAYER.get(name.split(".")[1]) if "." in name else None


def test_imports_point_down():
    for name, imported in library_graph().items():
        here = layer(name)
        for other in imported:
            there = layer(other)
            if here is not None and there is not None:
                assert there <= here, f"{name} (layer {here}) imports {other} (layer {there}): an import up"
    assert {m.split(".")[1] for m in library_graph()["minispec.cudagraph"]} <= CORE


def test_scripts_and_tests_do_not_import_each_other():
    for path in [*(ROOT / "lessons").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for module in imports(path):
            top = module.split(".")[0]
            assert top not in ("decode", "train_tiny"), f"{path.name} imports the script {top}.py"
            if path.parent.name == "tests":
                assert not module.startswith("tests.test_"), f"{path.name} imports the test module {module}"
