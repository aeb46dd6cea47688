"""MSR-VTT: the annotation JSON (`videos` + `sentences`) and its folder of `<video_id>.mp4`.

Splits: the JSON's own (train / validate / test: 6,513 / 497 / 2,990 videos), or with
`--test-list` the 1k-A protocol (JSFusion): the 1,000 videos of `MSRVTT_JSFUSION_test.csv` are
the test split, each with the one caption of its `sentence` column, and the other 9,000
videos (the "9k" training set, all 20 captions each) are the train split.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    load_json_input,
    progress,
    run_import,
)
from index_builder.data.video_folder import read_video
from index_builder.manifest import Record

VERSION = 1
SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


@dataclass(frozen=True)
class MsrvttConfig:
    annotations: str  # MSRVTT_data.json (or train_val_videodatainfo.json)
    videos: str  # folder of <video_id>.mp4
    test_list: str = ""  # MSRVTT_JSFUSION_test.csv: the 1k-A test split


def read_test_list(path: Path) -> dict[str, str]:
    """video_id -> its 1k-A test sentence ('' when the CSV has no sentence column)."""
    if not path.is_file():
        raise FileNotFoundError(f"1k-A test list not found: {path}")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "video_id" not in rows[0]:
        raise ValueError(f"{path} must be a CSV with a video_id column (MSRVTT_JSFUSION_test.csv)")
    return {row["video_id"]: " ".join((row.get("sentence") or "").split()) for row in rows}


def _parse(obj: Any, path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("videos"), list):
        raise ValueError(f"{path} is not an MSR-VTT annotation file (no 'videos' list)")
    captions: dict[str, list[str]] = defaultdict(list)
    for sentence in obj.get("sentences") or []:
        if isinstance(sentence, dict) and isinstance(sentence.get("caption"), str):
            captions[str(sentence.get("video_id"))].append(" ".join(sentence["caption"].split()))
    videos = [v for v in obj["videos"] if isinstance(v, dict) and v.get("video_id")]
    return videos, captions


def import_msrvtt(cfg: MsrvttConfig, out: str | Path) -> ImportResult:
    annotations = Path(cfg.annotations)
    folder = Path(cfg.videos).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"MSR-VTT video folder not found: {folder}")
    videos, captions = _parse(load_json_input(annotations, "MSR-VTT annotations"), annotations)
    test = read_test_list(Path(cfg.test_list)) if cfg.test_list else None
    inputs = [annotations, *([Path(cfg.test_list)] if cfg.test_list else [])]
    fp = fingerprint("msrvtt", {"videos": str(folder), "version": VERSION}, inputs)
    protocol = "1k-A" if test is not None else "official"
    info = {"name": Path(out).name, "source": "msrvtt", "media": "video", "protocol": protocol}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:  # the splits are MSR-VTT's
        for video in progress(videos, "msrvtt", len(videos)):
            vid = str(video["video_id"])
            split, texts = _split_and_captions(video, captions.get(vid, []), test)
            path = folder / f"{vid}.mp4"
            problem = None if texts else "no caption"
            problem = problem or ("missing video" if not path.is_file() else None)
            problem = problem or (None if split else f"unknown split {video.get('split')!r}")
            problem = problem or read_video(path)[1]
            if problem:
                skips.add(problem, vid)
                continue
            meta = {k: video[k] for k in ("category", "start time", "end time") if k in video}
            yield Record(vid, str(path), tuple(texts), str(split), meta)

    return run_import(out, info, fp, produce)


def _split_and_captions(
    video: dict, texts: list[str], test: dict[str, str] | None
) -> tuple[str | None, list[str]]:
    vid = str(video["video_id"])
    if test is None:
        return SPLITS.get(str(video.get("split"))), texts
    if vid in test:
        return "test", [test[vid]] if test[vid] else texts
    return "train", texts
