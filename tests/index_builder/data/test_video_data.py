"""Video importers: the synthetic gallery (order decides), a video folder, MSR-VTT, WebDataset."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from data_fixtures import run_cli
from tiny_videos import bad_videos, colour_clip, over_default_limits

from index_builder.data.msrvtt import MsrvttConfig, import_msrvtt
from index_builder.data.synthetic_video import (
    SyntheticVideoConfig,
    captions,
    clip_events,
    event_pairs,
    import_synthetic_video,
    render_clip,
)
from index_builder.data.video_folder import VideoFolderConfig, import_video_folder
from index_builder.data.wds import ReadConfig, import_webdataset
from index_builder.manifest import image_path, load_records, read_info
from index_builder.video import decode_video

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_synthetic_pairs_hold_the_same_frames_in_another_order():
    for pair in range(20):
        first, second = clip_events(3, 2 * pair), clip_events(3, 2 * pair + 1)
        assert first == (second[1], second[0])
        a, b = render_clip(first, 32, 8), render_clip(second, 32, 8)
        np.testing.assert_array_equal(np.stack(a[:4]), np.stack(b[4:]))
        np.testing.assert_array_equal(np.stack(a[4:]), np.stack(b[:4]))
        assert captions(first) != captions(second)
        words = [Counter(captions(e)[1].split()) for e in (first, second)]
        assert words[0] == words[1]  # the same words: only their order differs
    assert captions(first)[0] == f"{first[0].phrase()}, then {first[1].phrase()}"
    pairs = event_pairs(0)
    assert len(pairs) == len(set(pairs)) == 5376  # 7 colours x 4 shapes x 4 verbs, 2 colours
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # never also as (B, A)


def test_synthetic_gallery_is_deterministic_and_decodable(tmp_path):
    cfg = SyntheticVideoConfig(count=20, seed=1, size=32, frames=8, fps=8, workers=1)
    result = import_synthetic_video(cfg, tmp_path / "a")
    records = load_records(tmp_path / "a")
    assert len(records) == 20 and result.info["media"] == "video"
    by_pair: dict[int, set[str]] = {}
    for record in records:
        by_pair.setdefault(record.meta["pair"], set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_pair.values())  # a pair never straddles splits
    clip = decode_video(image_path(tmp_path / "a", records[0]), 8)
    assert clip.count == 8 and clip.width == 32
    again = import_synthetic_video(cfg, tmp_path / "a")
    assert again.up_to_date
    import_synthetic_video(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "manifest.jsonl").read_text() == (
        tmp_path / "b" / "manifest.jsonl"
    ).read_text()
    with pytest.raises(ValueError, match="even"):
        import_synthetic_video(SyntheticVideoConfig(count=11), tmp_path / "c")


def _video_folder(root):
    (root / "trip").mkdir(parents=True)
    (root / "trip" / "red.mp4").write_bytes(colour_clip([RED]))
    (root / "trip" / "red.txt").write_text("a red clip\nall red\n")
    (root / "blue.webm").write_bytes(colour_clip([BLUE]))  # MP4 bytes, webm name: FFmpeg probes
    (root / "blue.txt").write_text("a blue clip\n")
    (root / "nocaption.mp4").write_bytes(colour_clip([RED]))
    for name, data in {**bad_videos(), **over_default_limits()}.items():
        (root / f"bad-{name}.mp4").write_bytes(data)
        (root / f"bad-{name}.txt").write_text(f"a {name} file\n")
    return root


def test_video_folder_counts_bad_videos_as_skips(tmp_path):
    folder = _video_folder(tmp_path / "clips")
    result = import_video_folder(VideoFolderConfig(str(folder)), tmp_path / "ds")
    records = {r.id: r for r in load_records(tmp_path / "ds")}
    assert sorted(records) == ["video.blue", "video.trip.red"]
    assert records["video.trip.red"].captions == ("a red clip", "all red")
    assert sum(result.skipped.values()) == 9
    assert result.skipped["no sidecar .txt"] == 1
    assert result.skipped["unusable video (corrupt_video)"] == 2  # corrupt, truncated
    for code in ("audio_only", "not_a_video", "unknown_codec", "empty_video"):
        assert result.skipped[f"unusable video ({code})"] == 1
    for code in ("too_many_pixels", "video_too_long"):
        assert result.skipped[f"unusable video ({code})"] == 1
    assert read_info(tmp_path / "ds")["media"] == "video"


def test_video_folder_cli(tmp_path):
    folder = _video_folder(tmp_path / "clips")
    done = run_cli("data", "video-folder", str(folder), "--out", str(tmp_path / "ds"))
    assert done.returncode == 0, done.stderr
    assert "2 videos" in done.stdout and "9 skipped" in done.stdout


def _msrvtt(root):
    videos = root / "videos"
    videos.mkdir(parents=True)
    sentences = []
    for i in range(5):
        (videos / f"video{i}.mp4").write_bytes(colour_clip([RED if i % 2 else BLUE]))
        sentences += [{"video_id": f"video{i}", "caption": f"clip {i} caption {j}"} for j in (0, 1)]
    (videos / "video1.mp4").write_bytes(bad_videos()["truncated"])
    meta = [{"video_id": f"video{i}", "split": s, "category": i} for i, s in
            enumerate(["train", "train", "validate", "test", "test", "test"])]  # fmt: skip
    annotations = root / "MSRVTT_data.json"
    annotations.write_text(json.dumps({"videos": meta, "sentences": sentences}))
    test_list = root / "MSRVTT_JSFUSION_test.csv"
    test_list.write_text("key,vid_key,video_id,sentence\nret0,msr3,video3,the 1k-A caption\n")
    return annotations, videos, test_list


def test_msrvtt_official_and_1k_a_splits(tmp_path):
    annotations, videos, test_list = _msrvtt(tmp_path)
    official = import_msrvtt(MsrvttConfig(str(annotations), str(videos)), tmp_path / "off")
    records = {r.id: r for r in load_records(tmp_path / "off")}
    assert {k: r.split for k, r in records.items()} == {
        "video0": "train",
        "video2": "val",
        "video3": "test",
        "video4": "test",
    }
    assert records["video0"].captions == ("clip 0 caption 0", "clip 0 caption 1")
    assert records["video3"].meta == {"category": 3}
    assert official.skipped == {"unusable video (corrupt_video)": 1, "no caption": 1}
    import_msrvtt(MsrvttConfig(str(annotations), str(videos), str(test_list)), tmp_path / "1ka")
    records = {r.id: r for r in load_records(tmp_path / "1ka")}
    assert records["video3"].split == "test" and records["video3"].captions == ("the 1k-A caption",)
    assert {r.split for k, r in records.items() if k != "video3"} == {"train"}
    assert read_info(tmp_path / "1ka")["protocol"] == "1k-A"


def test_webdataset_video_members(tmp_path):
    shard = tmp_path / "shard-000.tar"
    members = [
        ("a.mp4", colour_clip([RED])),
        ("a.txt", b"a red clip"),
        ("b.mp4", bad_videos()["audio-only"]),
        ("b.txt", b"silence"),
        ("c.png", _png()),
        ("c.txt", b"a picture"),
    ]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = import_webdataset(ReadConfig(str(shard)), tmp_path / "ds")
    records = {r.id: r for r in load_records(tmp_path / "ds")}
    assert records["wds.a"].image == "videos/shard-000/a.mp4"
    assert records["wds.c"].image == "images/shard-000/c.png"
    assert decode_video(image_path(tmp_path / "ds", records["wds.a"]), 4).count == 4
    assert result.skipped == {"unusable video (audio_only)": 1}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buffer, format="PNG")
    return buffer.getvalue()
