"""The Milvus backend's store: one collection per version, an alias naming the current one.

    <name>                        alias of the current version's collection (alter_alias)
    <name>_v000003_20250101T...   a version: partitions "image" and "text" (client.py)
    <name>_versions               one record per complete version: its info (index.json's
                                  keys: bundle id and path, dimension, recall, fields...)

    <name>_versions               ... and one per change of a version (`change.change_key`)

The FAISS store's contract, in Milvus terms: a build fills a new collection, waits for its
index, measures recall@10 against exact search (tuning ef / nprobe / itopk_size to the
target), writes the version's record, and only then moves the alias, in one atomic
`alter_alias`; a failure drops the new collection and leaves the alias where it was. A
change (add, upsert, delete) is not a new version: its rows change in place in the current
collection, in milliseconds, and it is logged (`change.py` states what a version then means,
the consistency, and what happens to a change killed halfway). The build lock is a file in
the local working directory (one writer per host, as FAISS).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.backends.base import (
    BackendConfig,
    IndexOptions,
    Plan,
    build_lock,
    check_bundle,
    check_gallery,
    info_record,
    is_version_name,
    next_version_name,
)
from index_builder.backends.milvus.change import (
    RECORD_LENGTH,
    apply_in_place,
    change_key,
    recover,
    write_records,
)
from index_builder.backends.milvus.client import (
    add_index,
    choose_index,
    connect,
    errors,
    wait_indexed,
)
from index_builder.backends.milvus.version import MilvusVersion
from index_builder.backends.milvus.write import (
    BATCH,
    Draft,
    batches_from_shards,
    build_collection,
    query_side,
)
from index_builder.backends.recall import sample_rows
from index_builder.stored_files import FILES_DIR, FILES_GRACE_S, collect_stored_files

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_COLLECTION = re.compile(r"^(?P<name>.+)_v(?P<n>\d{6})_(?P<t>\d{8}T\d{6}Z)$")


class MilvusStore:
    """The versions of one index in a Milvus server or milvus-lite file."""

    in_place = True  # a change updates the current version (change.py)

    def __init__(self, root: str | Path, config: BackendConfig, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if not _NAME.match(config.milvus_collection):
            raise ValueError(
                f"bad Milvus collection name {config.milvus_collection!r}: letters, digits "
                "and underscores, not starting with a digit"
            )
        choose_index(config.milvus_index, config.milvus_params, 1)  # an unknown type fails here
        self.root = Path(root)
        self.config = config
        self.keep = keep
        self.uri = str(config.milvus_uri)
        self.name = config.milvus_collection
        self.records = f"{self.name}_versions"
        if self.uri.endswith(".db"):  # a milvus-lite file: made on first use, as an index root
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = connect(self.uri, config.milvus_token)
        with errors(self.uri, "load the version records"):
            if self.client.has_collection(self.records):
                self.client.load_collection(self.records)

    @property
    def location(self) -> str:
        return f"Milvus {self.uri} (collection {self.name})"

    def collection_of(self, version: str) -> str:
        if not is_version_name(version):
            raise ValueError(
                f"{version[:40]!r} is not an index version name (vNNNNNN-YYYYMMDDTHHMMSSZ)"
            )
        return f"{self.name}_{version.replace('-', '_')}"

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions (a record and a collection), oldest first."""
        if not self.client.has_collection(self.records):
            return []
        with errors(self.uri, "list versions"):
            records = self.client.query(
                self.records, filter='version != ""', output_fields=["version"]
            )
            collections = set(self.client.list_collections())
        names = (str(r["version"]) for r in records)  # change log records are not versions
        return sorted(
            v for v in names if is_version_name(v) and self.collection_of(v) in collections
        )

    def current(self) -> str | None:
        """The version the alias names (None: no alias yet)."""
        with errors(self.uri, "read the alias"):
            if self.name not in self.client.list_aliases().get("aliases", []):
                return None
            collection = self.client.describe_alias(self.name)["collection_name"]
        match = _COLLECTION.match(collection)
        if not match or match["name"] != self.name:
            raise ValueError(
                f"the alias {self.name!r} at {self.uri} names collection {collection!r}, "
                "which `cots index` did not build"
            )
        return f"v{match['n']}-{match['t']}"

    def read_info(self, version: str | None = None) -> dict[str, Any]:
        version = version or self._require_current()
        found = self._records([version])
        if not found:
            raise FileNotFoundError(f"index version {version} not found in {self.location}")
        return found[version]

    def _records(self, versions: list[str]) -> dict[str, dict[str, Any]]:
        """The records of `versions` as they are now (Strong consistency: a change another
        process made just before is seen), in one round trip."""
        if not versions or not self.client.has_collection(self.records):
            return {}
        with errors(self.uri, "read version records"):
            found = self.client.get(
                self.records, ids=versions, output_fields=["info"], consistency_level="Strong"
            )
        return {str(e["version"]): json.loads(e["info"]) for e in found}

    def verify(self, version: str | None = None) -> list[str]:
        """Milvus keeps its own storage's integrity; what can be checked here is that the
        version's collection is still there."""
        info = self.read_info(version)
        with errors(self.uri, "list collections"):
            present = self.client.has_collection(info["collection"])
        return [] if present else [f"its collection {info['collection']} is missing"]

    def open(self, version: str | None = None, bundle: Any = None) -> MilvusVersion:
        """A version (default: the alias's); with `bundle`, a mismatched one is refused, and
        so is a collection whose vectors do not have the recorded dimension."""
        version = version or self._require_current()
        info = self.read_info(version)
        if bundle is not None:
            check_bundle(bundle, info, version)
        collection = self.collection_of(version)
        if not self.client.has_collection(collection):
            raise FileNotFoundError(f"index version {version}: collection {collection} is gone")
        with errors(self.uri, f"open collection {collection}"):
            fields = self.client.describe_collection(collection)["fields"]
            dim = next(int(f["params"]["dim"]) for f in fields if f["name"] == "vector")
            if dim != int(info["embed_dim"]):
                raise ValueError(
                    f"collection {collection} holds {dim}-dimensional vectors but index version "
                    f"{version} records {info['embed_dim']}"
                )
            self.client.load_collection(collection)
        return MilvusVersion(self.client, self.uri, collection, info, records=self.records)

    # -- writing ---------------------------------------------------------------------------

    def switch(self, version: str) -> None:
        """Point the alias at a complete version (roll back or forward), atomically."""
        if version not in self.versions():
            raise FileNotFoundError(f"index version {version} not found in {self.location}")
        collection = self.collection_of(version)
        from pymilvus.exceptions import MilvusException

        with errors(self.uri, f"point alias {self.name} at {collection}"):
            if self.name in self.client.list_aliases().get("aliases", []):
                self.client.alter_alias(collection, self.name)
            else:
                try:
                    self.client.create_alias(collection, self.name)
                except MilvusException as exc:  # an alias whose collection was dropped by
                    if "alias already exist" not in str(exc):  # hand: 2.3 keeps it, unlisted
                        raise
                    self.client.alter_alias(collection, self.name)
        log.info("index version %s is now current in %s", version, self.location)

    def check_options(self, options: IndexOptions, dim: int) -> None:
        """FAISS's options are refused (Milvus's index type comes from the config)."""
        if options.factory or options.on_disk:
            raise ValueError("--factory and --on-disk are FAISS options; use --milvus-index")

    def publish(
        self,
        *,
        bundle_id: str,
        dim: int,
        shards: Mapping[str, Sequence[np.ndarray]],
        rows: dict[str, list[dict[str, Any]]],
        options: IndexOptions,
        dataset: dict[str, Any],
        bundle_path: str | Path | None = None,
        skipped: dict[str, dict[str, Any]] | None = None,
    ) -> str:
        """Build the sides that have rows into a new version and make it current."""
        self.check_options(options, dim)
        present = check_gallery(shards, rows)
        counts = {side: len(rows[side]) for side in present}
        starts = np.cumsum([0, *counts.values()])
        batches = {
            side: batches_from_shards(rows[side], shards[side], int(start))
            for side, start in zip(present, starts, strict=False)
        }
        queries = {
            side: sample_rows(shards[query_side(side, counts)], options.queries, seed=1)
            for side in present
        }
        draft = Draft(
            bundle_id=bundle_id,
            bundle_path=bundle_path,
            dim=dim,
            dataset=dataset,
            parent=None,
            next_row=sum(counts.values()),
            counts=counts,
            batches=batches,
            queries=queries,
            target=options.target_recall,
            skipped=skipped or {},
        )
        return self._write(draft)

    def apply(
        self, current: MilvusVersion, plan: Plan, dataset: dict[str, Any], bundle_path: Any
    ) -> str:
        """`plan` applied in place to `current`'s collection (`change.apply_in_place`: no new
        version), made current if it was not; `current` sees the change on return. Returns
        its version."""
        with build_lock(self.root):
            info = self._recover().get(current.version)
            if info is None:
                raise FileNotFoundError(f"index version {current.version} is gone")
            info = apply_in_place(
                self.client, self.uri, self.records, current.collection, info, plan, dataset
            )
            current.update(info)
            if self.current() != current.version:
                self.switch(current.version)
            self._collect()
        return current.version

    def changes(self, version: str | None = None) -> list[dict[str, Any]]:
        """The change log of a version (default: the alias's), oldest first."""
        version = version or self._require_current()
        keys = [
            change_key(version, n)
            for n in range(1, int(self.read_info(version).get("changes", 0)) + 1)
        ]
        found: list[dict[str, Any]] = []
        with errors(self.uri, f"read the changes of {version}"):
            for start in range(0, len(keys), BATCH):
                found += self.client.get(
                    self.records,
                    ids=keys[start : start + BATCH],
                    output_fields=["info"],
                    consistency_level="Strong",
                )
        return sorted((json.loads(e["info"]) for e in found), key=lambda e: int(e["change"]))

    def _recover(self) -> dict[str, dict[str, Any]]:
        """Finish or undo the changes a killed writer left pending (`change.recover`); the
        versions' records after that."""
        infos = self._records(self.versions())
        for version, info in infos.items():
            if info.get("pending"):
                collection = self.collection_of(version)
                infos[version] = recover(self.client, self.uri, self.records, collection, info)
        return infos

    def _write(self, draft: Draft) -> str:
        """Fill, index, measure and record a new version's collection, then switch to it; a
        failure drops the collection and leaves the alias as it was."""
        with build_lock(self.root):
            self._recover()
            self._clear_debris()
            self._ensure_records()
            version = next_version_name(self.versions())
            collection = self.collection_of(version)
            try:
                kind, params = self.config.milvus_index, self.config.milvus_params
                info = build_collection(self.client, self.uri, collection, draft, kind, params)
                info = info_record(
                    version,
                    draft.bundle_id,
                    draft.bundle_path,
                    draft.dim,
                    draft.dataset,
                    draft.parent,
                    info,
                )
                info.update(backend="milvus", collection=collection, next_row=draft.next_row)
                write_records(self.client, self.uri, self.records, {version: info}, flush=True)
            except BaseException:
                self._drop(collection)
                raise
            self.switch(version)
            self._prune()
            self._collect()
        return version

    # -- records, debris and retention -----------------------------------------------------

    def _ensure_records(self) -> None:
        from pymilvus import DataType

        if self.client.has_collection(self.records):
            return
        with errors(self.uri, f"create collection {self.records}"):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("version", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("info", DataType.VARCHAR, max_length=RECORD_LENGTH)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one
            self.client.create_collection(self.records, schema=schema)
            add_index(self.client, self.records, "FLAT", {})
            wait_indexed(self.client, self.records)
            self.client.load_collection(self.records)

    def _clear_debris(self) -> None:
        """Collections of builds that never completed (no record), from a killed writer."""
        complete = set(self.versions())
        with errors(self.uri, "list collections"):
            for collection in self.client.list_collections():
                match = _COLLECTION.match(collection)
                if match and match["name"] == self.name:
                    version = f"v{match['n']}-{match['t']}"
                    if version not in complete:
                        log.warning("dropping %s, left by a build that did not finish", collection)
                        self.client.drop_collection(collection)

    def _prune(self) -> None:
        live = self.current()
        old = [v for v in self.versions() if v != live]
        for version in old[: max(0, len(old) - (self.keep - 1))]:
            changes = int(self.read_info(version).get("changes", 0))
            keys = [version, *(change_key(version, n) for n in range(1, changes + 1))]
            with errors(self.uri, f"drop version {version}"):
                self.client.drop_collection(self.collection_of(version))
                self.client.delete(self.records, ids=keys)  # its record and change log
            log.info("removed old index version %s", version)

    def _collect(self) -> None:
        """Uploads no kept version names go (a pass over the image rows of every kept
        version, when there are uploads: a service's changes)."""
        try:
            self.collect_files()
        except OSError as exc:  # housekeeping: the published version stands regardless
            log.warning("could not collect unused files under %s: %s", self.root, exc)

    def collect_files(self, grace_s: float = FILES_GRACE_S) -> list[str]:
        """Remove the uploads under `files/` that no kept version's image rows name (see
        `collect_stored_files`, the FAISS store's rule); returns the names removed."""
        if not (self.root / FILES_DIR).is_dir():
            return []
        named: set[str] = set()
        for version in self.versions():
            info = self.read_info(version)
            if "next_row" not in info:  # cannot tell what it names: collect nothing
                return []
            collection = self.collection_of(version)
            with errors(self.uri, f"read the files {collection} names"):
                self.client.load_collection(collection)
                for low in range(0, int(info["next_row"]), BATCH):
                    found = self.client.query(
                        collection,
                        filter=f"row >= {low} and row < {low + BATCH}",
                        output_fields=["item"],
                        partition_names=["image"],
                        limit=BATCH,
                    )
                    named |= {Path(str((e.get("item") or {}).get("image"))).name for e in found}
        return collect_stored_files(self.root, named, grace_s)

    def _drop(self, collection: str) -> None:
        try:
            self.client.drop_collection(collection)
        except Exception as exc:  # the build's own error matters more; the next build retries
            log.warning("could not drop %s (the next build will): %s", collection, exc)

    def _require_current(self) -> str:
        current = self.current()
        if current is None:
            raise FileNotFoundError(
                f"no index in {self.location}: the alias {self.name!r} does not exist "
                "(build one with `cots index build --backend milvus`)"
            )
        return current
