from __future__ import annotations

import io
import json
import tarfile

import pytest
from data_fixtures import run_cli, write_image, write_truncated

from index_builder.data.tabular import TableConfig, import_table
from index_builder.data.wds import (
    ReadConfig,
    WriteConfig,
    expand_braces,
    import_webdataset,
    write_webdataset,
)
from index_builder.manifest import image_path, load_records


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == [
        "a/8.tar",
        "a/9.tar",
        "a/10.tar",
        "b/8.tar",
        "b/9.tar",
        "b/10.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(tmp_path, colour=(1, 2, 3)):
    return write_image(tmp_path / f"src-{colour}.png", colour=colour).read_bytes()


def test_reads_img2dataset_style_shards(tmp_path):
    png = _png(tmp_path)
    _tar(tmp_path / "s-00.tar", [
        ("000000001.jpg", png), ("000000001.txt", b"a red dot\nsecond caption\n"),
        ("000000002.png", png), ("000000002.json", json.dumps({"caption": "from json"}).encode()),
        ("000000003.png", png),  # no caption
        ("000000004.txt", b"caption without image"),
        ("000000005.webp", b"not an image"), ("000000005.txt", b"x"),
        ("000000006.png", write_truncated(tmp_path / "cut.png").read_bytes()),
        ("000000006.txt", b"cut short"),
    ])  # fmt: skip
    _tar(
        tmp_path / "s-01.tar", [("dir/k.png", png), ("dir/k.json", b'{"captions": ["one", "two"]}')]
    )
    result = import_webdataset(ReadConfig(str(tmp_path / "s-{00..01}.tar")), tmp_path / "ds")
    records = {r.id: r for r in load_records(tmp_path / "ds")}
    assert records["wds.000000001"].captions == ("a red dot", "second caption")
    assert records["wds.000000002"].captions == ("from json",)
    assert records["wds.dir.k"].captions == ("one", "two")
    assert (tmp_path / "ds" / records["wds.000000002"].image).read_bytes() == png
    assert result.skipped == {
        "empty caption": 1,
        "no image": 1,
        "unreadable image": 1,
        "truncated or corrupt image": 1,
    }
    assert import_webdataset(
        ReadConfig(str(tmp_path / "s-{00..01}.tar")), tmp_path / "ds"
    ).up_to_date


def test_write_then_read_round_trip(tmp_path):
    for n in range(5):
        write_image(tmp_path / f"i{n}.png", colour=(n, 0, 0))
    rows = "".join(f"i{n}.png,caption {n}\ni{n}.png,other {n}\n" for n in range(5))
    (tmp_path / "t.csv").write_text("image,caption\n" + rows)
    import_table(TableConfig(str(tmp_path / "t.csv")), tmp_path / "ds")
    info = write_webdataset(WriteConfig(str(tmp_path / "ds"), shard_size=2), tmp_path / "wds")
    assert info["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert info["count"] == 5 and info["pattern"] == "shard-{000000..000002}.tar"
    assert write_webdataset(WriteConfig(str(tmp_path / "ds"), shard_size=2), tmp_path / "wds")[
        "up_to_date"
    ]
    import_webdataset(ReadConfig(str(tmp_path / "wds" / info["pattern"])), tmp_path / "back")
    before, after = load_records(tmp_path / "ds"), load_records(tmp_path / "back")
    assert [(r.id, r.captions, r.split) for r in before] == [
        (r.id, r.captions, r.split) for r in after
    ]
    for a, b in zip(before, after, strict=True):
        assert (
            image_path(tmp_path / "ds", a).read_bytes()
            == image_path(tmp_path / "back", b).read_bytes()
        )


def test_whole_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*s-1.tar \(and 1 more\)"):
        import_webdataset(ReadConfig(str(tmp_path / "s-{1..2}.tar")), tmp_path / "ds")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    out = run_cli("data", "webdataset", str(tmp_path / "junk.tar"), "--out", str(tmp_path / "ds"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"cots data: error: {tmp_path / 'junk.tar'} is not a tar file")
