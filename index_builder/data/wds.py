"""WebDataset tar shards (img2dataset / open_clip layout), read and written with stdlib tarfile.

A sample is the run of consecutive tar members sharing a key: `key.jpg|png|webp` (or a video,
`key.mp4|webm|mkv|mov|avi`) plus `key.txt` (one caption per line) and/or `key.json` (`caption`
or `captions`, optional `id` and `split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.atomic import atomic_open, atomic_write_bytes, atomic_write_json, read_json
from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    decode_problem,
    fingerprint,
    prepare_render_dir,
    progress,
    run_import,
)
from index_builder.manifest import SPLITS, Record, image_path, manifest_path, read_manifest
from index_builder.video import VIDEO_EXTENSIONS, VideoError, probe_video

log = logging.getLogger(__name__)

VERSION = 2  # 2: full decode, split by content
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTS = tuple(e.lstrip(".") for e in VIDEO_EXTENSIONS)
SHARDS_INFO = "shards.json"
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's base_plus_ext


@dataclass(frozen=True)
class ReadConfig:
    shards: str  # a path or a brace pattern: data/shards-{000..009}.tar


@dataclass(frozen=True)
class WriteConfig:
    dataset: str  # dataset directory (or manifest) to write out
    shard_size: int = 1000  # samples per shard
    split: str = ""  # only this split ("" = all)


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar; `{x,y}` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def shard_paths(pattern: str) -> list[Path]:
    paths = [Path(p) for p in expand_braces(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    return paths


def iter_samples(shard: Path, skips: Skips) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample, streaming through the tar."""
    try:
        tar = tarfile.open(shard, "r:*")  # noqa: SIM115  (closed by the `with` below)
    except tarfile.TarError as exc:
        raise ValueError(f"{shard} is not a tar file: {exc}") from None
    key, parts = "", dict[str, bytes]()
    with tar:
        try:
            for member in tar:
                match = _KEY.match(member.name)
                handle = tar.extractfile(member) if member.isfile() else None
                if not match or handle is None:
                    continue
                if match.group(1) != key:
                    if parts:
                        yield key, parts
                    key, parts = match.group(1), {}
                parts[match.group(2).lower()] = handle.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            skips.add(f"truncated shard ({type(exc).__name__})", shard.name)
    if parts:
        yield key, parts


