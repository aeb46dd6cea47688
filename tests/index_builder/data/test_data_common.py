from __future__ import annotations

import os

import pytest
from PIL import Image

from index_builder.data.common import (
    Skips,
    fingerprint,
    fit_square,
    image_problem,
    prepare_render_dir,
    run_import,
)
from index_builder.manifest import Record, load_records, read_info


def test_fingerprint_follows_options_and_file_changes(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a")
    first = fingerprint("csv", {"x": 1}, [src])
    assert first == fingerprint("csv", {"x": 1}, [src])
    assert first != fingerprint("csv", {"x": 2}, [src])
    os.utime(src, ns=(1, 1))
    assert first != fingerprint("csv", {"x": 1}, [src])


def test_skips_summary_counts_and_keeps_first_examples():
    skips = Skips(examples=2)
    for n in range(4):
        skips.add("missing image", f"row {n}")
    skips.add("empty caption", "row 9")
    assert skips.total == 5
    assert skips.summary() == (
        "skipped 5 (missing image 4, empty caption 1); "
        "e.g. row 0: missing image; row 1: missing image"
    )


def test_fit_square_keeps_aspect_centres_and_flattens_alpha():
    wide = Image.new("RGBA", (100, 50), (0, 0, 255, 255))
    out = fit_square(wide, 64, margin=0)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert out.getpixel((32, 32)) == (0, 0, 255)
    assert out.getpixel((32, 2)) == (255, 255, 255)  # letterbox above the wide image
    transparent = fit_square(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), 16)
    assert set(transparent.getdata()) == {(255, 255, 255)}


def test_image_problem(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (3, 3)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    assert image_problem(good) is None
    assert image_problem(bad) == "unreadable image"
    assert image_problem(tmp_path / "none.png") == "missing image"


def test_render_dir_reuse_only_with_same_parameters(tmp_path):
    images = tmp_path / "images"
    assert prepare_render_dir(images, {"size": 64}) is False
    (images / "x.png").write_bytes(b"png")
    assert prepare_render_dir(images, {"size": 64}) is True
    assert (images / "x.png").exists()
    assert prepare_render_dir(images, {"size": 128}) is False
    assert not (images / "x.png").exists()  # stale renders never mix with new ones


def test_run_import_is_idempotent_and_reports_skips(tmp_path):
    calls = []

    def produce(skips):
        calls.append(1)
        skips.add("empty caption", "row 2")
        yield Record("a", "a.png", ("a cat",))

    first = run_import(tmp_path, {"name": "t"}, "fp1", produce)
    assert not first.up_to_date and first.skipped == {"empty caption": 1}
    assert read_info(tmp_path)["skipped"] == {"empty caption": 1}
    again = run_import(tmp_path, {"name": "t"}, "fp1", produce)
    assert again.up_to_date and calls == [1]
    run_import(tmp_path, {"name": "t"}, "fp2", produce)
    assert len(calls) == 2 and [r.id for r in load_records(tmp_path)] == ["a"]


def test_no_usable_rows_names_the_skips(tmp_path):
    def produce(skips):
        skips.add("missing image", "row 1")
        yield from ()

    with pytest.raises(ValueError, match=r"no usable records .*skipped 1 \(missing image 1\)"):
        run_import(tmp_path, {}, "fp", produce)
    assert not (tmp_path / "manifest.jsonl").exists()
