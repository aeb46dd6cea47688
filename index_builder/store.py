"""The index root: versioned index directories and an atomic CURRENT pointer.

    root/
      CURRENT                  name of the live version (replaced atomically)
      versions/<version>/      index.json, image.faiss, images.jsonl, text.faiss, texts.jsonl
      staging/<version>/       a build in progress (never read; removed by the next build)

A version is written into `staging/`, renamed into `versions/` when complete, and only then
does CURRENT move; a build killed at any point leaves CURRENT where it was. Older versions
are removed beyond a retention limit (never the live one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import filters
from index_builder.atomic import atomic_write_text, read_json
from index_builder.filters import Columns
from index_builder.rows import CorruptIndex, JsonlRows, KeyIndex, Metas, key_indexes, line_spans

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
INDEX_JSON = "index.json"
CURRENT = "CURRENT"
SIDES = ("image", "text")
# Text-to-image search queries the image index; image-to-text search the text index.
META_FILES = {"image": "images.jsonl", "text": "texts.jsonl"}
INDEX_FILES = {"image": "image.faiss", "text": "text.faiss"}
# Row-aligned float32 unit vectors (exact filtered search, changes without re-embedding) and
# tombstoned row numbers (deleted or replaced items, skipped by every search).
VECTOR_FILES = {"image": "image.npy", "text": "text.npy"}
DELETED_FILES = {"image": "image.deleted.npy", "text": "text.deleted.npy"}
# A version name, e.g. v000042-20250101T120000Z (ASCII digits; whole string, no newline).
VERSION_PATTERN = r"^v([0-9]{6})-[0-9]{8}T[0-9]{6}Z$"
_VERSION = re.compile(VERSION_PATTERN.removeprefix("^").removesuffix("$"))
# Files kept by content under root/files/ (`sources.store_file`), and how long one no version
# names is kept anyway: a build may have stored it and not yet published.
FILES_DIR = "files"
FILES_GRACE_S = 3600.0
_STORED = re.compile(r"[0-9a-f]{64}\.[A-Za-z0-9]{1,8}")
_STORED_IN = re.compile(rb"[0-9a-f]{64}\.[A-Za-z0-9]{1,8}")


def is_version_name(name: str) -> bool:
    """A version's name as builds make them: never a path, so never outside the root."""
    return _VERSION.fullmatch(name) is not None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_bundle(bundle: Any, info: dict[str, Any], version: str) -> None:
    """Refuse a bundle other than the one that embedded a version, from its index.json alone
    (cheap enough to run before the version's indexes are read)."""
    if int(bundle.embed_dim) != int(info["embed_dim"]):
        raise ValueError(
            f"bundle {bundle.bundle_id} embeds in {bundle.embed_dim} dimensions but index "
            f"version {version} holds {info['embed_dim']}-dimensional vectors"
        )
    if bundle.bundle_id != info["bundle_id"]:
        raise ValueError(
            f"index version {version} was built with bundle {info['bundle_id']}, "
            f"not {bundle.bundle_id}; rebuild it with `cots index rebuild`"
        )


