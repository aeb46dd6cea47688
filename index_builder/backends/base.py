"""The backend contract: what every store of index versions provides, and the parts of it
both backends share (sides, version names, the build lock, the bundle check, the version
record, the index options and the planned change a backend applies).

    faiss   (default) FAISS files under an index root, loaded into the searching process:
            `index_builder.backends.faiss`
    milvus  a Milvus server (or a milvus-lite file): one collection per version and an alias
            naming the current one: `index_builder.backends.milvus`

Both keep one contract. A build writes a new version and only then moves the current
pointer, in one atomic step (the CURRENT file, `alter_alias`), so a failed or killed writer
leaves the serving version as it was. A change (add, upsert, delete) differs by backend
(`Store.in_place`): FAISS writes it as a new version the same way (a version is immutable
once published); Milvus changes the rows of the current version's collection in place and
logs the change (`backends/milvus/change.py`: what a version means there, consistency, and
a change killed halfway). A version
records the bundle that embedded it (`info`: the keys of `info_record`) and is refused with
another bundle. Rows are opaque non-negative integers, stable within a version; search
results pad with -1. No backend imports another; the backend-free stages (`build`,
`collection`, `search`) reach one only through `Store` and `Version`.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

BACKENDS = ("faiss", "milvus")
FORMAT_VERSION = 2
SIDES = ("image", "text")
# Text-to-image search queries the image index; image-to-text search the text index. A side's
# recall is measured with the other side's vectors as queries when it has them.
OTHER = {"image": "text", "text": "image"}
# A side's rows as JSONL (in a FAISS version and in an embedding work directory).
META_FILES = {"image": "images.jsonl", "text": "texts.jsonl"}
# A version name, e.g. v000042-20250101T120000Z (ASCII digits; whole string, no newline).
VERSION_PATTERN = r"^v([0-9]{6})-[0-9]{8}T[0-9]{6}Z$"
_VERSION = re.compile(VERSION_PATTERN.removeprefix("^").removesuffix("$"))
EMPTIED = "the change would leave the index empty; build a new one instead"
RECALL_QUERIES = 200  # recall@10 after a change to within ~0.01, in a second at 100k


class CorruptIndex(OSError):
    """A version's file changed or was damaged on disk after it was loaded (truncated under
    a memory map: reading it would kill the process with SIGBUS)."""


class BackendFailed(OSError):
    """The index backend (a Milvus server) failed or could not be reached: nothing is wrong
    with the request, and it may succeed later (a service answers 503)."""


class BackendUnreachable(BackendFailed, ConnectionError):
    """The backend cannot be reached (down, or the network)."""


class BackendRefused(BackendFailed, PermissionError):
    """The backend refused the credentials."""


@dataclass(frozen=True)
class BackendConfig:
    """Which backend holds the versions and how to reach it (`faiss` needs nothing beyond
    the index root). The Milvus token comes from the environment (COTS_MILVUS_TOKEN), never
    from a command line."""

    name: str = "faiss"
    milvus_uri: str | None = None
    milvus_token: str | None = field(default=None, repr=False)
    milvus_collection: str = "cots"
    milvus_index: str = "AUTO"
    milvus_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"unknown backend {self.name!r} (use {' or '.join(BACKENDS)})")
        if self.name == "milvus" and not self.milvus_uri:
            raise ValueError(
                "the milvus backend needs a URI: --milvus-uri (or COTS_MILVUS_URI), "
                "a milvus-lite file path ending in .db or http://host:19530"
            )


@dataclass(frozen=True)
class IndexOptions:
    """How to index each side; `factory` None chooses from the gallery size and budget
    (`factory` and `on_disk` are FAISS's; a Milvus store refuses them)."""

    factory: str | None = None
    memory_budget: int = 4 << 30
    target_recall: float = 0.95
    queries: int = 1000
    on_disk: bool = False
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.memory_budget <= 0:
            raise ValueError(f"memory budget must be positive, got {self.memory_budget}")


@dataclass
class Plan:
    """A change resolved against a version (`collection.change`): rows to append (with their
    vectors) and rows to drop, per side; what `Store.apply` writes."""

    rows: dict[str, list[dict[str, Any]]]
    vectors: dict[str, np.ndarray]
    gone: dict[str, set[int]]


class BundleIdentity(Protocol):
    """What a version checks of a bundle (an `index_builder.bundle.Bundle`): the id and
    dimension recorded in every version it embedded."""

    @property
    def bundle_id(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...


@dataclass(frozen=True)
class Hit:
    """One search hit: its row, rank (1-based, over the whole ranking), score and the row's
    stored record (what `rows_at` returns: id, content, meta), read by the same search."""

    row: int
    rank: int
    score: float
    item: dict[str, Any]


def ranked_hits(
    scores: np.ndarray,
    rows: np.ndarray,
    offset: int,
    items: Mapping[int, dict[str, Any]],
) -> list[list[Hit]]:
    """Per query, the hits ranked offset+1 onwards of a (scores, rows) ranking (-1 padding
    left out), each with its record from `items` (row -> record)."""
    return [
        [
            Hit(int(r), rank, float(s), items[int(r)])
            for rank, (s, r) in enumerate(zip(qs[offset:], qr[offset:], strict=True), offset + 1)
            if r >= 0
        ]
        for qs, qr in zip(scores, rows, strict=True)
    ]


def check_offset(offset: int) -> None:
    """A page starts at rank offset+1: a negative offset is refused (every `find` starts
    here)."""
    if offset < 0:
        raise ValueError(f"offset must be at least 0, got {offset}")


def found_rows(rows: np.ndarray, offset: int) -> list[int]:
    """The distinct rows (ascending) of a ranking from rank offset+1 on: those whose
    records a search reads."""
    return sorted({int(r) for r in rows[:, offset:].ravel() if r >= 0})


class Version(Protocol):
    """One loaded, immutable index version."""

    version: str
    info: dict[str, Any]

    @property
    def embed_dim(self) -> int: ...

    @property
    def bundle_id(self) -> str: ...

    @property
    def sides(self) -> tuple[str, ...]: ...

    def has(self, side: str) -> bool: ...

    def live_count(self, side: str) -> int: ...

    def count(self, side: str, filter: dict[str, Any] | None = None) -> int: ...

    def row_of(self, side: str, item_id: str) -> int | None: ...

    def rows_of(self, side: str, item_ids: Iterable[str]) -> dict[str, int]: ...

    def rows_at(self, side: str, rows: Sequence[int]) -> list[dict[str, Any]]: ...

    def caption_rows(self, image_ids: set[str]) -> list[int]: ...

    def vector(self, side: str, row: int) -> np.ndarray: ...

    def check_bundle(self, bundle: BundleIdentity) -> None: ...

    def warm(self, side: str) -> None:
        """Build what searches of `side` need (id lookups, filter columns) now, so that no
        request pays for a pass over every row."""

    def search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ranking: (scores (Q, k'), rows (Q, k')), k' = min(k, allowed rows), -1 pads."""

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
        """Per query, the hits ranked offset+1 .. offset+k with their rows' records, read
        in the same pass as the search (FAISS: one batched read; Milvus: output fields of
        the one search call), so no caller looks a hit's row up again."""


V = TypeVar("V", bound=Version)


class Store(Protocol[V]):
    """The versions of one index: read, open, switch, publish and change; `V` is the
    `Version` its `open` returns and its `apply` starts from."""

    root: Path  # local working directory: embedding work files, copied images, uploads
    in_place: bool  # a change updates the version it is applied to (else: a new version)

    @property
    def location(self) -> str: ...

    def versions(self) -> list[str]: ...

    def current(self) -> str | None: ...

    def read_info(self, version: str | None = None) -> dict[str, Any]: ...

    def open(self, version: str | None = None, bundle: BundleIdentity | None = None) -> V: ...

    def switch(self, version: str) -> None: ...

    def check_options(self, options: IndexOptions, dim: int) -> None:
        """Refuse options this backend cannot build with, before any embedding work."""

    def verify(self, version: str | None = None) -> list[str]:
        """Problems with a version's stored data (default: the current one's); empty when all
        is well (`cots index verify`)."""

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
        """A new version built from rows and their vectors, made current; its name."""

    def apply(
        self, current: V, plan: Plan, dataset: dict[str, Any], bundle_path: str | Path | None
    ) -> str:
        """`current` (a version this store opened) with `plan` applied, made current; its
        name: a new version's, or with `in_place` `current`'s, which then sees the change."""


def is_version_name(name: str) -> bool:
    """A version's name as builds make them: never a path, so never outside the root."""
    return _VERSION.fullmatch(name) is not None


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


def check_bundle(bundle: BundleIdentity, info: dict[str, Any], version: str) -> None:
    """Refuse a bundle other than the one that embedded a version, from its record alone
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


def check_vectors(index: Version, side: str, vectors: np.ndarray, k: int) -> np.ndarray:
    """The query vectors as a contiguous float32 (Q, D) array; an absent side, a wrong shape
    or k < 1 is refused (every backend's search starts here; not the service's check of a
    request's side and filter, `service.engine.check_side_and_filter`)."""
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


def check_gallery(
    shards: Mapping[str, Sequence[np.ndarray]], rows: Mapping[str, list[dict[str, Any]]]
) -> list[str]:
    """The sides that have rows (a side without rows is absent from the version: a photo
    folder has no captions, a text corpus no images); refused when none has, or when a
    side's vectors and rows do not pair up."""
    present = [side for side in SIDES if rows.get(side)]
    if not present:
        raise ValueError("empty gallery: no images and no texts to index")
    for side in present:
        if sum(len(s) for s in shards[side]) != len(rows[side]):
            raise ValueError(f"{side} side: vector count does not match the metadata rows")
    return present


def info_record(
    version: str,
    bundle_id: str,
    bundle_path: str | Path | None,
    dim: int,
    dataset: dict[str, Any],
    parent: str | None,
    sides: dict[str, Any],
) -> dict[str, Any]:
    """What a version records about itself (FAISS's index.json; a Milvus version's record)."""
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle_id": bundle_id,
        "bundle_path": str(Path(bundle_path).resolve()) if bundle_path else None,
        "embed_dim": dim,
        "metric": "inner_product",
        "dataset": dataset,
        "parent": parent,
        "sides": sides,
    }


def ivf_lists(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two), with at least 39 training points per list
    (FAISS's IVF factories and Milvus's nlist)."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(max(target, 1))))
    while nlist > 1 and n / nlist < 39:
        nlist //= 2
    return max(1, nlist)
