"""One index version searched in Milvus: the `Version` interface over one collection.

Nothing per row is held in memory (the point of this backend is a gallery that does not fit
one host): ids, rows and vectors are looked up in the collection. A search returns its hits'
rows as output fields of the same call (`find`: one round trip, no second lookup). Rows change
in place (`change.py`), but a row number always names the same content, so rows read by
`rows_at` stay cached; the version's record (counts, filter fields) and the number of rows a
filter allows (to widen the search as the FAISS backend does) are replaced by the change itself
(`update`), or re-read within REFRESH_S of another process's change.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from index_builder import filters
from index_builder.backends.base import (
    SIDES,
    BundleIdentity,
    Hit,
    check_bundle,
    check_offset,
    check_vectors,
    ranked_hits,
)
from index_builder.backends.milvus.client import (
    MAX_TOPK,
    OUTPUT,
    errors,
    param_limit,
    search_params,
)
from index_builder.backends.milvus.expr import expression, literal

CACHE_ROWS = 65536
CACHE_COUNTS = 4096
CHUNK = 1000  # values per `in [...]` lookup
REFRESH_S = 1.0  # how stale the record may be after another process's change


def stored_row(entity: dict[str, Any]) -> dict[str, Any]:
    """The row as the FAISS backend stores it, from a collection entity."""
    return {"id": entity["id"], **(entity.get("item") or {}), "meta": entity.get("meta") or {}}


class MilvusVersion:
    """A published version: its collection, and its record (`info`, index.json's keys)."""

    def __init__(
        self,
        client: Any,
        uri: str,
        collection: str,
        info: dict[str, Any],
        records: str | None = None,
    ) -> None:
        self.client = client
        self.records = records  # where the record is re-read from (None: never)
        self._read_at = time.monotonic()
        self.uri = uri
        self.collection = collection
        self.info = info
        self.version = str(info["version"])
        self._rows: dict[tuple[str, int], dict[str, Any]] = {}
        self._counts: dict[tuple[str, str, int], int] = {}  # (side, filter, change number)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MilvusVersion({self.version!r}, collection={self.collection!r})"

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def bundle_id(self) -> str:
        return str(self.info["bundle_id"])

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(side for side in SIDES if side in self.info["sides"])

    def has(self, side: str) -> bool:
        return side in self.info["sides"]

    def update(self, info: dict[str, Any]) -> None:
        """Take the record of a change made in place: new counts and filter fields."""
        with self._lock:
            self.info, self._read_at = info, time.monotonic()
            self._counts.clear()

    def refresh(self) -> None:
        """Re-read the record if REFRESH_S passed since it was read, and take it if another
        process changed the rows since (a round trip per REFRESH_S, not per request)."""
        if self.records is None or time.monotonic() - self._read_at < REFRESH_S:
            return
        self._read_at = time.monotonic()
        with errors(self.uri, "read the version record"):
            found = self.client.get(self.records, ids=[self.version], output_fields=["info"])
        if found:
            info = json.loads(found[0]["info"])
            if info.get("changes", 0) != self.info.get("changes", 0):
                self.update(info)

    def live_count(self, side: str) -> int:
        return int(self.info["sides"][side]["count"]) if self.has(side) else 0

    def check_bundle(self, bundle: BundleIdentity) -> None:
        check_bundle(bundle, self.info, self.version)

    def warm(self, side: str) -> None:
        """Nothing to build: Milvus looks ids up and filters on its side."""

    # -- lookups ---------------------------------------------------------------------------

    def row_of(self, side: str, item_id: str) -> int | None:
        return self.rows_of(side, [item_id]).get(item_id)

    def rows_of(self, side: str, item_ids: Iterable[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        found: dict[str, int] = {}
        if not self.has(side):
            return found
        for start in range(0, len(ids), CHUNK):
            values = ", ".join(literal(i) for i in ids[start : start + CHUNK])
            for entity in self._query(side, f"id in [{values}]", ["row", "id"]):
                found[entity["id"]] = int(entity["row"])
        return found

    def rows_at(self, side: str, rows: Sequence[int]) -> list[dict[str, Any]]:
        wanted = [int(r) for r in rows]
        known = {r: item for r in wanted if (item := self._rows.get((side, r))) is not None}
        missing = sorted(set(wanted) - known.keys())
        if missing:
            with errors(self.uri, "read rows"):
                entities = self.client.get(
                    self.collection,
                    ids=missing,
                    output_fields=["row", *OUTPUT],
                    partition_names=[side],
                )
            fetched = {int(e["row"]): stored_row(e) for e in entities}
            self._remember(side, fetched)
            known.update(fetched)
        absent = [r for r in wanted if r not in known]
        if absent:
            raise KeyError(f"no {side} row {absent[0]} in index version {self.version}")
        return [known[r] for r in wanted]

    def caption_rows(self, image_ids: set[str]) -> list[int]:
        if not self.has("text"):
            return []
        ids, rows = sorted(image_ids), []
        for start in range(0, len(ids), CHUNK // 10):  # room for many captions per image
            values = ", ".join(literal(i) for i in ids[start : start + CHUNK // 10])
            rows += [int(e["row"]) for e in self._query("text", f"image_id in [{values}]", ["row"])]
        return rows

    def vector(self, side: str, row: int) -> np.ndarray:
        with errors(self.uri, "read a vector"):
            found = self.client.get(
                self.collection, ids=[int(row)], output_fields=["vector"], partition_names=[side]
            )
        if not found:
            raise KeyError(f"no {side} row {row} in index version {self.version}")
        return np.asarray(found[0]["vector"], dtype=np.float32)

    def count(self, side: str, filter: dict[str, Any] | None = None) -> int:
        """Rows of `side` whose metadata satisfies `filter` (counted once per change)."""
        self.refresh()
        fields = self.info["sides"][side].get("fields", {})
        expr = expression(filters.parse(filter, fields), fields)
        return self.live_count(side) if expr is None else self._count(side, expr)

    # -- search ----------------------------------------------------------------------------

    def search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product among the side's rows whose metadata satisfies `filter`
        (other than `exclude`): (scores (Q, k'), rows (Q, k')), k' = min(k, allowed rows),
        -1 padding."""
        scores, rows, _ = self._ranking(side, vectors, k, filter, exclude)
        return scores, rows

    def find(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        *,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> list[list[Hit]]:
        """The hits ranked offset+1 .. offset+k per query, their rows the search call's
        output fields."""
        check_offset(offset)
        scores, rows, items = self._ranking(side, vectors, k + offset, filter, exclude)
        return ranked_hits(scores, rows, offset, items)

    def _ranking(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        filter: dict[str, Any] | None,
        exclude: int | None,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
        """(scores, rows, row -> record) of a top-k search. The tuned search parameter is
        widened for deep pages and by the fraction a filter allows, and doubled (to its
        limit) for queries that still come back short."""
        self.refresh()
        vectors = check_vectors(self, side, vectors, k)
        fields = self.info["sides"][side].get("fields", {})
        expr = expression(filters.parse(filter, fields), fields)
        live = self.live_count(side)
        allowed = live if expr is None else self._count(side, expr)
        if exclude is not None:  # one row fewer if the filter allows the excluded one
            allowed -= self._count(
                side, f"row == {int(exclude)}" + (f" and ({expr})" if expr else "")
            )
        k = min(k, allowed)
        if k > MAX_TOPK:
            raise ValueError(f"Milvus returns at most {MAX_TOPK} results per query, asked {k}")
        scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        rows = np.full((len(vectors), k), -1, dtype=np.int64)
        items: dict[int, dict[str, Any]] = {}
        if k == 0:
            return scores, rows, items
        if exclude is not None:
            expr = f"row != {int(exclude)}" + (f" and ({expr})" if expr else "")
        info = self.info["sides"][side]
        params = search_params(info, k, allowed / max(live, 1))
        todo = np.arange(len(vectors))
        while True:  # queries still short (deep pages, selective filters) search wider
            items |= self._search(side, vectors[todo], k, expr, params, scores, rows, todo)
            todo = todo[(rows[todo] < 0).any(axis=1)]
            wider = {n: min(param_limit(info, n, k), 2 * v) for n, v in params.items()}
            if not len(todo) or wider == params:
                return scores, rows, items
            params = wider

    def _search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        expr: str | None,
        params: dict[str, int],
        scores: np.ndarray,
        rows: np.ndarray,
        at: np.ndarray,
    ) -> dict[int, dict[str, Any]]:
        """One Milvus search; hits go into `scores` and `rows` at the query positions `at`;
        returns the hits' rows (row -> record, from the call's output fields)."""
        scores[at], rows[at] = -np.inf, -1
        with errors(self.uri, "search"):
            results = self.client.search(
                self.collection,
                data=list(vectors),
                limit=k,
                filter=expr or "",
                output_fields=OUTPUT,
                search_params={"metric_type": "IP", "params": params},
                partition_names=[side],
                anns_field="vector",
            )
        found: dict[int, dict[str, Any]] = {}
        for q, hits in zip(at, results, strict=True):
            for j, hit in enumerate(hits[:k]):
                row = int(hit.pk)
                scores[q, j], rows[q, j] = hit["distance"], row
                found[row] = stored_row(hit["entity"])
        return found

    # -- internals -------------------------------------------------------------------------

    def _count(self, side: str, expr: str) -> int:
        key = (side, expr, int(self.info.get("changes", 0)))  # a count made before a change
        # and stored after it is never read
        if key not in self._counts:
            with errors(self.uri, "count filtered rows"):
                result = self.client.query(
                    self.collection,
                    filter=expr,
                    output_fields=["count(*)"],
                    partition_names=[side],
                )
            with self._lock:
                if len(self._counts) >= CACHE_COUNTS:
                    self._counts.clear()
                self._counts[key] = int(result[0]["count(*)"])
        return self._counts[key]

    def _remember(self, side: str, rows: dict[int, dict[str, Any]]) -> None:
        with self._lock:
            if len(self._rows) + len(rows) > CACHE_ROWS:
                self._rows.clear()
            self._rows.update({(side, row): item for row, item in rows.items()})

    def _query(self, side: str, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row of `side` matching `expr` (a query's limit reached is an error, not a
        silent truncation)."""
        with errors(self.uri, "query rows"):
            found = self.client.query(
                self.collection,
                filter=expr,
                output_fields=fields,
                partition_names=[side],
                limit=MAX_TOPK,
            )
        if len(found) >= MAX_TOPK:
            raise OSError(f"a lookup in {self.collection} matched {MAX_TOPK} rows or more")
        return found
