from __future__ import annotations

import hashlib
import io
import os

import pytest
from PIL import Image

from index_builder.data.common import (
    HELD_OUT_MIN_ITEMS,
    Skips,
    Splits,
    fingerprint,
    fit_square,
    prepare_render_dir,
    read_image,
    run_import,
    split_bucket,
    split_of,
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


def _noise(fmt: str, size=(64, 48)) -> bytes:
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_read_image_decodes_in_full(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(_noise("PNG"))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    assert read_image(good) == (hashlib.sha1(good.read_bytes()).hexdigest(), None)
    assert read_image(bad)[1] == "unreadable image"
    assert read_image(tmp_path / "none.png") == ("", "missing image")
    for fmt in ("PNG", "JPEG"):
        data = _noise(fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(data[: len(data) * 2 // 3])  # the header alone still reads fine
        with Image.open(cut) as image:
            assert image.size == (64, 48)
        assert read_image(cut)[1] == "truncated or corrupt image", fmt


def _old_split_of(key: str) -> str:
    """The rule as written before the Splits class (manifest.split_of, 5 % test, 5 % val)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < 0.05 else "val" if bucket < 0.10 else "train"


def test_split_of_is_the_old_per_key_rule_and_proportional():
    keys = [f"oca.animals.item-{i}" for i in range(20000)]
    splits = [split_of(k) for k in keys]
    assert splits == [_old_split_of(k) for k in keys]  # Open Clip Art keeps its splits
    assert 0.04 < splits.count("test") / len(splits) < 0.06
    assert 0.04 < splits.count("val") / len(splits) < 0.06


def _train_keys(n: int) -> list[str]:
    """The first n keys "k<i>" that the per-key rule puts in train."""
    keys = (f"k{i}" for i in range(10 * n))
    return [k for k in keys if split_of(k) == "train"][:n]


def test_splits_move_the_nearest_train_keys_when_val_or_test_is_empty():
    keys = _train_keys(HELD_OUT_MIN_ITEMS)
    by_bucket = sorted(keys, key=split_bucket)
    splits = Splits()
    assert [splits.assign(f"id-{k}", k) for k in keys] == ["train"] * len(keys)
    splits.assign("id-dup", by_bucket[0])  # the same image twice: both move together
    counts = {"train": len(keys) + 1, "val": 0, "test": 0}
    assert splits.moves(counts) == {
        f"id-{by_bucket[0]}": "val",
        "id-dup": "val",
        f"id-{by_bucket[1]}": "test",
    }
    assert splits.moves({**counts, "val": 3}) == {f"id-{by_bucket[0]}": "test", "id-dup": "test"}
    assert splits.moves({**counts, "val": 1, "test": 1}) == {}
    small = {"train": HELD_OUT_MIN_ITEMS - 1, "val": 0, "test": 0}
    assert splits.moves(small) == {}  # too few items: the per-key rule alone
    assert splits.moves({"train": 2, "val": 0, "test": 40}) == {}  # train is never emptied


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

    def produce(skips, splits):
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
    def produce(skips, splits):
        skips.add("missing image", "row 1")
        yield from ()

    with pytest.raises(ValueError, match=r"no usable records .*skipped 1 \(missing image 1\)"):
        run_import(tmp_path, {}, "fp", produce)
    assert not (tmp_path / "manifest.jsonl").exists()


def test_run_import_applies_the_moves_before_the_fingerprint(tmp_path):
    keys = _train_keys(HELD_OUT_MIN_ITEMS + 5)
    nearest = sorted(keys, key=split_bucket)[:2]

    def produce(skips, splits):
        skips.merge("repeated row")
        for key in keys:
            yield Record(f"id-{key}", f"{key}.png", ("a cat",), splits.assign(f"id-{key}", key))

    result = run_import(tmp_path, {"name": "t"}, "fp", produce)
    moved = {f"id-{nearest[0]}": "val", f"id-{nearest[1]}": "test"}
    assert {r.id: r.split for r in load_records(tmp_path) if r.split != "train"} == moved
    info = read_info(tmp_path)
    assert info["splits"] == {"train": len(keys) - 2, "val": 1, "test": 1}
    assert info["moved"] == moved and info["fingerprint"] == "fp"
    assert info["merged"] == {"repeated row": 1} and result.merged == {"repeated row": 1}
    assert info["split_rule"]["min_items"] == HELD_OUT_MIN_ITEMS
    assert run_import(tmp_path, {"name": "t"}, "fp", produce).up_to_date
