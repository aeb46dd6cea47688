"""The FAISS backend's store: the index root, versioned index directories and an atomic
CURRENT pointer.

    root/
      CURRENT                  name of the live version (replaced atomically)
      versions/<version>/      index.json; per side a base segment (image.faiss, image.npy,
                               images.jsonl, images.id.keys.npy, images.columns.npz: id
                               lookups and filter columns), delta segments written by
                               changes (image.d1.faiss, image.d1.npy, images.d1.jsonl, ...)
                               and tombstones (image.deleted.npy)
      staging/<version>/       a build in progress (never read; removed by the next build)
      resume/<side>-<key>/     a large index build's trained index and parts (kept when the
                               build is killed, resumed by the next build of the same gallery)

A version is written into `staging/`, renamed into `versions/` when complete, and only then
does CURRENT move; a build killed at any point leaves CURRENT where it was. Older versions
are removed beyond a retention limit (never the live one).

A change writes only its delta segment and tombstones; the unchanged segments are carried
into the new version's directory: copied while a side's carried files are under
`segments.SHARE_BYTES` (1 GB), above it hard-linked and made read-only, with their size and
blake2b checksum in `index.json` (sizes checked at load, checksums by `cots index verify`).
Shared files live as long as any version linking them: pruning a version never removes a
file another kept version uses.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.atomic import atomic_write_text, read_json
from index_builder.backends.base import (
    BundleIdentity,
    IndexOptions,
    Plan,
    build_lock,
    check_bundle,
    check_gallery,
    is_version_name,
    next_version_name,
)
from index_builder.backends.faiss.faiss_index import make_index
from index_builder.backends.faiss.rows import line_spans
from index_builder.backends.faiss.segments import segment_infos, verify
from index_builder.backends.faiss.version import DELETED_FILES, INDEX_JSON, LoadedIndex, load_side
from index_builder.backends.faiss.write import write_change, write_version
from index_builder.stored_files import (
    FILES_DIR,
    FILES_GRACE_S,
    STORED_NAME_IN,
    collect_stored_files,
)

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
RESUME = "resume"  # a large build's progress, kept when it is killed (`write.index_side`)


class IndexStore:
    """The versions under one index root."""

    in_place = False  # a change is a new version

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

    def open(self, version: str | None = None, bundle: BundleIdentity | None = None) -> LoadedIndex:
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

    def check_options(self, options: IndexOptions, dim: int) -> None:
        """A factory string FAISS rejects fails here, before the embedding pass."""
        if options.factory:
            make_index(options.factory, dim)

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
        """Build the sides that have rows into a new version and make it current; returns the
        version name.

        `bundle_path` (the bundle's directory) is recorded so that a service following the index
        can load the bundle a version was built with; `skipped` (per side: count and examples of
        unreadable inputs) is recorded with each side."""
        check_gallery(shards, rows)  # before the lock and the staging directory
        with self.new_version() as staging:
            write_version(
                staging,
                bundle_id=bundle_id,
                dim=dim,
                shards=shards,
                rows=rows,
                options=options,
                dataset=dataset,
                bundle_path=bundle_path,
                skipped=skipped or {},
                resume=self.root / RESUME,
            )
        return staging.name

    def apply(
        self,
        current: LoadedIndex,
        plan: Plan,
        dataset: dict[str, Any],
        bundle_path: str | Path | None,
    ) -> str:
        """A new version: `current` with a planned change (`write.write_change`)."""
        current.check_files()  # a truncated memory map read below would be SIGBUS
        with self.new_version() as staging:
            write_change(staging, current, plan, dataset, bundle_path)
        return staging.name

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
        """Remove the files under `files/` that no live row of a kept version names (see
        `stored_files.collect_stored_files`); returns the names removed."""
        if not (self.root / FILES_DIR).is_dir():
            return []
        named: set[str] = set()
        for version in self.versions():
            path = self.version_dir(version)
            sides = read_json(path / INDEX_JSON)["sides"] if (path / INDEX_JSON).is_file() else {}
            for side, side_info in sides.items():
                dead = path / DELETED_FILES[side]
                tombstones = np.load(dead) if dead.is_file() else np.zeros(0, np.int64)
                start = 0
                for segment in segment_infos(side_info):
                    end = start + int(segment["rows"])
                    local = tombstones[(tombstones >= start) & (tombstones < end)] - start
                    named |= _names_in(path / segment["meta"], local)
                    start = end
        return collect_stored_files(self.root, named, grace_s)

    def verify(self, version: str | None = None) -> list[str]:
        """Problems with a version's files (`segments.verify`: missing files, shared files
        whose size or checksum differs from the recorded); empty when all is well."""
        version = version or self._require_current()
        return verify(self.version_dir(version), self.read_info(version))

    def _require_current(self) -> str:
        current = self.current()
        if current is None:
            raise FileNotFoundError(
                f"no index under {self.root} (build one with `cots index build`)"
            )
        return current


def _names_in(path: Path, tombstones: np.ndarray | None = None) -> set[str]:
    """The stored file names (`<sha256>.<ext>`) a file mentions, found by a regular
    expression over its bytes (no JSON parsing), except on the lines of JSONL rows numbered
    in `tombstones` (deleted or replaced items)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return set()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = [(m.start(), m.group().decode()) for m in STORED_NAME_IN.finditer(data)]
            if tombstones is None or not len(tombstones) or not found:
                return {name for _, name in found}
            starts = line_spans(data)[:, 0]
    dead = np.zeros(len(starts), dtype=bool)
    dead[tombstones] = True
    rows = np.searchsorted(starts, [offset for offset, _ in found], side="right") - 1
    return {name for (_, name), row in zip(found, rows.tolist(), strict=True) if not dead[row]}


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
