"""Search backends, one room each (`faiss`, `milvus`), behind the contract in `base`;
`open_store(root, BackendConfig(...))` picks one."""

from __future__ import annotations

from pathlib import Path

from index_builder.backends.base import BackendConfig, Store

__all__ = ["BackendConfig", "open_store"]  # picking a backend: the factory and its config


def open_store(root: str | Path, config: BackendConfig | None = None, keep: int = 3) -> Store:
    """The store of `config`'s backend (default: FAISS); `root` is the index root (faiss) or
    the local working directory (milvus). A Milvus that cannot be reached is an OSError here.
    Each backend is imported only when chosen (pymilvus only for Milvus)."""
    config = config or BackendConfig()
    if config.name == "milvus":
        from index_builder.backends.milvus.store import MilvusStore

        return MilvusStore(root, config, keep)
    from index_builder.backends.faiss.store import IndexStore

    return IndexStore(root, keep)
