"""Embedding shards: equal to encoding everything at once, resumable, clear on bad images."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import embed
from index_builder.encoders import ImageEncoder, TextEncoder
from index_builder.sources import dataset_rows


def _prepare(tmp_path, bundle, gallery, shard_size=5):
    rows = dataset_rows(gallery, None)
    work = embed.work_dir_for(tmp_path / "idx", bundle, rows)
    embed.prepare(work, bundle, rows, shard_size)
    return work, rows


def test_shards_equal_one_pass_encoding(tmp_path, tiny_bundle, gallery):
    work, rows = _prepare(tmp_path, tiny_bundle, gallery)
    paths = embed.embed_work(work, tiny_bundle, threads=1, batch_size=2)
    assert [p.name for p in paths["image"]] == [
        "image-00000.npy",
        "image-00001.npy",
        "image-00002.npy",
    ]
    assert len(paths["text"]) == 5  # 24 captions in shards of 5
    images = np.concatenate(embed.load_shards(paths["image"]))
    texts = np.concatenate(embed.load_shards(paths["text"]))
    ref_images = ImageEncoder(tiny_bundle).encode_paths([r["image"] for r in rows["image"]])
    ref_texts = TextEncoder(tiny_bundle).encode([r["text"] for r in rows["text"]])
    np.testing.assert_allclose(images, ref_images, atol=1e-5)
    np.testing.assert_allclose(texts, ref_texts, atol=1e-5)
    assert {k: rows["text"][3][k] for k in ("id", "image_id", "text")} == {
        "id": "g1#1",
        "image_id": "g1",
        "text": "the dog is green",
    }


@pytest.mark.parametrize(
    ("cores", "threads", "expected"),
    [(2, None, (2, 1)), (2, 2, (1, 2)), (16, None, (8, 2)), (16, 4, (4, 4)), (1, None, (1, 1))],
)
def test_local_lanes_share_the_cores(monkeypatch, cores, threads, expected):
    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert embed.local_lanes(threads) == expected


def test_killed_run_resumes_from_the_first_missing_shard(
    tmp_path, tiny_bundle, gallery, monkeypatch
):
    work, _ = _prepare(tmp_path, tiny_bundle, gallery)
    calls = []
    original = embed.ShardEmbedder.embed_shard

    def dies_on_third(self, index):
        calls.append((self.side, index))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(embed.ShardEmbedder, "embed_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_work(work, tiny_bundle)
    assert sorted(p.name for p in work.glob("*.npy")) == ["image-00000.npy", "image-00001.npy"]
    assert not list(work.glob(".*.tmp"))  # no half-written shard
    calls.clear()
    monkeypatch.setattr(embed.ShardEmbedder, "embed_shard", original)
    seen = []
    monkeypatch.setattr(
        embed.ShardEmbedder,
        "embed_shard",
        lambda self, i: seen.append((self.side, i)) or original(self, i),
    )
    embed.embed_work(work, tiny_bundle)
    assert seen == [("image", 2)] + [("text", i) for i in range(5)]


def test_changed_plan_starts_afresh(tmp_path, tiny_bundle, gallery):
    work, rows = _prepare(tmp_path, tiny_bundle, gallery)
    embed.embed_work(work, tiny_bundle)
    embed.prepare(work, tiny_bundle, rows, shard_size=7)
    assert not list(work.glob("*.npy"))
    assert len(embed.shard_paths(work, "image")) == 2


def test_unreadable_images_are_skipped_and_named(tmp_path, tiny_bundle, gallery):
    (gallery / "images" / "g4.png").write_bytes(b"not a png")
    good = (gallery / "images" / "g7.png").read_bytes()
    (gallery / "images" / "g7.png").write_bytes(good[: len(good) // 2])  # truncated
    work, rows = _prepare(tmp_path, tiny_bundle, gallery)
    paths = embed.embed_work(work, tiny_bundle, threads=1, batch_size=2)
    skipped = embed.skipped_ids(paths["image"])
    assert [item["id"] for item in skipped] == ["g4", "g7"]
    assert all(item["reason"] for item in skipped)
    images = np.concatenate(embed.load_shards(paths["image"]))
    assert len(images) == 12 and not images[4].any() and not images[7].any()
    ref = ImageEncoder(tiny_bundle).encode_paths([rows["image"][i]["image"] for i in (0, 5)])
    np.testing.assert_allclose(images[[0, 5]], ref, atol=1e-5)


def test_unknown_engine(tmp_path, tiny_bundle, gallery):
    work, _ = _prepare(tmp_path, tiny_bundle, gallery)
    with pytest.raises(ValueError, match="engine must be one of"):
        embed.embed_work(work, tiny_bundle, engine="spark")


@pytest.mark.slow
def test_ray_engine_in_local_mode(tmp_path, tiny_bundle, gallery):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        work, _ = _prepare(tmp_path, tiny_bundle, gallery)
        paths = embed.embed_work(work, tiny_bundle, engine="ray", threads=1, workers=1)
    finally:
        ray.shutdown()
    local = tmp_path / "local"
    _, rows = _prepare(local, tiny_bundle, gallery)
    ref = ImageEncoder(tiny_bundle).encode_paths([r["image"] for r in rows["image"]])
    np.testing.assert_allclose(np.concatenate(embed.load_shards(paths["image"])), ref, atol=1e-5)
    assert sum(len(s) for s in embed.load_shards(paths["text"])) == 24
