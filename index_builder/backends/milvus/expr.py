"""Metadata filters (`index_builder.filters`) as Milvus boolean expressions on the JSON
`meta` field, with the same meaning as the FAISS backend's row masks:

    {"folder": "cats"}                    meta["folder"] == "cats"
    {"tags": "small"}        (list field) json_contains(meta["tags"], "small")
    {"folder": {"in": ["a", "b"]}}        (meta["folder"] == "a" or meta["folder"] == "b")
    {"tags": {"in": ["a", "b"]}}          json_contains_any(meta["tags"], ["a", "b"])
    {"year": {"gte": 2000, "lt": 2010}}   meta["year"] >= 2000 and meta["year"] < 2010
    {"folder": "2023"}                    (meta["folder"] == "2023" or meta["folder"] like "2023/%")


A "mixed" field (scalars in some rows, lists in others) gets both forms, ORed. `in` on a
scalar field is spelled as ORed equalities: Milvus accepts `meta["f"] in [...]`, milvus-lite
does not. The folder field matches the folder and the folders under it (`filters.UNDER`)
through `like`, which has no escape in milvus-lite: in a folder's name, `_` and `%` also
match any one or more characters there ("a_b" also selects "aXb/..."; the FAISS masks do
not). A row without the field, or with null or a value of another type, matches no
clause, as in the masks. One known difference, milvus-lite only: it compares JSON true equal
to 1, so on a "mixed" field holding both booleans and numbers, `{"f": 1}` also matches true.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from index_builder.filters import UNDER

COMPARE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def literal(value: Any) -> str:
    """A Milvus expression literal: true/false, a positional number, a quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return np.format_float_positional(value, trim="-")
    return json.dumps(str(value), ensure_ascii=False)


def field(name: str) -> str:
    return f"meta[{literal(name)}]"


def clause(name: str, kind: str, op: str, value: Any) -> str:
    """One parsed clause (`filters.parse`) on a field of `kind`."""
    ref = field(name)
    if op == UNDER:
        under = [
            f"{ref} == {literal(v)} or {ref} like {literal(v + '/%')}" if v else f'{ref} like "%"'
            for v in value
        ]
        return f"({' or '.join(under)})"
    if op in COMPARE:
        return f"{ref} {COMPARE[op]} {literal(value)}"
    values = value if op == "in" else [value]
    scalar = " or ".join(f"{ref} == {literal(v)}" for v in values)
    if len(values) == 1:
        listed = f"json_contains({ref}, {literal(values[0])})"
    else:
        listed = f"json_contains_any({ref}, [{', '.join(literal(v) for v in values)}])"
    if kind == "list":
        return listed
    if kind == "mixed":
        return f"({scalar} or {listed})"
    return f"({scalar})" if len(values) > 1 else scalar


def expression(clauses: list[tuple[str, str, Any]], fields: dict[str, str]) -> str | None:
    """The clauses ANDed (None: no filter)."""
    if not clauses:
        return None
    return " and ".join(clause(name, fields[name], op, value) for name, op, value in clauses)
