"""Changes in place: a planned change (`Plan`) applied to the live collection of a Milvus
version as inserts and deletes, logged in the versions collection, recoverable when killed.

What a version means on Milvus: a collection, made by a build, a rebuild or a new bundle
(then the alias moves); `cots index add/--upsert/delete` and the service's /admin changes do
not make one. They change the rows of the collection in place, in milliseconds, and each is
logged as a record `<version>+c<NNNNNN>` (`change_key`) beside the version's record, which
counts them (`changes`). Rows are never renumbered: a change inserts its new rows under new
row numbers (`next_row` onwards; an upserted item gets a new row, as in FAISS) and deletes the
rows it drops (an image's captions go with it), so a row number always names the same
content and what a reader cached about a row stays true. Inserts go first, then one delete
call: while a change runs (milliseconds) an upserted item may show twice, never not at all.
Switching the alias back to an older version serves that collection with the changes made to
it, none of the newer one's; a single change cannot be undone (Milvus keeps no deleted rows),
only a whole version switched.

Consistency: searches and lookups read at the collection's default level (Bounded: another
process's change shows within about 200 ms, a Milvus time tick); a change ends with a
Strong-consistency check that its new rows are all there and its dropped ones gone, so once
it returns, every later read on the server sees it (one query node, as a standalone server).

A change killed halfway: its record says `pending` (written before any row moves) and
`inserted` once every new row is in. The next writer (`recover`) finishes or undoes it: new
rows not all inserted, or the deletes not made (the counts say which), are undone by deleting
the change's row numbers; a change whose inserts and deletes were both made is recorded done.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from index_builder.backends.base import EMPTIED, SIDES, Plan
from index_builder.backends.milvus.client import errors
from index_builder.backends.milvus.write import (
    batches_from_arrays,
    entity,
    query_side,
)
from index_builder.filters import field_types, merge_field_types

log = logging.getLogger(__name__)

RECORD_LENGTH = 65535


def change_key(version: str, number: int) -> str:
    """The change log record of a version's `number`th change."""
    return f"{version}+c{number:06d}"


def write_records(
    client: Any, uri: str, records: str, entries: dict[str, dict[str, Any]], flush: bool
) -> None:
    """Upsert records (a version's info, a change's entry) in one call; `flush` seals them
    (a build's record); a change's entries are durable in Milvus's log without it."""
    rows = []
    for key, info in entries.items():
        text = json.dumps(info, ensure_ascii=False)
        if len(text.encode()) > RECORD_LENGTH:  # keep the counts, drop the named examples
            for side in info.get("sides", {}).values():
                side["skipped"] = {**side["skipped"], "examples": []}
            text = json.dumps(info, ensure_ascii=False)
        rows.append({"version": key, "info": text, "vector": [1.0, 0.0]})
    with errors(uri, f"record {', '.join(entries)}"):
        client.upsert(records, rows)
        if flush:
            client.flush(records)


