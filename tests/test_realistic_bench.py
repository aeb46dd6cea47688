"""bench/realistic_gallery.py's model against the embeddings it was fitted to, and
bench/service_load.py's client and served-recall arithmetic on a real (tiny) server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import gallery_files, service_assets, service_load
from bench import realistic_gallery as gallery
from index_builder.backends.base import IndexOptions

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def real():
    """Clustered 'images', two 'captions' each: the image moved by a common gap and noise."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, DIM))
    images = _unit(centres[rng.integers(0, 12, 1500)] + 0.35 * rng.standard_normal((1500, DIM)))
    gap = 0.8 * _unit(rng.standard_normal((1, DIM)))
    owner = np.repeat(np.arange(1500), 2)
    captions = _unit(images[owner] + gap + 0.3 * rng.standard_normal((3000, DIM)))
    return gallery.Real(
        images, captions, owner, [f"t{i}" for i in range(3000)], [f"f{i}" for i in range(1500)]
    )


def test_split_keeps_captions_with_their_images(real):
    fit, held = gallery.split_real(real, held_out=0.2)
    assert (len(fit.images), len(held.images)) == (1200, 300)
    assert len(fit.captions) + len(held.captions) == 3000
    for part in (fit, held):  # each caption still points at its own image
        owners = [part.image_files[i] for i in part.caption_image]
        assert owners == [f"f{int(t[1:]) // 2}" for t in part.texts]
        np.testing.assert_array_equal(
            part.captions, real.captions[[int(t[1:]) for t in part.texts]]
        )


def test_samples_reproduce_the_real_statistics(real):
    fit, held = gallery.split_real(real)
    model = gallery.fit(fit, clusters=24, rank=4)
    images, captions = model.sample(1200, seed=3)
    assert images.shape == captions.shape == (1200, DIM)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(captions, axis=1), 1, atol=1e-5)
    again = model.sample(1200, seed=3)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], captions)
    stats = gallery.compare(fit, held, model)["stats"]
    gap = stats["modality gap (distance of the means)"]
    assert abs(gap["real"] - gap["generated"]) < 0.1 * gap["real"]
    for name in (
        "matched image-caption similarity",
        "image nearest-neighbour similarity",
        "held-out caption -> top-1 image similarity",
    ):
        real_p50, generated_p50 = stats[name]["real"]["p50"], stats[name]["generated"]["p50"]
        assert abs(real_p50 - generated_p50) < 0.1, name


def test_load_real_reads_index_roots(tmp_path, real):
    from index_builder.backends.faiss.store import IndexStore

    roots = []
    for part, (lo, hi) in enumerate(((0, 10), (10, 25))):
        rows = {
            "image": [
                {"id": f"i{i}", "image": f"/g/{i}.png", "captions": []} for i in range(lo, hi)
            ],
            "text": [
                {"id": f"i{j // 2}#{j % 2}", "image_id": f"i{j // 2}", "text": real.texts[j]}
                for j in range(2 * lo, 2 * hi)
            ],
        }
        IndexStore(tmp_path / f"r{part}").publish(
            bundle_id="b",
            dim=DIM,
            shards={"image": [real.images[lo:hi]], "text": [real.captions[2 * lo : 2 * hi]]},
            rows=rows,
            options=IndexOptions(factory="Flat", queries=5),
            dataset={},
        )
        roots.append(tmp_path / f"r{part}")
    loaded = gallery.load_real(roots)
    np.testing.assert_allclose(loaded.images, real.images[:25])
    np.testing.assert_allclose(loaded.captions, real.captions[:50])
    assert loaded.caption_image.tolist() == real.caption_image[:50].tolist()
    assert loaded.texts == real.texts[:50] and loaded.image_files[12] == "/g/12.png"


def test_served_recall_counts_hits_against_the_truth():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    queries = service_assets.Queries(["a", "b"], [b""], text_truth=truth)
    served = [(0, ["syn0000001", "syn0000002", "syn0000009", "syn0000004"]), (3, ["syn0000005"])]
    assert queries.recall("/search/text-to-image", served) == round(4 / 8, 4)
    caption_hits = [(0, ["syn0000001#0", "syn0000003#0"])]
    assert service_assets.Queries(["a"], [b""], image_truth=truth).recall(
        "/search/image-to-text", caption_hits
    ) == round(2 / 4, 4)
    assert queries.recall("/search/image-to-text", served) is None


