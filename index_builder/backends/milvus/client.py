"""Talking to Milvus: connecting with one clear error, Milvus failures as OSErrors, the
collection of a version (schema, partitions, vector index) and the index types we build.

A version's collection holds both sides, one partition each ("image", "text"), so that one
alias switch moves both at once (two collections would need two switches, and a search in
between would see one side new and one old). Fields: `row` (INT64 primary key, the version's
row number), `id` and `image_id` (VARCHAR, queried by value), `vector` (unit FLOAT_VECTOR,
inner product), `meta` (JSON, filtered) and `item` (JSON: the rest of the stored row).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from index_builder.backends.base import (
    BackendFailed,
    BackendRefused,
    BackendUnreachable,
    ivf_lists,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
INDEX_TIMEOUT_S = 3600.0
ID_LENGTH = 4096
MAX_TOPK = 16384  # Milvus refuses a larger limit
OUTPUT = ["id", "meta", "item"]
# Index type -> the search parameter tuned for recall (None: exact). GPU types need a Milvus
# built with GPU support; milvus-lite and CPU images refuse them when the index is created.
SEARCH_PARAM = {
    "FLAT": None,
    "HNSW": "ef",
    "IVF_FLAT": "nprobe",
    "GPU_IVF_FLAT": "nprobe",
    "GPU_CAGRA": "itopk_size",
}
INDEX_TYPES = ("AUTO", *SEARCH_PARAM)
SEARCH_GRID = {
    "ef": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
    "nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "itopk_size": (32, 64, 96, 128, 192, 256, 384, 512, 1024),
}
TUNE_K = 10  # recall is tuned at depth 10; deeper searches widen the search parameter
WIDEN_LIMIT = 4  # a graph search parameter widens up to this many times k
DOWN_WORDS = ("fail connecting", "failed to connect", "unavailable")  # a server that is down
AUTH_WORDS = ("auth", "credential", "password", "token", "permission", "denied")


def milvus_error(uri: str, action: str, exc: Exception) -> BackendFailed:
    """A Milvus failure as one line: BackendUnreachable (a ConnectionError), BackendRefused
    (credentials refused, a PermissionError) or BackendFailed (anything else the server
    reports; an OSError)."""
    message = " ".join(str(getattr(exc, "message", "") or exc).split())
    lowered = message.lower()
    if getattr(exc, "code", None) == 2 or any(w in lowered for w in DOWN_WORDS):
        return BackendUnreachable(f"cannot reach Milvus at {uri} to {action}: {message}")
    if getattr(exc, "code", None) in (1800, 1801) or any(w in lowered for w in AUTH_WORDS):
        return BackendRefused(
            f"Milvus at {uri} refused the credentials (COTS_MILVUS_TOKEN) to {action}: {message}"
        )
    return BackendFailed(f"Milvus at {uri} failed to {action}: {message}")


@contextlib.contextmanager
def errors(uri: str, action: str) -> Iterator[None]:
    """Turn pymilvus exceptions raised in the block into `milvus_error`s."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        raise milvus_error(uri, action, exc) from None


