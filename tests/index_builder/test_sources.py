"""Index sides from any source: folders without captions, tables, text files, WebDataset."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from tiny_bundles import COLOURS

from index_builder.backends.faiss.store import IndexStore
from index_builder.cli import main
from index_builder.data.common import Skips
from index_builder.search import Searcher, SideMissing
from index_builder.sources import SourceOptions, image_rows, read_table, text_rows


def _photos(root, n=8):
    """An uncaptioned folder of coloured images in two sub-folders."""
    names = list(COLOURS)
    for i in range(n):
        folder = root / ("warm" if i % 2 else "cool")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), COLOURS[names[i % len(names)]]).save(folder / f"p{i}.png")
    return root


def _build(bundle, out, *sources):
    args = ["index", "build", str(out), "--bundle", str(bundle.path), "--cpu",
            "--threads", "1", *sources]  # fmt: skip
    return main(args)


def test_uncaptioned_folder_is_searchable_by_text_and_image(tmp_path, tiny_bundle, capsys):
    photos = _photos(tmp_path / "photos")
    (photos / "cool" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (photos / "warm" / "p1.png").read_bytes()
    (photos / "warm" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "idx"
    assert _build(tiny_bundle, out, "--images", str(photos)) == 0
    said = capsys.readouterr().out
    assert "skipped 2 inputs:" in said and "cool/broken" in said
    loaded = IndexStore(out).open()
    assert loaded.sides == ("image",) and loaded.live_count("image") == 8
    side = loaded.info["sides"]["image"]
    assert side["skipped"]["count"] == 2 and side["fields"] == {
        "folder": "string",
        "path": "string",
    }
    searcher = Searcher.open(out)
    red = searcher.text_to_image("a red cat", k=3)
    query = searcher.encoders.encode("text", ["a red cat"])[0]
    exact = np.sort(np.asarray(loaded.vectors["image"]) @ query)[::-1][:3]  # colours repeat: ties
    np.testing.assert_allclose([hit["score"] for hit in red], exact, atol=1e-5)
    assert red[0]["rank"] == 1 and red[0]["score"] >= red[1]["score"]
    assert "image" not in red[0] and red[0]["meta"]["path"].endswith(".png")
    warm = searcher.text_to_image("a red cat", k=10, filter={"folder": "warm"})
    assert len(warm) == 4 and all(hit["meta"]["folder"] == "warm" for hit in warm)
    same = searcher.image_to_image(photos / "warm" / "p1.png", k=1)
    assert same[0]["id"] == "warm/p1" and same[0]["score"] > 0.99
    assert searcher.similar("image", "warm/p1", k=2)[0]["id"] != "warm/p1"
    with pytest.raises(SideMissing, match="holds no texts"):
        searcher.image_to_text(photos / "warm" / "p1.png")


def test_tables_and_text_files(tmp_path, tiny_bundle):
    _photos(tmp_path / "photos", n=6)
    table = tmp_path / "items.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "year", "label"])
        for i in range(6):
            folder = "warm" if i % 2 else "cool"
            writer.writerow([f"item-{i}", f"photos/{folder}/p{i}.png", 2000 + i, f"l{i % 2}"])
        writer.writerow(["item-9", "photos/missing.png", 2009, "l1"])
    lines = tmp_path / "notes.txt"
    lines.write_text("a red cat\n\nthe blue car\na green tree\n")
    out = tmp_path / "idx"
    assert _build(tiny_bundle, out, "--images", str(table), "--texts", str(lines)) == 0
    loaded = IndexStore(out).open()
    assert [row["id"] for row in loaded.texts] == ["notes:1", "notes:3", "notes:4"]
    assert loaded.info["sides"]["image"]["fields"] == {"label": "string", "year": "number"}
    assert loaded.images[0]["meta"] == {"year": 2000, "label": "l0"}
    searcher = Searcher.open(out)
    recent = searcher.text_to_image("a cat", k=10, filter={"year": {"gte": 2003}})
    assert sorted(hit["id"] for hit in recent) == ["item-3", "item-4", "item-5"]
    assert searcher.text_to_text("blue car", k=1)[0]["id"] == "notes:3"


def test_jsonl_parquet_and_webdataset_sources(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = _photos(tmp_path / "photos", n=4)
    records = [{"file": str(p), "tags": ["x", str(i)], "caption": f"c{i}"}
               for i, p in enumerate(sorted(photos.rglob("*.png")))]  # fmt: skip
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for path in (jsonl, parquet):
        rows = image_rows(str(path), SourceOptions(), tmp_path / "files", Skips())
        assert [row["captions"] for row in rows] == [["c0"], ["c1"], ["c2"], ["c3"]]
        assert rows[1]["meta"] == {"tags": ["x", "1"]}
    assert read_table(parquet) == records

    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(sorted(photos.rglob("*.png"))):
            tar.add(p, arcname=f"s{i}.png")
            meta = tmp_path / f"s{i}.json"
            meta.write_text(json.dumps({"caption": f"w{i}", "source": "web"}))
            tar.add(meta, arcname=f"s{i}.json")
    rows = image_rows(str(shard), SourceOptions(), tmp_path / "files", Skips())
    assert [row["id"] for row in rows] == ["s0", "s1", "s2", "s3"]
    assert rows[0]["captions"] == ["w0"] and rows[0]["meta"] == {"source": "web"}
    assert all((tmp_path / "files").joinpath(row["image"].split("/")[-1]).is_file() for row in rows)


def test_source_errors_are_one_line(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "idx"
    assert _build(tiny_bundle, out, "--images", str(tmp_path / "nowhere")) == 2
    assert "source not found" in capsys.readouterr().err
    assert _build(tiny_bundle, out) == 2
    assert "give at least one source" in capsys.readouterr().err
    dup = tmp_path / "dup.csv"
    photo = _photos(tmp_path / "photos", n=1) / "cool" / "p0.png"
    dup.write_text(f"id,image\na,{photo}\na,{photo}\n")
    assert _build(tiny_bundle, out, "--images", str(dup)) == 2
    assert "1 duplicate ids in" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert _build(tiny_bundle, out, "--texts", str(empty)) == 2
    assert "empty gallery" in capsys.readouterr().err
    assert _build(tiny_bundle, out, "--texts", str(dup), "--text-column", "caption") == 2
    assert "has no column 'caption'" in capsys.readouterr().err
    assert not out.joinpath("CURRENT").exists()


def test_add_upsert_delete_from_the_command_line(tmp_path, tiny_bundle, capsys):
    photos = _photos(tmp_path / "photos", n=6)
    out = tmp_path / "idx"
    assert _build(tiny_bundle, out, "--images", str(photos / "cool")) == 0
    add = ["index", "add", str(out), "--bundle", str(tiny_bundle.path), "--threads", "1",
           "--images", str(photos / "warm")]  # fmt: skip
    assert main(add) == 0
    assert "added: 3 images" in capsys.readouterr().out
    assert IndexStore(out).open().live_count("image") == 6
    assert main([*add[:-2], "--images", str(photos / "cool")]) == 0
    assert "already present (skipped; --upsert replaces): 3 images" in capsys.readouterr().out
    assert main([*add[:-2], "--images", str(photos / "cool"), "--upsert"]) == 0
    assert "replaced: 3 images" in capsys.readouterr().out
    ids = tmp_path / "ids.txt"
    ids.write_text("p1\np3\n")
    assert main(["index", "delete", str(out), "p5", "--ids-file", str(ids)]) == 0
    assert "deleted: 3 images" in capsys.readouterr().out
    loaded = IndexStore(out).open()
    assert loaded.live_count("image") == 3
    before = IndexStore(out).current()
    assert main(["index", "delete", str(out), "p1"]) == 2
    assert "1 ids are not in the index, e.g. 'p1'" in capsys.readouterr().err
    assert IndexStore(out).current() == before
    vectors = np.stack([loaded.vector("image", loaded.row_of("image", "p0"))])
    assert loaded.search("image", vectors, 1)[1][0, 0] == loaded.row_of("image", "p0")


def _truncated_jpeg(path):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:-600])


def test_skips_are_named_whole_and_only_by_the_command_that_made_them(
    tmp_path, tiny_bundle, capsys
):
    """A non-image file is counted and named; a decoder's reason is never cut; `index add`
    and `delete` report their own skips, not those of the build before them."""
    photos = _photos(tmp_path / "photos", n=4)
    (photos / "notes.pdf").write_bytes(b"%PDF-1.4")
    _truncated_jpeg(photos / "cool" / "cut.jpg")
    out = tmp_path / "idx"
    assert _build(tiny_bundle, out, "--images", str(photos)) == 0
    said = capsys.readouterr().out
    assert "skipped 2 inputs:" in said and "notes.pdf: not an image or video" in said
    assert "image file is truncated (20 bytes not processed))" in said
    assert IndexStore(out).open().info["sides"]["image"]["skipped"]["count"] == 2

    more = tmp_path / "more"
    more.mkdir()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(more / "new.png")
    (more / "readme.md").write_text("holiday")
    add = ["index", "add", str(out), "--bundle", str(tiny_bundle.path), "--threads", "1"]
    assert main([*add, "--images", str(more)]) == 0
    said = capsys.readouterr().out
    assert "added: 1 images\nimages skipped 1 inputs:\n  readme.md: not an image or video" in said
    assert "notes.pdf" not in said and "truncated" not in said
    assert main(["index", "delete", str(out), "new"]) == 0
    said = capsys.readouterr().out
    assert "deleted: 1 images" in said and "skipped" not in said


def test_top_level_files_have_an_empty_folder(tmp_path):
    photos = _photos(tmp_path / "photos", n=2)
    Image.new("RGB", (12, 10), (1, 2, 3)).save(photos / "top.png")
    rows = image_rows(str(photos), SourceOptions(), tmp_path / "files", Skips())
    assert {row["id"]: row["meta"]["folder"] for row in rows} == {
        "cool/p0": "cool",
        "warm/p1": "warm",
        "top": "",
    }


def test_text_rows_from_a_dataset_keep_their_image(gallery):
    rows = text_rows(str(gallery), SourceOptions(), Skips())
    assert rows[0]["image_id"] == "g0" and rows[0]["id"] == "g0#0"