def check_query(index: Any, side: str, vectors: np.ndarray, k: int) -> np.ndarray:
    """The query vectors as a contiguous float32 (Q, D) array; an absent side, a wrong shape
    or k < 1 is refused (every backend's search starts here)."""
    if not index.has(side):
        raise LookupError(f"index version {index.version} has no {side} side")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != index.embed_dim:
        raise ValueError(
            f"query vectors must have shape (Q, {index.embed_dim}), got {vectors.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return vectors


@dataclass
class LoadedIndex:
    """One version in memory: the FAISS index, rows (memory-mapped, parsed when read),
    stored vectors and tombstones of each present side, and `index.json`. Either side may be
    absent (a photo folder has no texts)."""

    version: str
    path: Path
    info: dict[str, Any]
    row_files: dict[str, JsonlRows]
    indexes: dict[str, Any] = field(repr=False)
    vectors: dict[str, np.ndarray | None] = field(repr=False)
    deleted: dict[str, np.ndarray | None] = field(repr=False)
    _columns: dict[str, Columns] = field(default_factory=dict, repr=False)
    _keys: dict[str, dict[str, KeyIndex]] = field(default_factory=dict, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def bundle_id(self) -> str:
        return str(self.info["bundle_id"])

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(side for side in SIDES if side in self.indexes)

    def has(self, side: str) -> bool:
        return side in self.indexes

    @property
    def images(self) -> Sequence[dict[str, Any]]:
        return self.rows("image")

    @property
    def texts(self) -> Sequence[dict[str, Any]]:
        return self.rows("text")

    def rows(self, side: str) -> Sequence[dict[str, Any]]:
        """Every row of a side, tombstoned ones included (row numbers are stable); read-only,
        each row parsed when read."""
        return self.row_files.get(side, ())

    def live_count(self, side: str) -> int:
        deleted = self.deleted.get(side)
        return len(self.rows(side)) - (0 if deleted is None else int(deleted.sum()))

    def row_of(self, side: str, item_id: str) -> int | None:
        """The live row holding `item_id` (the last, should several), or None."""
        stored = self.rows(side)
        found = [
            i for i in self._keyed(side, "id").find(item_id) if str(stored[i]["id"]) == item_id
        ]
        return found[-1] if found else None

    def rows_of(self, side: str, item_ids: Iterable[str]) -> dict[str, int]:
        """The live rows of those of `item_ids` present on `side` (id -> row)."""
        found = {item_id: self.row_of(side, item_id) for item_id in item_ids}
        return {item_id: row for item_id, row in found.items() if row is not None}

    def rows_at(self, side: str, rows: Sequence[int]) -> list[dict[str, Any]]:
        """The stored rows (id, content, meta) at row numbers `rows`."""
        stored = self.rows(side)
        return [stored[int(row)] for row in rows]

    def caption_rows(self, image_ids: set[str]) -> list[int]:
        """Live text rows that describe one of `image_ids` (their `image_id`)."""
        keyed, stored = self._keyed("text", "image_id"), self.rows("text")
        found = {i for image_id in image_ids for i in keyed.find(image_id)}
        return [i for i in sorted(found) if stored[i].get("image_id") in image_ids]

    def _keyed(self, side: str, name: str) -> KeyIndex:
        """The live rows of `side` by `name` ("id"; a text's "image_id"), built on first use
        in one pass over the side's rows."""
        if side not in self._keys:
            names = ("id", "image_id") if side == "text" else ("id",)
            deleted = self.deleted.get(side)
            live = None if deleted is None else ~deleted
            self._keys[side] = key_indexes(self.rows(side), live, names)
        return self._keys[side][name]

    def check_files(self) -> None:
        """Refuse (CorruptIndex) to read memory-mapped files truncated since they were loaded
        (SIGBUS otherwise): a few fstat calls, before every search."""
        for side in self.sides:
            rows = self.row_files.get(side)
            if isinstance(rows, JsonlRows):
                rows.check()
            vectors = self.vectors.get(side)
            mapped = getattr(vectors, "_mmap", None)
            if mapped is not None and mapped.size() < vectors.offset + vectors.nbytes:  # type: ignore[union-attr]
                name = self.info["sides"][side].get("vectors")
                raise CorruptIndex(
                    f"index version {self.version}: {name} was truncated after it was loaded"
                )

    def vector(self, side: str, row: int) -> np.ndarray:
        """The stored unit vector of one row."""
        self.check_files()
        stored = self.vectors.get(side)
        if stored is not None:
            return np.asarray(stored[row], dtype=np.float32)
        return np.asarray(self.indexes[side].reconstruct(int(row)), dtype=np.float32)

    def check_bundle(self, bundle: Any) -> None:
        """Refuse a bundle other than the one that embedded this index."""
        check_bundle(bundle, self.info, self.version)

    def count(self, side: str, filter: dict[str, Any] | None = None) -> int:
        """Live rows of `side` whose metadata satisfies `filter`."""
        mask = self.filter_mask(side, filter)
        if mask is None:
            return self.live_count(side)
        deleted = self.deleted.get(side)
        return int((mask if deleted is None else mask & ~deleted).sum())

    def filter_mask(self, side: str, filter: dict[str, Any] | None) -> np.ndarray | None:
        """Rows of `side` whose metadata satisfies `filter` (None: no filter); a filter that
        does not fit the side's fields is a FilterError."""
        clauses = filters.parse(filter, self.info["sides"][side].get("fields", {}))
        if not clauses:
            return None
        return self._columns_of(side).mask(clauses)

    def warm(self, side: str) -> None:
        """Build the id lookups and, in one pass, the filter columns of every metadata field
        of `side` now (a service does, off the event loop, when it loads a version)."""
        self.row_of(side, "")
        self._columns_of(side).build(self.info["sides"][side].get("fields", {}))

    def _columns_of(self, side: str) -> Columns:
        if side not in self._columns:
            self._columns[side] = Columns(Metas(self.rows(side)))
        return self._columns[side]

    def search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        mask: np.ndarray | None = None,
        *,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product on one side among live rows (and where `mask` is True, the
        metadata satisfies `filter`, and the row is not `exclude`): (scores (Q, k'), rows
        (Q, k')) with k' = min(k, live rows); -1 pads missing rows."""
        vectors = check_query(self, side, vectors, k)
        self.check_files()
        wanted = self.filter_mask(side, filter)
        if wanted is not None:
            mask = wanted if mask is None else mask & wanted
        if exclude is not None:
            mask = np.ones(len(self.rows(side)), bool) if mask is None else mask.copy()
            mask[exclude] = False
        deleted = self.deleted.get(side)
        if deleted is not None:
            mask = ~deleted if mask is None else mask & ~deleted
        from index_builder.faiss_index import search_index

        rerank = int(self.info["sides"][side]["search_params"].get("rerank", 1))
        return search_index(self.indexes[side], self.vectors.get(side), vectors, k, mask, rerank)


def load_side(loaded: LoadedIndex, side: str, side_info: dict[str, Any]) -> None:
    """Read one side's index, rows, vectors (memory-mapped) and tombstones into `loaded`."""
    from index_builder.faiss_index import read_index

    path, version = loaded.path, loaded.version
    index = read_index(path / side_info["file"], side_info["search_params"])
    rows = JsonlRows(path / side_info["meta"])
    if index.ntotal != len(rows):
        raise ValueError(
            f"index version {version} is inconsistent: {side} index holds "
            f"{index.ntotal} vectors for {len(rows)} rows"
        )
    vectors = None
    if side_info.get("vectors"):
        try:
            vectors = np.load(path / side_info["vectors"], mmap_mode="r")
        except ValueError as exc:  # numpy: "mmap length is greater than file size"
            raise CorruptIndex(
                f"index version {version} is truncated or damaged: {side_info['vectors']} "
                f"cannot be mapped ({exc})"
            ) from None
        if vectors.shape != (len(rows), loaded.embed_dim):
            raise ValueError(
                f"index version {version} is inconsistent: {side} vectors have shape "
                f"{vectors.shape} for {len(rows)} rows"
            )
    deleted = None
    if side_info.get("deleted_file"):
        deleted = np.zeros(len(rows), dtype=bool)
        deleted[np.load(path / side_info["deleted_file"])] = True
    loaded.indexes[side], loaded.row_files[side] = index, rows
    loaded.vectors[side], loaded.deleted[side] = vectors, deleted


class IndexStore:
    """The versions under one index root."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def location(self) -> str:
        """Where the versions live, for messages."""
        return str(self.root)

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if is_version_name(p.name))

    def current(self) -> str | None:
        pointer = self.root / CURRENT
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        return name or None

    def version_dir(self, version: str) -> Path:
        if not is_version_name(version):
            raise ValueError(
                f"{version[:40]!r} is not an index version name (vNNNNNN-YYYYMMDDTHHMMSSZ)"
            )
        return self.versions_dir / version

    def read_info(self, version: str | None = None) -> dict[str, Any]:
        version = version or self._require_current()
        path = self.version_dir(version) / INDEX_JSON
        if not path.is_file():
            raise FileNotFoundError(f"index version {version} not found under {self.root}")
        return read_json(path)

    def open(self, version: str | None = None, bundle: Any = None) -> LoadedIndex:
        """Load a version (default: CURRENT); with `bundle`, refuse a mismatched one."""
        version = version or self._require_current()
        info = self.read_info(version)
        if bundle is not None:
            check_bundle(bundle, info, version)
        path = self.version_dir(version)
        loaded = LoadedIndex(version, path, info, {}, {}, {}, {})
        for side, side_info in info["sides"].items():
            load_side(loaded, side, side_info)
        return loaded

    @contextlib.contextmanager
    def new_version(self) -> Iterator[Path]:
        """Yield an empty staging directory; publish it when the block ends without error.

        One build at a time per root (an advisory lock). On error the staging directory is
        removed and CURRENT is untouched; a killed build leaves only staging debris, which
        the next build clears.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with build_lock(self.root):
            staging_root = self.root / "staging"
            shutil.rmtree(staging_root, ignore_errors=True)
            version = next_version_name(self.versions())
            staging = staging_root / version
            staging.mkdir(parents=True)
            try:
                yield staging
                self._publish(staging, version)
            finally:
                shutil.rmtree(staging_root, ignore_errors=True)

    def publish(self, **build: Any) -> str:
        """A new version built from rows and vectors (`index_builder.build.publish`)."""
        from index_builder.build import publish

        return publish(self, **build)

    def apply(
        self, current: LoadedIndex, plan: Any, dataset: dict[str, Any], bundle_path: Any
    ) -> str:
        """A new version: `current` with a planned change (`index_builder.collection`)."""
        from index_builder.collection import write_change

        return write_change(self, current, plan, dataset, bundle_path)

    def switch(self, version: str) -> None:
        """Point CURRENT at an existing complete version (roll back or forward)."""
        if not (self.version_dir(version) / INDEX_JSON).is_file():
            raise FileNotFoundError(f"index version {version} not found under {self.root}")
        atomic_write_text(self.root / CURRENT, version + "\n")

    def _publish(self, staging: Path, version: str) -> None:
        if not (staging / INDEX_JSON).is_file():
            raise RuntimeError(f"build left no {INDEX_JSON} in {staging}")
        self.versions_dir.mkdir(exist_ok=True)
        _fsync_tree(staging)
        os.replace(staging, self.version_dir(version))
        self.switch(version)
        log.info("index version %s is now current under %s", version, self.root)
        self._prune()

    def _prune(self) -> None:
        live = self.current()
        old = [v for v in self.versions() if v != live]
        for version in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(self.version_dir(version), ignore_errors=True)
            log.info("removed old index version %s", version)
        try:
            self.collect_files()
        except OSError as exc:  # housekeeping: the published version stands regardless
            log.warning("could not collect unused files under %s: %s", self.root, exc)

    def collect_files(self, grace_s: float = FILES_GRACE_S) -> list[str]:
        """Remove the files under `files/` that no kept version names (see
        `collect_stored_files`); returns the names removed."""
        files = self.root / FILES_DIR
        if not files.is_dir():
            return []
        named: set[str] = set()
        for version in self.versions():
            path = self.version_dir(version)
            for side in SIDES:
                if (path / META_FILES[side]).is_file():
                    dead = path / DELETED_FILES[side]
                    tombstones = np.load(dead) if dead.is_file() else None
                    named |= _names_in(path / META_FILES[side], tombstones)
        return collect_stored_files(self.root, named, grace_s)

    def _require_current(self) -> str:
        current = self.current()
        if current is None:
            raise FileNotFoundError(
                f"no index under {self.root} (build one with `cots index build`)"
            )
        return current


def collect_stored_files(root: Path, named: set[str], grace_s: float = FILES_GRACE_S) -> list[str]:
    """Remove the files under `root/files/` (uploads and WebDataset images, stored by content)
    that neither `named` (the names the kept versions hold) nor an embedding or change in
    progress (`work/`, `staging/`) names, and that were not stored or wanted in the last
    `grace_s` seconds (a build may be about to name them); the uploads of a change whose
    process died (kill -9; its journal under work/ outlived it) go at once. Returns the
    names removed."""
    files = root / FILES_DIR
    if not files.is_dir():
        return []
    present = {p.name for p in files.iterdir() if _STORED.fullmatch(p.name)}
    orphaned = _orphaned_uploads(root / "work", grace_s)
    if not present:
        return []
    named = set(named)
    for folder in (root / "work", root / "staging"):
        if folder.is_dir():
            for path in folder.rglob("*.json*"):
                named |= _names_in(path)
    cutoff = time.time() - grace_s
    removed = []
    for name in sorted(present - named):
        path = files / name
        with contextlib.suppress(FileNotFoundError):
            if name in orphaned or path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(name)
    if removed:
        log.info("removed %d stored files no index version names", len(removed))
    return removed


@contextlib.contextmanager
def journal_uploads(root: Path, names: Iterable[str]) -> Iterator[None]:
    """Name the files a change is about to store under `files/` in a journal under `work/`
    for as long as the change runs: `collect_stored_files` spares them meanwhile, and if
    this process dies first (kill -9), the next collection removes those no version names
    at once instead of an hour later. The journal is named for this host and process (its
    id and start time, so a restarted container that reuses the id is not taken for it)."""
    names = sorted(names)
    if not names:
        yield
        return
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    journal = work / f"{_JOURNAL_PREFIX}{os.uname().nodename}-{pid}-{_started(pid)}.json"
    atomic_write_text(journal, json.dumps(names))
    try:
        yield
    finally:
        journal.unlink(missing_ok=True)


_JOURNAL_PREFIX = "uploads-"
_JOURNAL = re.compile(r"uploads-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)\.json")


def _started(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat); 0 where unknown
    (not Linux), -1 when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return -1
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command in ()


def _orphaned_uploads(work: Path, grace_s: float) -> set[str]:
    """The names in upload journals whose process is gone (this host) or that are older than
    `grace_s` (another host's); those journals are removed."""
    if not work.is_dir():
        return set()
    host = os.uname().nodename
    cutoff = time.time() - grace_s
    orphaned: set[str] = set()
    for journal in work.glob(f"{_JOURNAL_PREFIX}*.json"):
        match = _JOURNAL.fullmatch(journal.name)
        if match is None:
            continue
        try:
            start = _started(int(match["pid"])) if match["host"] == host else 0
            alive = start != 0 and start == int(match["start"])
            gone = start != 0 and not alive  # this host's, and provably dead
            if alive or not (gone or journal.stat().st_mtime < cutoff):
                continue  # its change may still be running
            names = json.loads(journal.read_text())
            journal.unlink()
        except (OSError, ValueError):
            continue
        if gone:  # else (another host's, or unknown) its files fall back to the grace period
            orphaned |= {n for n in names if isinstance(n, str) and _STORED.fullmatch(n)}
    return orphaned


def _names_in(path: Path, tombstones: np.ndarray | None = None) -> set[str]:
    """The stored file names (`<sha256>.<ext>`) a file mentions, found by a regular
    expression over its bytes (no JSON parsing), except on the lines of JSONL rows numbered
    in `tombstones` (deleted or replaced items)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return set()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = [(m.start(), m.group().decode()) for m in _STORED_IN.finditer(data)]
            if tombstones is None or not len(tombstones) or not found:
                return {name for _, name in found}
            starts = line_spans(data)[:, 0]
    dead = np.zeros(len(starts), dtype=bool)
    dead[tombstones] = True
    rows = np.searchsorted(starts, [offset for offset, _ in found], side="right") - 1
    return {name for (_, name), row in zip(found, rows.tolist(), strict=True) if not dead[row]}


def next_version_name(existing: Iterable[str]) -> str:
    """The name after the highest of `existing`: v<number>-<UTC time>."""
    numbers = [int(m.group(1)) for v in existing if (m := _VERSION.fullmatch(v))]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"v{max(numbers, default=0) + 1:06d}-{stamp}"


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One writer at a time per index root (an advisory lock on `root/.lock`)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build is writing to {root}") from None
        yield


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
