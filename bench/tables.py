"""Markdown tables for docs/benchmarks.md: cells, tables, and a generic rendering of any
result (its settings, then one table per list or mapping of records)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

MAX_ROWS = 60


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": scalar}; lists of scalars become one comma-joined cell."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and all(is_scalar(v) for v in value):
            out[name] = ", ".join(fmt(v) for v in value)
        elif is_scalar(value):
            out[name] = value
    return out


def record_tables(obj: Any, path: str = "") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(path, rows) for every list of dicts and every mapping whose values are all dicts."""
    if isinstance(obj, list):
        if obj and all(isinstance(v, dict) for v in obj):
            yield path, [flatten(v) for v in obj]
        for i, value in enumerate(obj):
            yield from record_tables(value, f"{path}[{i}]")
    elif isinstance(obj, dict):
        if len(obj) > 1 and all(isinstance(v, dict) for v in obj.values()):
            yield path, [{"name": k, **flatten(v)} for k, v in obj.items()]
            return
        for key, value in obj.items():
            yield from record_tables(value, f"{path}.{key}" if path else key)


def shallow(obj: dict) -> dict[str, Any]:
    """A record's own fields: its scalars and those of child dicts that hold only scalars."""
    own = {k: v for k, v in obj.items() if is_scalar(v) or isinstance(v, dict)}
    return flatten(
        {k: v for k, v in own.items() if is_scalar(v) or all(map(is_scalar, v.values()))}
    )


def records(obj: Any, context: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Every dict in `obj` with the keys that lead to it and its own fields."""
    if isinstance(obj, dict):
        yield context, shallow(obj)
        for key, value in obj.items():
            yield from records(value, (*context, str(key)))
    elif isinstance(obj, list):
        for value in obj:
            yield from records(value, context)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table; columns default to the union of keys in order of appearance."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    shown = rows[:MAX_ROWS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in shown]
    if len(rows) > len(shown):
        lines.append(f"\n({len(rows) - len(shown)} more rows in the JSON)")
    return "\n".join(lines)


def generic(data: Any) -> str:
    """Settings (top-level scalars) then one table per list or mapping of records."""
    parts = []
    if isinstance(data, dict):
        settings = {k: v for k, v in flatten(data).items() if "." not in k and k != "command"}
        if settings:
            parts.append(table([{"setting": k, "value": v} for k, v in settings.items()]))
    for path, rows in record_tables(data):
        parts.append(f"`{path or 'rows'}`\n\n{table(rows)}")
    return "\n\n".join(parts) or "(no tabular data)"
