from __future__ import annotations

import json

import pytest
from data_fixtures import run_cli, write_image, write_truncated

from index_builder.data.tabular import TableConfig, import_table
from index_builder.manifest import load_records


@pytest.fixture
def images(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        write_image(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"nope")
    write_truncated(tmp_path / "cut.png")
    return tmp_path


def test_csv_merges_rows_of_one_image_and_skips_bad_rows(images):
    table = images / "pairs.csv"
    table.write_text(
        "image,caption,split\n"
        'a.png,"a red square, small",test\n'
        "a.png,a red block,test\n"
        "a.png,a red block,test\n"
        "a.png,a red tile,train\n"
        "b.png,  ,\n"
        "sub/c.png,another one,\n"
        "broken.png,unreadable,\n"
        "cut.png,truncated,\n"
        "gone.png,missing,\n"
        "b.png,too,many,fields\n"
        "b.png,a tile,holdout\n"
    )
    result = import_table(TableConfig(str(table)), images / "ds")
    records = {r.meta["file"]: r for r in load_records(images / "ds")}
    assert set(records) == {"a.png", "sub/c.png"}
    assert records["a.png"].captions == ("a red square, small", "a red block")
    assert records["a.png"].split == "test"
    assert records["sub/c.png"].image == str(images / "sub/c.png")
    assert result.skipped == {
        "empty image path or caption": 1,
        "wrong number of fields": 1,
        "unreadable image": 1,
        "truncated or corrupt image": 1,
        "missing image": 1,
        "unknown split 'holdout'": 1,
        "split differs from an earlier row of the image": 1,
    }
    assert result.merged == {"caption row of an earlier image": 1, "repeated row": 1}


def test_tsv_by_extension_or_flag_and_custom_columns(images):
    rows = "filepath\ttitle\na.png\tone, with a comma\nb.png\ttwo\n"
    (images / "pairs.tsv").write_text(rows)
    (images / "pairs.txt").write_text(rows)
    for name, fmt in (("pairs.tsv", "auto"), ("pairs.txt", "tsv")):
        cfg = TableConfig(str(images / name), "filepath", "title", format=fmt)
        import_table(cfg, images / name.replace(".", "_"))
        captions = [r.captions for r in load_records(images / name.replace(".", "_"))]
        assert captions == [("one, with a comma",), ("two",)]
    with pytest.raises(ValueError, match="pass --format csv or tsv"):
        import_table(TableConfig(str(images / "pairs.txt")), images / "x")


def test_rerun_is_up_to_date_until_the_table_changes(images):
    table = images / "t.csv"
    table.write_text("image,caption\na.png,a square\n")
    assert not import_table(TableConfig(str(table)), images / "ds").up_to_date
    assert import_table(TableConfig(str(table)), images / "ds").up_to_date
    table.write_text("image,caption\na.png,a square\nb.png,another square\n")
    assert import_table(TableConfig(str(table)), images / "ds").info["count"] == 2


def test_cli_whole_input_errors_are_one_line(images):
    missing = images / "none.csv"
    out = run_cli("data", "csv", str(missing), "--out", str(images / "ds"))
    assert (out.returncode, out.stderr.strip()) == (
        2,
        f"cots data: error: table not found: {missing}",
    )
    table = images / "t.csv"
    table.write_text("path,text\na.png,a square\n")
    out = run_cli("data", "csv", str(table), "--out", str(images / "ds"))
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"cots data: error: {table} has no column 'image' (columns: path, text)"
    )
    table.write_text("image,caption\ngone.png,a square\n")
    out = run_cli("data", "csv", str(table), "--out", str(images / "ds"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("cots data: error: no usable records")
    assert "skipped 1 (missing image 1)" in out.stderr
    assert not (images / "ds/manifest.jsonl").exists()


def test_cli_builds_and_reports(images):
    table = images / "t.csv"
    table.write_text("image,caption\na.png,a square\nb.png,another\nb.png,a tile\ncut.png,x\n")
    out = run_cli("data", "csv", str(table), "--out", str(images / "ds"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("csv: built: 2 images")
    assert "3 captions, 1 skipped, 1 merged -> " in out.stdout
    assert "merged 1 (caption row of an earlier image 1)" in out.stderr
    assert "skipped 1 (truncated or corrupt image 1); e.g. cut.png" in out.stderr
    info = json.loads((images / "ds/dataset.json").read_text())
    assert info["count"] == 2 and info["source"] == "csv"
    again = run_cli("data", "csv", str(table), "--out", str(images / "ds"))
    assert again.stdout.startswith("csv: up to date: 2 images")
