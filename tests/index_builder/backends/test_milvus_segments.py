"""Milvus builds an index per sealed segment, so the IVF list count follows the segments'
size, not the collection's (on a real 2.3.5 server whose segments are made small)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions, ivf_lists
from index_builder.backends.milvus.client import choose_index

DIM = 16
N = 3000


def test_lists_follow_the_segment_size():
    assert choose_index("AUTO", {}, 1_000_000)[1]["nlist"] == ivf_lists(1_000_000)
    kind, params = choose_index("AUTO", {}, 1_000_000, segment_rows=60_000)
    assert kind == "IVF_FLAT" and params["nlist"] == ivf_lists(60_000) < ivf_lists(1_000_000)
    assert choose_index("IVF_FLAT", {"nlist": 7}, 1_000_000, 60_000)[1]["nlist"] == 7


@pytest.fixture(scope="module")
def small_segments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose segments seal at 1 MB (a few hundred rows of this schema)."""
    from index_builder.backends.milvus import server

    data_dir = tmp_path_factory.mktemp("milvus-small-segments")
    settings = {"dataCoord.segment.maxSize": 1, "dataCoord.segment.assignmentExpiration": 200}
    state = server.start(data_dir, *server.free_ports(2), timeout=180, settings=settings)
    yield state.uri
    server.stop(data_dir, grace=5.0)


def test_a_build_sizes_its_lists_by_segment_and_meets_recall(tmp_path, small_segments):
    from pymilvus import MilvusClient

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, DIM))
    vectors = centres[rng.integers(0, 30, N)] + 0.3 * rng.standard_normal((N, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    config = BackendConfig("milvus", milvus_uri=small_segments, milvus_index="IVF_FLAT")
    store = open_store(tmp_path / "work", config)
    rows = {"image": [{"id": f"i{i}", "image": "/g"} for i in range(N)]}
    version = store.publish(bundle_id="b", dim=DIM, shards={"image": [vectors]}, rows=rows,
                            options=IndexOptions(queries=100), dataset={})  # fmt: skip
    side = store.read_info(version)["sides"]["image"]
    client = MilvusClient(uri=small_segments)
    segments = client.list_persistent_segments(store.collection_of(version))
    assert len(segments) > 1, "the server should have sealed several small segments"
    largest = max(int(s.num_rows) for s in segments)
    assert side["index_params"]["nlist"] == ivf_lists(largest) < ivf_lists(N)
    assert side["recall_at_10"] >= side["target_recall"]
