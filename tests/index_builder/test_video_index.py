"""Indexing videos: one vector per video (against the frame-by-frame reference), keyframes,
counted skips for every bad input, resumable shards, and search restricted to videos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_bundles import make_tiny_bundle
from tiny_videos import bad_videos, colour_clip, over_default_limits, video_bundle

from index_builder import embed
from index_builder.backends.faiss.store import IndexStore
from index_builder.build import Sources, index_sources
from index_builder.encoders import Encoders, ImageEncoder
from index_builder.search import Searcher, SideMissing
from index_builder.video import decode_video
from index_builder.video_index import video_rows

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
FRAMES = 4


@pytest.fixture
def bundles(tmp_path):
    image = make_tiny_bundle(tmp_path / "image-bundle")
    return image, video_bundle(tmp_path / "video-bundle", image, frames=FRAMES)


def _gallery(root):
    root.mkdir()
    clips = {"rg": [RED, GREEN], "gb": [GREEN, BLUE], "long": [RED, GREEN, BLUE, RED, BLUE]}
    for name, colours in clips.items():
        (root / f"{name}.mp4").write_bytes(colour_clip(colours, size=16, per=3))
        (root / f"{name}.txt").write_text(f"{name} clip\n")
    (root / "short.mp4").write_bytes(colour_clip([BLUE], size=16, per=2))  # fewer than FRAMES
    Image.new("RGB", (16, 16), RED).save(root / "photo.png")
    for name, data in {**bad_videos(), **over_default_limits()}.items():
        (root / f"bad-{name}.mp4").write_bytes(data)
    return root


def _reference(bundle, path) -> np.ndarray:
    """meanP by hand: each sampled frame through the image encoder, mean, normalise."""
    clip = decode_video(path, FRAMES)
    frames = ImageEncoder(bundle, threads=1).encode_images(clip.frames)
    mean = frames.mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_video_gallery_index(tmp_path, bundles):
    image_bundle, bundle = bundles
    folder = _gallery(tmp_path / "clips")
    root = tmp_path / "index"
    index_sources(root, bundle, Sources(images=str(folder)))
    loaded = IndexStore(root).open(bundle=bundle)
    rows = {row["id"]: (i, row) for i, row in enumerate(loaded.images)}
    assert sorted(rows) == ["gb", "long", "photo", "rg", "short"]
    for name in ("rg", "gb", "long", "short"):
        i, row = rows[name]
        assert row["meta"]["media"] == "video" and row["video"] == str(folder / f"{name}.mp4")
        np.testing.assert_allclose(
            loaded.vector("image", i), _reference(bundle, folder / f"{name}.mp4"), atol=1e-5
        )
        assert Image.open(row["image"]).height == 96  # the keyframe strip
        assert len(row["keyframes"]) == (2 if name == "short" else FRAMES)
        assert all(Image.open(p).format == "JPEG" for p in row["keyframes"])
    assert "video" not in rows["photo"][1] and "media" not in rows["photo"][1]["meta"]
    skipped = loaded.info["sides"]["image"]["skipped"]
    assert skipped["count"] == len(bad_videos()) + 2
    assert all(reason.startswith("unreadable video") for reason in skipped["reasons"])
    named = " ".join(skipped["examples"])
    for name in (*bad_videos(), "huge-resolution", "too-long"):
        assert f"bad-{name}" in named
    assert loaded.info["sides"]["image"]["fields"]["media"] == "string"

    searcher = Searcher.open(root)
    hits = searcher.text_to_video("the red cat", k=10)
    assert sorted(h["id"] for h in hits) == ["gb", "long", "rg", "short"]  # no photo
    assert searcher.text_to_video("red", k=10, filter={"media": "image"})  # media is forced
    with pytest.raises(SideMissing, match="no texts"):  # folder captions stay with their rows
        searcher.video_to_text(str(folder / "rg.mp4"))
    assert searcher.similar("image", "rg", k=1)[0]["id"] != "rg"

    photos = tmp_path / "photos"
    index_sources(photos, image_bundle, Sources(images=str(_photos(tmp_path))))
    with pytest.raises(SideMissing, match="no videos"):
        Searcher.open(photos).text_to_video("red")


def _photos(tmp_path):
    folder = tmp_path / "only-photos"
    folder.mkdir()
    Image.new("RGB", (16, 16), RED).save(folder / "red.png")
    return folder


def test_video_to_text_searches_captions(tmp_path, bundles):
    _, bundle = bundles
    folder = _gallery(tmp_path / "clips")
    texts = tmp_path / "texts.txt"
    texts.write_text("red\ngreen\nblue\n")
    index_sources(tmp_path / "index", bundle, Sources(images=str(folder), texts=str(texts)))
    searcher = Searcher.open(tmp_path / "index")
    hits = searcher.video_to_text((folder / "gb.mp4").read_bytes(), k=3)
    assert len(hits) == 3 and {h["text"] for h in hits} == {"red", "green", "blue"}
    vector = Encoders.open(bundle).encode("video", [searcher.video_query(folder / "gb.mp4")])
    np.testing.assert_allclose(vector[0], _reference(bundle, folder / "gb.mp4"), atol=1e-5)


def test_an_image_bundle_refuses_a_video_gallery(tmp_path, bundles):
    image_bundle, _ = bundles
    folder = _gallery(tmp_path / "clips")
    with pytest.raises(ValueError, match="image bundle"):
        index_sources(tmp_path / "index", image_bundle, Sources(images=str(folder)))


def test_video_embedding_resumes_at_the_first_missing_shard(tmp_path, bundles):
    _, bundle = bundles
    folder = _gallery(tmp_path / "clips")
    rows = [
        {"id": p.stem, "image": str(p), "captions": [], "meta": {}}
        for p in sorted(folder.glob("*.mp4"))
        if not p.stem.startswith("bad")
    ]
    rows = {"image": video_rows(rows, tmp_path / "files", bundle), "text": []}
    work = tmp_path / "work"
    embed.prepare(work, bundle, rows, shard_size=2)
    first = embed.embed_work(work, bundle)["image"]
    stamps = [p.stat().st_mtime_ns for p in first]
    first[1].unlink()
    again = embed.embed_work(work, bundle)["image"]
    assert again == first and again[0].stat().st_mtime_ns == stamps[0]
    assert again[1].is_file()
    vectors = np.concatenate(embed.load_shards(again))
    np.testing.assert_allclose(vectors[0], _reference(bundle, folder / "gb.mp4"), atol=1e-5)


def test_live_changes_add_and_delete_videos(tmp_path, bundles):
    from index_builder.collection import add_sources, delete_ids

    _, bundle = bundles
    first, later = tmp_path / "first", tmp_path / "later"
    for folder, names in ((first, ("rg", "gb")), (later, ("br",))):
        folder.mkdir()
        for name in names:
            colours = {"rg": [RED, GREEN], "gb": [GREEN, BLUE], "br": [BLUE, RED]}[name]
            (folder / f"{name}.mp4").write_bytes(colour_clip(colours, size=16, per=3))
    root = tmp_path / "index"
    index_sources(root, bundle, Sources(images=str(first)))
    added = add_sources(root, bundle, Sources(images=str(later)))
    assert added.added == {"image": 1, "text": 0}
    searcher = Searcher.open(root)
    row = searcher.index.images[searcher.index.row_of("image", "br")]
    assert row["meta"]["media"] == "video" and len(row["keyframes"]) == FRAMES
    np.testing.assert_allclose(
        searcher.index.vector("image", searcher.index.row_of("image", "br")),
        _reference(bundle, later / "br.mp4"),
        atol=1e-5,
    )
    delete_ids(IndexStore(root), ["rg"])
    hits = Searcher.open(root).text_to_video("red", k=10)
    assert sorted(h["id"] for h in hits) == ["br", "gb"]