def sample_captions(parts: dict[str, bytes]) -> tuple[list[str], dict[str, Any]]:
    """Captions from key.json (`captions` or `caption`) or else key.txt lines; plus the json."""
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            loaded = json.loads(parts["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    found = meta.get("captions", meta.get("caption"))
    captions = [found] if isinstance(found, str) else found if isinstance(found, list) else []
    if not captions and "txt" in parts:
        captions = parts["txt"].decode("utf-8", errors="replace").splitlines()
    return [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()], meta


def video_problem(data: bytes) -> str | None:
    """Why video bytes cannot be used (the container checks, no decoding), or None."""
    try:
        probe_video(data)
    except VideoError as exc:
        return f"unusable video ({exc.code})"
    return None


def _sample_record(
    key: str, parts: dict[str, bytes], shard: Path, seen: set[str], splits: Splits
) -> Any:
    """(record, media bytes, destination) for a usable sample, or the reason it is not.

    The split is the json `split` when valid, else the shared rule on the image's digest.
    """
    ext = next((e for e in (*IMAGE_EXTS, *VIDEO_EXTS) if e in parts), None)
    if ext is None:
        return "no image"
    captions, meta = sample_captions(parts)
    if not captions:
        return "empty caption"
    problem = video_problem(parts[ext]) if ext in VIDEO_EXTS else decode_problem(parts[ext])
    if problem:
        return problem
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", key.replace("/", "."))
    rid = meta["id"] if isinstance(meta.get("id"), str) and meta["id"] else f"wds.{safe}"
    if rid in seen:
        return "duplicate id"
    split = meta.get("split")
    if split not in SPLITS:
        split = splits.assign(rid, hashlib.sha1(parts[ext]).hexdigest())
    folder = "videos" if ext in VIDEO_EXTS else "images"
    rel = f"{folder}/{shard.stem}/{safe}.{ext}"
    extra: dict[str, Any] = meta["meta"] if isinstance(meta.get("meta"), dict) else {}
    return Record(rid, rel, tuple(captions), split, {**extra, "key": key}), parts[ext], rel


def import_webdataset(cfg: ReadConfig, out: str | Path) -> ImportResult:
    shards = shard_paths(cfg.shards)
    fp = fingerprint("webdataset", {"version": VERSION}, [p.resolve() for p in shards])
    info = {"name": Path(out).name, "source": "webdataset", "shards": cfg.shards}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        root = Path(out)
        reuse = prepare_render_dir(root / "images", {"source": "webdataset", "fingerprint": fp})
        seen: set[str] = set()
        for shard in progress(shards, "webdataset shards", len(shards)):
            for key, parts in iter_samples(shard, skips):
                made = _sample_record(key, parts, shard, seen, splits)
                if isinstance(made, str):
                    skips.add(made, f"{shard.name}:{key}")
                    continue
                record, data, rel = made
                seen.add(record.id)
                if not (reuse and (root / rel).exists()):
                    atomic_write_bytes(root / rel, data)
                yield record

    return run_import(out, info, fp, produce)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)  # fixed owner and time: the same dataset gives the same bytes
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    tar.addfile(member, io.BytesIO(data))


def write_webdataset(cfg: WriteConfig, out: str | Path) -> dict[str, Any]:
    """Write a dataset as `shard-NNNNNN.tar` files of `shard_size` samples plus shards.json."""
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    if cfg.split and cfg.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    source = manifest_path(cfg.dataset)
    out = Path(out)
    fp = fingerprint("to-webdataset", {**cfg.__dict__, "dataset": str(source.resolve())}, [source])
    if (out / SHARDS_INFO).is_file() and read_json(out / SHARDS_INFO).get("fingerprint") == fp:
        log.info("%s is up to date (fingerprint %s)", out, fp)
        return {**read_json(out / SHARDS_INFO), "up_to_date": True}
    skips = Skips()
    shards: list[str] = []
    count = 0
    records = read_manifest(source, cfg.split or None)
    batch: list[Record] = []
    for record in progress(records, "to-webdataset"):
        batch.append(record)
        if len(batch) == cfg.shard_size:
            count += _write_shard(out / f"shard-{len(shards):06d}.tar", batch, source, count, skips)
            shards.append(f"shard-{len(shards):06d}.tar")
            batch = []
    if batch:
        count += _write_shard(out / f"shard-{len(shards):06d}.tar", batch, source, count, skips)
        shards.append(f"shard-{len(shards):06d}.tar")
    if not count:
        raise ValueError(f"no samples to write from {source}")
    if skips.total:
        log.warning("%s", skips.summary())
    pattern = f"shard-{{000000..{len(shards) - 1:06d}}}.tar"
    info = {
        "fingerprint": fp,
        "count": count,
        "shards": shards,
        "pattern": pattern,
        "skipped": dict(skips.counts),
    }
    atomic_write_json(out / SHARDS_INFO, info)
    return info


def _write_shard(path: Path, batch: list[Record], source: Path, start: int, skips: Skips) -> int:
    """Write one shard atomically; returns how many samples went in."""
    written = 0
    with atomic_open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
        for record in batch:
            image = image_path(source, record)
            if not image.is_file():
                skips.add("missing image", record.id)
                continue
            key = f"{start + written:09d}"
            ext = image.suffix.lower().lstrip(".") or "png"
            obj = {"id": record.id, "captions": list(record.captions), "split": record.split}
            _add(tar, f"{key}.{ext}", image.read_bytes())
            _add(tar, f"{key}.txt", "\n".join(record.captions).encode())
            _add(tar, f"{key}.json", json.dumps({**obj, "meta": record.meta}).encode())
            written += 1
    return written
