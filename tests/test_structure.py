"""The shape of `index_builder`, `service` and `training`: no import cycles, no private names
across modules, small modules and functions, each search backend in its own room and the
service's routes one module per resource (docs/architecture.md, "Where things live")."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "index_builder"
PACKAGES = ("index_builder", "service", "training", "bench")
MAX_LINES = 450
MAX_FUNCTION_LINES = 60
BACKENDS = ("index_builder.backends.faiss", "index_builder.backends.milvus")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules(package: str = PACKAGE) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that defines `name` (a module, or a name inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@cache
def _imports(package: str = PACKAGE) -> dict[str, set[tuple[str, str | None]]]:
    """Every project import of every module, at module level and inside functions alike:
    (imported module, imported name or None)."""
    modules = _modules(package)
    found: dict[str, set[tuple[str, str | None]]] = {}
    for module, path in modules.items():
        imports: set[tuple[str, str | None]] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if (owner := _owner(alias.name, modules)) is not None:
                        imports.add((owner, None))
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, path, node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        imports.add((submodule, None))
                    elif (owner := _owner(source, modules)) is not None:
                        imports.add((owner, alias.name))
        found[module] = imports
    return found


def _graph(package: str = PACKAGE) -> dict[str, set[str]]:
    return {
        module: {target for target, _ in imports if target != module}
        for module, imports in _imports(package).items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_sees_function_level_imports():
    # `open_store` imports each backend's store only when it is chosen
    assert "index_builder.backends.faiss.store" in _graph()["index_builder.backends"]


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    assert _cycles(_graph(package)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_imported_across_modules(package):
    offenders = sorted(
        f"{module} imports {name} from {target}"
        for module, imports in _imports(package).items()
        for target, name in imports
        if name and name.startswith("_") and not name.startswith("__") and target != module
    )
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_attribute_of_another_module(package):
    """`module._name` through an imported project module counts as importing it."""
    modules = _modules(package)
    offenders = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, path, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    assert offenders == []


@pytest.mark.parametrize(
    "package, module", [(package, module) for package in PACKAGES for module in _modules(package)]
)
def test_module_is_small(package, module):
    lines = len(_modules(package)[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES})"


def _long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than MAX_FUNCTION_LINES (nested ones
    too; from `def` to its last line, decorators left out)."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_long_functions_are_found():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    method = body.replace("    ", "        ")
    source = f"def fits():\n{body}\n\nclass A:\n    async def grows(self):\n{method}        pass\n"
    assert _long_functions(source) == [("grows", MAX_FUNCTION_LINES + 1)]


@pytest.mark.parametrize(
    "package, module", [(package, module) for package in PACKAGES for module in _modules(package)]
)
def test_functions_are_small(package, module):
    long = _long_functions(_modules(package)[module].read_text())
    assert long == [], f"{module}: {long} (functions of at most {MAX_FUNCTION_LINES} lines)"


def test_the_training_graph_sees_function_level_imports():
    # `cots eval` imports the video evaluator only for a video checkpoint
    assert "training.video_evaluate" in _graph("training")["training.commands"]


def test_the_model_sits_above_its_parts():
    """`training.model` builds from the config, the networks and the towers; none of what it
    reaches imports it back, and the metrics import no feature cache (it is passed in)."""
    graph = _graph("training")
    reached, todo = set(), ["training.model"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert "training.model" not in reached
    assert {"training.video_model", "training.towers.build"} <= reached
    assert not any(
        target.startswith("training.feature_cache") for target in graph["training.evaluate"]
    )


def test_no_backend_imports_another():
    graph = _graph()
    for room in BACKENDS:
        others = [other for other in BACKENDS if other != room]
        for module in graph:
            if module == room or module.startswith(room + "."):
                reached = [
                    target
                    for target in graph[module]
                    for other in others
                    if target == other or target.startswith(other + ".")
                ]
                assert reached == [], f"{module} imports another backend: {reached}"


def test_only_open_store_reaches_into_a_backend():
    """Outside the backends, the code reaches a backend through the contract
    (`backends.base`) and `backends.open_store`, never into a backend's room."""
    graph = _graph()
    inside = ("index_builder.backends.",)
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not module.startswith(inside) and module != "index_builder.backends"
        for target in targets
        if target.startswith(BACKENDS)
    )
    assert offenders == []


def test_the_contract_imports_no_backend():
    reached = {
        target for target in _graph()["index_builder.backends.base"] if target.startswith(PACKAGE)
    }
    assert reached == set()


def test_the_service_graph_sees_its_routes():
    assert "service.routes.search" in _graph("service")["service.app"]


def test_each_route_module_reaches_no_other_route_module():
    """A resource's routes share only what lies outside `service.routes` (shaping, bodies,
    the engine) and `routes.openapi` (error docs, request bodies, routers)."""
    graph = _graph("service")
    rooms = [m for m in graph if m.startswith("service.routes.") and m != "service.routes.openapi"]
    offenders = sorted(
        f"{module} -> {target}" for module in rooms for target in graph[module] if target in rooms
    )
    assert offenders == []


def test_only_the_routes_know_the_web_framework_routers():
    """Below the routes, nothing imports a route module (the app only includes them)."""
    graph = _graph("service")
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not module.startswith("service.routes") and module != "service.app"
        for target in targets
        if target.startswith("service.routes")
    )
    assert offenders == []


def test_no_bench_module_imports_the_tests_or_edits_the_path():
    """bench/ is a package with its own fixtures: it imports nothing from tests/, loads no
    file by path and leaves sys.path alone (run a benchmark as `python -m bench.NAME`)."""
    offenders = []
    for module, path in _modules("bench").items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                names = []
            offenders += [f"{module} imports {n}" for n in names if n.split(".")[0] == "tests"]
            if isinstance(node, ast.Attribute) and (
                (isinstance(node.value, ast.Name) and (node.value.id, node.attr) == ("sys", "path"))
                or node.attr in ("spec_from_file_location", "run_path")
            ):
                offenders.append(f"{module} uses {node.attr}")
    assert offenders == []


def _house_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("house", ROOT / "docs" / "house.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_house_counts_rooms_floors_and_arrows(tmp_path):
    """docs/house.py (the counts in docs/architecture.md) on a package of known shape:
    function-level and relative imports are arrows; a cycle has no floors."""
    house = _house_script()
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("import json\n")
    (package / "sub" / "mid.py").write_text("def f():\n    from pkg import low\n")
    (package / "top.py").write_text("from .sub import mid\nfrom pkg.low import x\n")
    counted = house.house("pkg", tmp_path)
    assert (counted.rooms, counted.floors, counted.arrows) == (5, 3, 3)
    floors = {"pkg": 0, "pkg.sub": 0, "pkg.low": 0, "pkg.sub.mid": 1, "pkg.top": 2}
    assert counted.floor_of == floors
    (package / "low.py").write_text("from pkg import top\n")
    with pytest.raises(ValueError, match="cycle"):
        house.house("pkg", tmp_path)


def test_the_house_script_agrees_with_the_graph_checked_here():
    house = _house_script()
    for package in PACKAGES:
        assert house.graph(package) == _graph(package), package
