"""Shared fixtures: everything a test writes goes under pytest's tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Keep BLAS/torch to the 2 cores CI has and avoid oversubscription between processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


# Tests flush after each small write: a segment's allocations expire after 0.2 s instead of 2 s,
# so a flush returns in about 1 s instead of 2.6 s.
FAST_FLUSH = {"dataCoord.segment.assignmentExpiration": 200}


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Milvus server (`cots milvus start`: Milvus 2.3.5 standalone from the `milvus`
    wheel) for the whole session, on free ports of its own (never 19530) with its data under
    pytest's tmp dir; yields its URI, "http://127.0.0.1:PORT". The binaries unpack once into
    ~/.cache/cots-milvus, so later sessions start in a few seconds."""
    from index_builder.backends.milvus import server

    data_dir = tmp_path_factory.mktemp("milvus-server")
    port, metrics_port = server.free_ports(2)
    try:
        state = server.start(data_dir, port, metrics_port, timeout=180, settings=FAST_FLUSH)
    except server.ServerError as exc:
        pytest.fail(f"{exc}\n" + "\n".join(exc.log_tail), pytrace=False)
    yield state.uri
    server.stop(data_dir, grace=5.0)  # its data is thrown away: no need to wait longer


@pytest.fixture
def milvus_uri(milvus_server: str) -> Iterator[str]:
    """The session's Milvus server for one test, "http://127.0.0.1:PORT", empty before and
    after the test: every alias and collection in it is dropped. (One database per test would
    not isolate: Milvus 2.3 resolves aliases in the default database whatever the client's.)"""
    empty_milvus(milvus_server)
    yield milvus_server
    empty_milvus(milvus_server)


def empty_milvus(uri: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    for alias in client.list_aliases()["aliases"]:
        client.drop_alias(alias)
    for collection in client.list_collections():
        client.drop_collection(collection)
    client.close()
