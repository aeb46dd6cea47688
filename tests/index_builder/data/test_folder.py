from __future__ import annotations

import pytest
from data_fixtures import write_image, write_truncated

from index_builder.data.folder import FolderConfig, import_folder
from index_builder.manifest import load_records


def test_sidecar_captions_one_per_line(tmp_path, caplog):
    root = tmp_path / "photos"
    write_image(root / "a.jpg", fmt="JPEG")
    (root / "a.txt").write_text("a red photo\n\n  another   caption \n")
    write_image(root / "trip/b.png")
    (root / "trip/b.txt").write_text("a beach\n")
    write_image(root / "no_caption.png")
    write_image(root / "empty.png")
    (root / "empty.txt").write_text("\n \n")
    (root / "bad.png").write_bytes(b"xx")
    (root / "bad.txt").write_text("bad\n")
    write_truncated(root / "cut.png")
    (root / "cut.txt").write_text("a picture cut short\n")
    (root / "trip/notes.pdf").write_bytes(b"%PDF-1.4")  # counted and named, not ignored
    result = import_folder(FolderConfig(str(root)), tmp_path / "ds")
    records = {r.id: r for r in load_records(tmp_path / "ds")}
    assert set(records) == {"folder.a", "folder.trip.b"}
    assert records["folder.a"].captions == ("a red photo", "another caption")
    assert records["folder.trip.b"].image == str(root / "trip/b.png")
    assert result.skipped == {
        "no sidecar .txt": 1,
        "empty caption": 1,
        "unreadable image": 1,
        "truncated or corrupt image": 1,
        "not an image": 1,
    }
    assert "trip/notes.pdf: not an image" in caplog.text
    assert import_folder(FolderConfig(str(root)), tmp_path / "ds").up_to_date
    (root / "trip/b.txt").write_text("a sandy beach\n")  # an edited caption is noticed
    import_folder(FolderConfig(str(root)), tmp_path / "ds")
    assert load_records(tmp_path / "ds")[1].captions == ("a sandy beach",)


def test_folder_whole_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        import_folder(FolderConfig(str(tmp_path / "none")), tmp_path / "ds")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        import_folder(FolderConfig(str(tmp_path / "docs")), tmp_path / "ds")
