"""The one split rule: the same images get the same splits whatever importer reads them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from data_fixtures import write_noise

from index_builder.data.coco import CocoConfig, KarpathyConfig, import_coco, import_karpathy
from index_builder.data.common import split_of
from index_builder.data.folder import FolderConfig, import_folder
from index_builder.data.synthetic import SyntheticConfig, import_synthetic
from index_builder.data.tabular import TableConfig, import_table
from index_builder.data.wds import ReadConfig, import_webdataset
from index_builder.manifest import image_path, load_records, read_info

N = 30


def _splits_by_content(dataset) -> dict[str, str]:
    """content digest of each record's image -> its split."""
    return {
        hashlib.sha1(image_path(dataset, r).read_bytes()).hexdigest(): r.split
        for r in load_records(dataset)
    }


def _sources(tmp_path):
    photos = tmp_path / "photos"
    names = [f"img{i:02d}.png" for i in range(N)]
    for i, name in enumerate(names):
        write_noise(photos / name, seed=i)
        (photos / name).with_suffix(".txt").write_text(f"picture number {i}\n")
    (tmp_path / "t.csv").write_text(
        "image,caption\n" + "".join(f"photos/{n},picture number {i}\n" for i, n in enumerate(names))
    )
    coco = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": f"picture {i}"} for i in range(N)],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    rows = [{"filename": n, "sentences": [{"raw": f"picture {i}"}]} for i, n in enumerate(names)]
    (tmp_path / "karpathy.json").write_text(json.dumps({"dataset": "k", "images": rows}))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, name in enumerate(names):
            for member, data in (
                (f"{i:05d}.png", (photos / name).read_bytes()),
                (f"{i:05d}.txt", f"picture {i}".encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return photos


def test_every_importer_splits_the_same_images_alike(tmp_path):
    photos = _sources(tmp_path)
    import_folder(FolderConfig(str(photos)), tmp_path / "folder")
    import_table(TableConfig(str(tmp_path / "t.csv")), tmp_path / "csv")
    import_coco(CocoConfig(str(tmp_path / "coco.json"), str(photos)), tmp_path / "coco")
    import_karpathy(KarpathyConfig(str(tmp_path / "karpathy.json"), str(photos)), tmp_path / "k")
    import_webdataset(ReadConfig(str(tmp_path / "s.tar")), tmp_path / "wds")
    reference = _splits_by_content(tmp_path / "folder")
    assert len(reference) == N
    for other in ("csv", "coco", "k", "wds"):
        assert _splits_by_content(tmp_path / other) == reference, other
    counts = read_info(tmp_path / "folder")["splits"]
    assert counts["val"] >= 1 and counts["test"] >= 1


def test_a_small_gallery_still_gets_val_and_test(tmp_path):
    ids = [f"syn-6-{i:07d}" for i in range(24)]
    assert {split_of(i) for i in ids} == {"train"}  # the per-item rule alone: no val, no test
    result = import_synthetic(SyntheticConfig(count=24, seed=6, size=32, workers=1), tmp_path)
    assert result.info["splits"] == {"train": 22, "val": 1, "test": 1}
    moved = result.info["moved"]
    assert sorted(moved.values()) == ["test", "val"]
    assert {r.id: r.split for r in load_records(tmp_path) if r.split != "train"} == moved
    few = import_synthetic(SyntheticConfig(count=19, seed=6, size=32, workers=1), tmp_path / "s")
    assert few.info["splits"]["val"] == 0 and few.info["moved"] == {}  # under 20 items
