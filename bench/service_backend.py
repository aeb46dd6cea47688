"""Which index backend bench/service_load.py serves from: FAISS files (default) or a Milvus
server (--backend milvus: --milvus-uri, or a local Milvus 2.3.5 server started for the run
under the work directory, `cots milvus start`'s, stopped at the end)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLLECTION = "bench"


@dataclass
class Backend:
    """The backend's config for `open_store` (None: FAISS), the `cots serve` settings that
    select it, and the pid of a Milvus server this run started (its memory is reported)."""

    config: Any = None
    server_pid: int | None = None

    @property
    def name(self) -> str:
        return "faiss" if self.config is None else "milvus"

    def settings(self) -> dict[str, str]:
        if self.config is None:
            return {}
        return {
            "COTS_BACKEND": "milvus",
            "COTS_MILVUS_URI": str(self.config.milvus_uri),
            "COTS_MILVUS_COLLECTION": COLLECTION,
        }

    def store(self, root: Path) -> Any:
        """The versions under `root` (Milvus: `root` is the local work directory)."""
        from index_builder.backends import open_store

        return open_store(root, self.config)


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=("faiss", "milvus"), default="faiss", help="index backend served"
    )
    parser.add_argument(
        "--milvus-uri",
        help="with --backend milvus: a running server (default: start a local one for the run)",
    )


@contextlib.contextmanager
def backend(args: argparse.Namespace, work: Path) -> Iterator[Backend]:
    """The run's backend; a Milvus server it starts is stopped when the run ends."""
    if args.backend == "faiss":
        yield Backend()
        return
    from index_builder.backends import BackendConfig
    from index_builder.backends.milvus import server

    if args.milvus_uri:
        yield Backend(
            BackendConfig("milvus", milvus_uri=args.milvus_uri, milvus_collection=COLLECTION)
        )
        return
    data = work / "milvus-server"
    state = server.start(data, *server.free_ports(2))
    try:
        config = BackendConfig("milvus", milvus_uri=state.uri, milvus_collection=COLLECTION)
        yield Backend(config, state.pid)
    finally:
        server.stop(data)