def test_a_short_load_over_raw_http(tmp_path):
    out = tmp_path / "load.json"
    args = ["--demo-images", "60", "--requests", "30", "--concurrency", "1,4"]
    assert service_load.main([*args, "--floor-reps", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for runs in result["endpoints"].values():
        for run in runs:
            assert run["requests"] == 30 and run["errors"] == {}
            assert 0 < run["p50_ms"] <= run["p99_ms"] and run["client_cpu_ms_per_request"] > 0
    assert result["server_memory_bytes"]["VmRSS"] > 0 and result["raw_vectors_bytes"] > 0
    assert "goals" not in result  # goals are issue 13's, for a realistic gallery


def test_galleries_are_written_to_disk_and_smaller_sizes_are_prefixes(real, tmp_path):
    fit, _ = gallery.split_real(real)
    model = gallery.fit(fit, clusters=24, rank=4)
    paths = [tmp_path / f"{side}-2500-abc.npy" for side in ("image", "text")]
    gallery_files.write_gallery(model, 2500, paths)
    images, captions = (np.load(p, mmap_mode="r") for p in paths)
    expected = model.sample(2500)  # the in-memory sampler draws the same stream
    assert np.array_equal(images, expected[0]) and np.array_equal(captions, expected[1])
    assert not list(tmp_path.glob("*.tmp.npy"))
    assert gallery_files.cached(tmp_path, "abc", 1000) == paths  # a larger gallery serves 1000
    assert gallery_files.cached(tmp_path, "abc", 2501) is None
    assert gallery_files.cached(tmp_path, "other", 10) is None


def test_sampling_in_blocks_keeps_the_stream(real, monkeypatch):
    fit, _ = gallery.split_real(real)
    model = gallery.fit(fit, clusters=24, rank=4)
    whole = model.sample(700, seed=5)
    monkeypatch.setattr(gallery, "BLOCK", 64)
    blocked = model.sample(700, seed=5)
    np.testing.assert_allclose(blocked[0], whole[0], atol=1e-6)
    np.testing.assert_allclose(blocked[1], whole[1], atol=1e-6)


def test_a_short_load_served_from_a_milvus_server(tmp_path, milvus_uri):
    """--backend milvus: the gallery published into the server, `cots serve` on it, the same
    figures (the floor's searches and the served ones go to Milvus)."""
    from index_builder import synthetic as fixtures

    bundle = fixtures.make_bundle(tmp_path / "bundle")
    out = tmp_path / "load.json"
    args = ["--bundle", str(bundle.path), "--synthetic-gallery", "2000", "--backend", "milvus",
            "--milvus-uri", milvus_uri, "--requests", "20", "--concurrency", "1,4",
            "--floor-reps", "5", "--changes", "0.01", "--out", str(out)]  # fmt: skip
    assert service_load.main(args) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "milvus" and result["gallery"] == {"images": 2000, "captions": 2000}
    assert result["index"]["factories"] == {"image": "FLAT", "text": "FLAT"}
    for runs in result["endpoints"].values():
        for run in runs:
            assert run["requests"] == 20 and run["errors"] == {} and run["p50_ms"] > 0
    changes = result["changes_under_load"]
    assert changes["items"] == 20
    for name in ("upsert", "delete"):
        assert changes[name]["statuses"] == {"200": 1} and changes[name]["searches_failed"] == 0
    from pymilvus import MilvusClient

    assert "bench" in MilvusClient(uri=milvus_uri).list_aliases()["aliases"]


def test_faiss_and_milvus_side_by_side_in_one_run(tmp_path, milvus_uri):
    """bench/service_backends.py: both backends on the same gallery and queries, the issue's
    figures side by side and its goals as ratios of this run."""
    from bench import service_backends
    from index_builder import synthetic as fixtures

    bundle = fixtures.make_bundle(tmp_path / "bundle")
    out = tmp_path / "side.json"
    args = ["--bundle", str(bundle.path), "--synthetic-gallery", "1000", "--milvus-uri",
            milvus_uri, "--requests", "20", "--concurrency", "1,16", "--floor-reps", "5",
            "--changes", "0.01", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert service_backends.main(args) == 0
    result = json.loads(out.read_text())
    faiss, milvus = result["side_by_side"]
    assert (faiss["backend"], milvus["backend"]) == ("faiss", "milvus")
    assert milvus["failed searches during changes"] == 0 and milvus["upsert 1% s"] > 0
    [ratio] = [g for g in result["goals"] if g["goal"].startswith("Milvus t2i p50")]
    assert ratio["measured"] == round(milvus["t2i p50 ms (c=1)"] / faiss["t2i p50 ms (c=1)"], 3)
    assert "Side by side" in service_backends.render(result)