def changed_sides(sides: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Each side's record after `plan`: counts, rows ever written, deletions and the filter
    fields of its new rows; a side the change brings takes the index settings of the other."""
    present = [side for side in SIDES if side in sides or plan.rows[side]]
    template = next(iter(sides.values()))
    after = {}
    for side in present:
        base = sides.get(side) or {
            **template,
            "count": 0,
            "rows": 0,
            "deleted": 0,
            "fields": {},
            "skipped": {"count": 0, "examples": []},
        }
        new = plan.rows[side]
        after[side] = {
            **base,
            "count": int(base["count"]) - len(plan.gone[side]) + len(new),
            "rows": int(base.get("rows", base["count"])) + len(new),
            "deleted": int(base.get("deleted", 0)) + len(plan.gone[side]),
            "fields": merge_field_types(
                base["fields"], field_types(r.get("meta") or {} for r in new)
            ),
        }
    if not any(info["count"] for info in after.values()):
        raise ValueError(EMPTIED)
    counts = {side: info["count"] for side, info in after.items()}
    for side, info in after.items():
        info["query_side"] = query_side(side, counts)
    return after


def apply_in_place(
    client: Any,
    uri: str,
    records: str,
    collection: str,
    info: dict[str, Any],
    plan: Plan,
    dataset: dict[str, Any],
) -> dict[str, Any]:
    """Insert `plan`'s new rows and delete its dropped ones in `collection` (the version
    `info` records), logged as the version's next change; returns the version's new record.
    A failure undoes what it can at once (`recover`); the rest the next writer undoes."""
    started = time.perf_counter()
    version, number = str(info["version"]), int(info.get("changes", 0)) + 1
    start = int(info["next_row"])
    end = start + sum(len(plan.rows[side]) for side in SIDES)
    sides = changed_sides(info["sides"], plan)
    pending: dict[str, Any] = {
        "change": number,
        "rows": [start, end],
        "sides": sides,
        "inserted": False,
        "dataset": dataset,
    }
    info = {**info, "next_row": end, "pending": pending}
    write_records(client, uri, records, {version: info}, flush=False)
    try:
        _ensure_partitions(client, uri, collection, list(sides))
        _insert(client, uri, collection, plan, start)
        pending["inserted"] = True
        write_records(client, uri, records, {version: info}, flush=False)
        gone = sorted(set().union(*plan.gone.values()))
        if gone:
            with errors(uri, f"delete rows from {collection}"):
                client.delete(collection, ids=gone)
        _check(client, uri, collection, plan, start, end)
    except BaseException:
        try:
            recover(client, uri, records, collection, info)
        except Exception as exc:  # the server may be gone: the next writer recovers
            log.warning(
                "change %d of %s left pending (the next change undoes it): %s", number, version, exc
            )
        raise
    return _finish(client, uri, records, info, "done", time.perf_counter() - started)


def recover(
    client: Any, uri: str, records: str, collection: str, info: dict[str, Any]
) -> dict[str, Any]:
    """A version's record with its pending change (one killed halfway) finished or undone:
    done if its rows were all inserted and its deletes made (the counts match), else its
    new rows deleted again. Returns the record (unchanged when nothing was pending)."""
    pending = info.get("pending")
    if not pending:
        return info
    expected = {side: int(s["count"]) for side, s in pending["sides"].items()}
    if pending["inserted"] and _counts(client, uri, collection, list(expected)) == expected:
        log.warning(
            "change %d of %s was cut off after its writes: recorded as done",
            pending["change"],
            info["version"],
        )
        return _finish(client, uri, records, info, "done on recovery", 0.0)
    start, end = pending["rows"]
    with errors(uri, f"undo a change in {collection}"):
        client.delete(collection, filter=f"row >= {int(start)} and row < {int(end)}")
    log.warning(
        "change %d of %s was cut off before its writes completed: its new rows are "
        "deleted (its deletes, if any were made, stay)",
        pending["change"],
        info["version"],
    )
    entry = _entry(info, "undone", 0.0)
    info = {key: value for key, value in info.items() if key != "pending"}
    info["changes"] = pending["change"]
    write_records(client, uri, records, {info["version"]: info, entry["key"]: entry}, flush=False)
    return info


def _finish(
    client: Any, uri: str, records: str, info: dict[str, Any], state: str, seconds: float
) -> dict[str, Any]:
    pending = info["pending"]
    entry = _entry(info, state, seconds)
    info = {key: value for key, value in info.items() if key != "pending"}
    info.update(sides=pending["sides"], changes=pending["change"])
    info["changed"] = entry["finished"]
    write_records(client, uri, records, {info["version"]: info, entry["key"]: entry}, flush=False)
    return info


def _entry(info: dict[str, Any], state: str, seconds: float) -> dict[str, Any]:
    """A change's log record: what it did to each side, and how it ended."""
    pending, before = info["pending"], info["sides"]
    return {
        "key": change_key(str(info["version"]), int(pending["change"])),
        "version": info["version"],
        "change": pending["change"],
        "state": state,
        "rows": pending["rows"],
        "added": {
            side: int(s["rows"]) - int(before.get(side, {}).get("rows", 0))
            for side, s in pending["sides"].items()
        },
        "deleted": {
            side: int(s["deleted"]) - int(before.get(side, {}).get("deleted", 0))
            for side, s in pending["sides"].items()
        },
        "dataset": pending.get("dataset") or {},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
    }


def _ensure_partitions(client: Any, uri: str, collection: str, sides: list[str]) -> None:
    """A side a change brings to a version gets its partition (a partition made in a loaded
    collection is loaded with it)."""
    with errors(uri, f"add a partition to {collection}"):
        for side in sides:
            if not client.has_partition(collection, side):
                client.create_partition(collection, side)


def _insert(client: Any, uri: str, collection: str, plan: Plan, start: int) -> None:
    for side in SIDES:
        rows = plan.rows[side]
        numbers = np.arange(start, start + len(rows), dtype=np.int64)
        start += len(rows)
        for batch, numbered, vectors in batches_from_arrays(rows, numbers, plan.vectors.get(side)):
            entities = [
                entity(r, int(n), v) for r, n, v in zip(batch, numbered, vectors, strict=True)
            ]
            with errors(uri, f"insert into {collection}"):
                client.insert(collection, entities, partition_name=side)


def _check(client: Any, uri: str, collection: str, plan: Plan, start: int, end: int) -> None:
    """At Strong consistency: every new row is there and no dropped one is (after this,
    every read the server answers sees the change)."""
    gone = sorted(set().union(*plan.gone.values()))
    with errors(uri, f"check the change to {collection}"):
        found = client.query(
            collection,
            filter=f"row >= {start} and row < {end}"
            + (f" or row in [{', '.join(map(str, gone))}]" if gone else ""),
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
    if int(found[0]["count(*)"]) != end - start:
        raise OSError(f"Milvus did not apply a change to {collection} as asked")


def _counts(client: Any, uri: str, collection: str, sides: list[str]) -> dict[str, int]:
    with errors(uri, f"count the rows of {collection}"):
        return {
            side: int(
                client.query(
                    collection,
                    filter="row >= 0",  # milvus-lite counts every partition without one
                    output_fields=["count(*)"],
                    partition_names=[side],
                    consistency_level="Strong",
                )[0]["count(*)"]
            )
            for side in sides
        }
