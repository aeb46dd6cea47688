"""Search backends: what a loaded index version and a store of versions offer, and
`open_store`, which picks the implementation.

    faiss   (default) FAISS files under an index root, loaded into the searching process:
            `index_builder.store.IndexStore` and `LoadedIndex`
    milvus  a Milvus server (or a milvus-lite file): one collection per version and an alias
            naming the current one: `index_builder.backends.milvus`

Both keep one contract. A version is immutable once published; a build or a change writes a
new version and only then moves the current pointer, in one atomic step (the CURRENT file,
`alter_alias`), so a failed or killed writer leaves the serving version as it was. A version
records the bundle that embedded it (`info`: the same keys as FAISS's index.json) and is
refused with another bundle. Rows are opaque non-negative integers, stable within a version;
search results pad with -1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

BACKENDS = ("faiss", "milvus")


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

    def check_bundle(self, bundle: Any) -> None: ...

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
    ) -> tuple[np.ndarray, np.ndarray]: ...


class Store(Protocol):
    """The versions of one index: read, open, switch, publish and change."""

    root: Path  # local working directory: embedding work files, copied images, uploads

    @property
    def location(self) -> str: ...

    def versions(self) -> list[str]: ...

    def current(self) -> str | None: ...

    def read_info(self, version: str | None = None) -> dict[str, Any]: ...

    def open(self, version: str | None = None, bundle: Any = None) -> Version: ...

    def switch(self, version: str) -> None: ...

    def publish(
        self,
        *,
        bundle_id: str,
        dim: int,
        shards: Mapping[str, Sequence[np.ndarray]],
        rows: dict[str, list[dict[str, Any]]],
        options: Any,
        dataset: dict[str, Any],
        bundle_path: str | Path | None = None,
        skipped: dict[str, dict[str, Any]] | None = None,
    ) -> str: ...

    def apply(self, current: Any, plan: Any, dataset: dict[str, Any], bundle_path: Any) -> str: ...


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


def open_store(root: str | Path, config: BackendConfig | None = None, keep: int = 3) -> Store:
    """The store of `config`'s backend; `root` is the index root (faiss) or the local
    working directory (milvus). A Milvus that cannot be reached is an OSError here."""
    config = config or BackendConfig()
    if config.name == "milvus":
        from index_builder.backends.milvus import MilvusStore

        return MilvusStore(root, config, keep)
    from index_builder.store import IndexStore

    return IndexStore(root, keep)