def connect(uri: str, token: str | None, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A MilvusClient, checked with one round trip; a bad URI is a ValueError, an unreachable
    server a ConnectionError, a refused token a PermissionError, a milvus-lite file held by
    another process an OSError."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException

    with errors(uri, "connect"):
        try:
            client = MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except ConnectionConfigException as exc:
            if uri.endswith(".db") and Path(uri).exists():
                raise OSError(
                    f"cannot open the milvus-lite file {uri} (is another process using it? a "
                    "milvus-lite file serves one process at a time: share an index through a "
                    "Milvus server)"
                ) from None
            raise ValueError(f"bad Milvus URI {uri!r}: {exc.message}") from None
        try:
            client.list_collections(timeout=timeout)
        except Exception:
            client.close()
            raise
    return client


def create_collection(client: Any, name: str, dim: int, sides: list[str], lite: bool) -> None:
    """An empty version collection (not loaded) with scalar indexes on the ids looked up by
    value (`id_indexes`) and one partition per side; its vector index is added once it is
    filled (`add_index`), when its segments' sizes are known."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("id", DataType.VARCHAR, max_length=ID_LENGTH)
    schema.add_field("image_id", DataType.VARCHAR, max_length=ID_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("meta", DataType.JSON)
    schema.add_field("item", DataType.JSON)
    client.create_collection(name, schema=schema)
    id_indexes(client, name, lite)
    for side in sides:
        client.create_partition(name, side)


def id_indexes(client: Any, name: str, lite: bool) -> None:
    """Scalar indexes on `id` and `image_id`, which lookups, changes and caption cascades
    query by value: a trie (the one VARCHAR index Milvus 2.3 has; milvus-lite has only
    INVERTED). One id at 100k rows: 7.5 ms -> 1.1 ms on a 2.3.5 server. (Metadata filters
    run on the JSON `meta` field, which 2.3 cannot index.)"""
    index = client.prepare_index_params()
    for field in ("id", "image_id"):
        kind = "INVERTED" if lite else "Trie"
        index.add_index(field, index_type=kind, index_name=f"{field}_index")
    client.create_index(name, index)


def add_index(client: Any, name: str, index_type: str, params: dict[str, Any]) -> None:
    """Create the vector index without waiting for it (`wait_indexed` does), and leave the
    collection released: it is loaded once filled and indexed. (milvus-lite indexes a loaded
    collection's new segments in the background and searches them exactly meanwhile, so
    recall would be tuned on exact results; released, it builds every index at load.)"""
    index = client.prepare_index_params()
    index.add_index("vector", index_type=index_type, metric_type="IP", params=params)
    client.create_index(name, index, sync=False)
    client.release_collection(name)


def choose_index(
    kind: str, params: dict[str, Any], n: int, segment_rows: int | None = None
) -> tuple[str, dict[str, Any]]:
    """The index type and build parameters for `n` vectors held in segments of up to
    `segment_rows` rows. AUTO follows the FAISS backend's choice (exact below 10k, HNSW up to
    50k, IVF beyond: cross-modal queries lose recall on large HNSW graphs, see the FAISS
    backend's `choose_factory`). Milvus builds an index per sealed segment, so nlist follows
    the segment's size, not the collection's: 4 sqrt(1M) lists over segments of 60k rows left
    15 rows a list and took about an hour to build at 1M on 2 cores. `params` override."""
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown Milvus index type {kind!r} (use {', '.join(INDEX_TYPES)})")
    if kind == "AUTO":
        kind = "FLAT" if n < 10_000 else "HNSW" if n <= 50_000 else "IVF_FLAT"
    nlist = ivf_lists(min(n, segment_rows or n))  # the FAISS rule, per segment
    defaults: dict[str, dict[str, Any]] = {
        "FLAT": {},
        "HNSW": {"M": 32, "efConstruction": 200},
        "IVF_FLAT": {"nlist": nlist},
        "GPU_IVF_FLAT": {"nlist": nlist},
        "GPU_CAGRA": {"intermediate_graph_degree": 64, "graph_degree": 32},
    }
    return kind, {**defaults[kind], **params}


def search_grid(index_type: str, params: dict[str, Any], k: int) -> list[dict[str, int]]:
    """The search parameters to try, cheapest first ([{}] for an exact index)."""
    name = SEARCH_PARAM[index_type]
    if name is None:
        return [{}]
    values = [v for v in SEARCH_GRID[name] if name == "nprobe" or v >= k]
    if name == "nprobe":
        values = [v for v in values if v <= params["nlist"]] or [params["nlist"]]
    return [{name: v} for v in values]


def search_params(info: dict[str, Any], k: int, fraction: float = 1.0) -> dict[str, int]:
    """The tuned parameter for a k-deep search over `fraction` of a side's rows, widened as
    the FAISS backend widens: nprobe by k / TUNE_K (deep pages) and by 1 / fraction (the
    candidates a filter removes), ef and itopk_size to at least k and by 1 / fraction."""
    params = {}
    for name, value in (info.get("search_params") or {}).items():
        scale = max(1.0, k / TUNE_K) if name == "nprobe" else 1.0
        wanted = math.ceil(value * scale / max(fraction, 1e-6))
        params[name] = min(param_limit(info, name, k), max(k if name != "nprobe" else 1, wanted))
    return params


def param_limit(info: dict[str, Any], name: str, k: int) -> int:
    """The widest setting a search may use: every list (nprobe), else WIDEN_LIMIT x k."""
    if name == "nprobe":
        return int(info["index_params"]["nlist"])
    return max(SEARCH_GRID[name][-1], WIDEN_LIMIT * k)


def segment_rows(client: Any, name: str, lite: bool) -> int | None:
    """The most rows a sealed segment of a flushed collection holds (None for milvus-lite,
    which keeps one segment per collection). How many rows a segment takes depends on the
    server's dataCoord.segment.maxSize and the schema: with 4096-byte ids, 2.3.5's 512 MB
    segments hold about 60k rows of 256-d vectors."""
    if lite:
        return None
    segments = client.list_persistent_segments(name)
    return max((int(s.num_rows) for s in segments), default=None)


def wait_indexed(client: Any, name: str, timeout: float = INDEX_TIMEOUT_S) -> None:
    """Block until the vector index covers every row (a cluster builds it asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        index = client.describe_index(name, "vector")
        pending = int(index.get("pending_index_rows", 0) or 0)
        if pending == 0 and index.get("state", "Finished") in ("Finished", "", None):
            return
        if index.get("state") == "Failed":
            raise OSError(f"Milvus failed to build the index of {name}: {index.get('fail_reason')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index of {name} is still building after {timeout:.0f} s")
        time.sleep(1.0)
