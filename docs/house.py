"""The house's counts of a package, for docs/architecture.md: rooms (its modules), floors
(the layers of its import graph: a module sits one floor above the highest module it
imports) and arrows (imports between its modules, function-level ones included).

    python docs/house.py index_builder service
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class House(NamedTuple):
    rooms: int
    floors: int
    arrows: int
    floor_of: dict[str, int]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def owner(name: str, modules: set[str]) -> str | None:
    """The package module that defines `name` (a module, or a name inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules an import statement reaches (relative imports made absolute;
    `from a import b` reaches the module `a.b` when there is one, else `a`)."""
    if isinstance(node, ast.Import):
        return {o for alias in node.names if (o := owner(alias.name, modules))}
    if not isinstance(node, ast.ImportFrom):
        return set()
    source = node.module or ""
    if node.level:
        base = module.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    reached = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            reached.add(f"{source}.{alias.name}")
        elif (o := owner(source, modules)) is not None:
            reached.add(o)
    return reached


def graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its code)."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        edges[module] = {
            target
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            for target in imported(node, module, is_package, set(paths))
            if target != module
        }
    return edges


def house(package: str, root: Path = ROOT) -> House:
    """The counts of `package` (an import cycle is a ValueError: it has no floors)."""
    edges = graph(package, root)

    @cache
    def floor(module: str, seen: frozenset[str] = frozenset()) -> int:
        if module in seen:
            raise ValueError(f"import cycle through {module}")
        return 1 + max((floor(t, seen | {module}) for t in edges[module]), default=-1)

    floor_of = {module: floor(module) for module in edges}
    arrows = sum(len(targets) for targets in edges.values())
    return House(len(edges), 1 + max(floor_of.values(), default=-1), arrows, floor_of)


def main(packages: list[str]) -> None:
    for package in packages:
        counted = house(package)
        print(f"{package}: {counted.rooms} rooms, {counted.floors} floors, {counted.arrows} arrows")


if __name__ == "__main__":
    main(sys.argv[1:] or ["index_builder", "service"])
