"""Streamed gallery embedding into resumable shards: reader -> mapper -> writer (clip-retrieval).

A work directory holds `plan.json` (bundle id, rows per side, shard size), the row metadata
(`images.jsonl`, `texts.jsonl`) and one `.npy` file per shard of `shard_size` rows, written
atomically. A shard on disk is finished, so a killed run resumes with the first missing one.
`engine="ray"` runs the shards as Ray Data tasks (a local Ray or a cluster via RAY_ADDRESS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.atomic import atomic_open, atomic_write_json, read_json, read_jsonl, write_jsonl
from index_builder.backends.base import META_FILES, SIDES
from index_builder.bundle import Bundle
from index_builder.encoders import ImageEncoder, TextEncoder
from index_builder.preprocess import load_image_for, preprocess_images
from index_builder.progress import progress
from index_builder.video_index import MediaEmbedder

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
MAX_LANES = 8  # each lane holds one batch's activations in the encoder


def work_dir_for(root: Path, bundle: Bundle, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """One work directory per (bundle, rows): changed sources start afresh."""
    digest = hashlib.sha256(
        json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()[:12]
    return root / "work" / f"{bundle.bundle_id}-{digest}"


def prepare(work: Path, bundle: Bundle, rows: dict[str, list[dict]], shard_size: int) -> None:
    """Write the plan and rows; a work directory holding a different plan is cleared."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    digest = hashlib.sha256(repr([(r["id"]) for r in rows["text"]]).encode()).hexdigest()
    plan = {
        "bundle_id": bundle.bundle_id,
        "counts": {side: len(rows[side]) for side in SIDES},
        "shard_size": shard_size,
        "rows_sha256": digest,
    }
    if (work / "plan.json").is_file() and read_json(work / "plan.json") != plan:
        log.info("work directory %s holds another plan; starting afresh", work)
        shutil.rmtree(work)
    if not (work / "plan.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for side in SIDES:
            write_jsonl(work / META_FILES[side], rows[side])
        atomic_write_json(work / "plan.json", plan)


def shard_paths(work: Path, side: str) -> list[Path]:
    plan = read_json(work / "plan.json")
    count, size = plan["counts"][side], plan["shard_size"]
    return [work / f"{side}-{i:05d}.npy" for i in range(-(-count // size))]


def embed_work(
    work: Path,
    bundle: Bundle,
    engine: str = "local",
    threads: int | None = None,
    batch_size: int = 16,
    workers: int = 1,
) -> dict[str, list[Path]]:
    """Embed every missing shard of both sides; returns the shard files per side."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    done = {}
    for side in SIDES:
        paths = shard_paths(work, side)
        todo = [i for i, p in enumerate(paths) if not p.is_file()]
        if len(todo) < len(paths):
            log.info("%s: resuming, %d of %d shards done", side, len(paths) - len(todo), len(paths))
        if todo and engine == "ray":
            _embed_ray(work, bundle.path, side, todo, threads, batch_size, workers)
        elif todo:
            lanes, lane_threads = local_lanes(threads)
            embedder = ShardEmbedder(work, bundle.path, side, lane_threads, batch_size, lanes)
            for i in progress(todo, desc=f"embed {side}s", unit="shard"):
                embedder.embed_shard(i)
        done[side] = paths
    return done


def skipped_ids(paths: Sequence[Path]) -> list[dict[str, str]]:
    """The images the shards could not decode: [{"id", "reason"}] (text shards have none)."""
    found = []
    for path in paths:
        skips = path.with_suffix(".skips.json")
        if skips.is_file():
            found += read_json(skips)
    return found


def local_lanes(threads: int | None) -> tuple[int, int]:
    """(lanes, ONNX Runtime threads per lane) for this host: a lane decodes and encodes one
    batch at a time, and lanes run side by side. One thread per lane by default: on a small
    CPU, independent batches use the cores better than one session's threads, which wait on
    each other (and collapse when another process takes a core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    lanes = min(MAX_LANES, max(1, cores // (threads or 1)))
    return lanes, threads or max(1, cores // lanes)


def load_shards(paths: Sequence[Path]) -> list[np.ndarray]:
    """Memory-mapped shards: indexing reads them without loading the gallery at once."""
    return [np.load(p, mmap_mode="r") for p in paths]


class ShardEmbedder:
    """The mapper: one side's encoder; `embed_shard(i)` reads, encodes and writes shard i,
    `lanes` batches at a time (decoding one batch overlaps encoding another)."""

    def __init__(
        self,
        work: Path,
        bundle_path: Path,
        side: str,
        threads: int | None,
        batch_size: int,
        lanes: int = 2,
    ) -> None:
        self.work, self.side, self.batch_size, self.lanes = Path(work), side, batch_size, lanes
        bundle = Bundle.load(bundle_path, verify=False)
        self.bundle, self.spec = bundle, bundle.image_spec
        self.rows = read_jsonl(self.work / META_FILES[side])
        self.size = read_json(self.work / "plan.json")["shard_size"]
        self.encoder: Any = (ImageEncoder if side == "image" else TextEncoder)(
            bundle, threads=threads, batch_size=batch_size
        )

    def embed_shard(self, index: int) -> int:
        """Encode shard `index`; images that cannot be decoded get a zero vector and are
        listed in `<side>-NNNNN.skips.json` (written first: a shard file implies its list)."""
        rows = self.rows[index * self.size : (index + 1) * self.size]
        self.skipped: list[dict[str, str]] = []
        if self.side == "image" and any("video" in row for row in rows):
            parts = [self._media().embed(rows, self._skip)]
        else:
            batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            with ThreadPoolExecutor(self.lanes) as pool:  # decoding and ONNX Runtime free the GIL
                parts = list(pool.map(self._embed_batch, batches))
        order = {row["id"]: i for i, row in enumerate(rows)}  # lanes finish in any order
        self.skipped.sort(key=lambda item: order[item["id"]])
        atomic_write_json(self.work / f"{self.side}-{index:05d}.skips.json", self.skipped)
        with atomic_open(self.work / f"{self.side}-{index:05d}.npy", "wb") as handle:
            np.save(handle, np.concatenate(parts).astype(np.float32))
        return len(rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: a batch of shard numbers -> their row counts."""
        return {"rows": np.array([self.embed_shard(int(i)) for i in batch["shard"]])}

    def _embed_batch(self, batch: list[dict]) -> np.ndarray:
        """One lane's work: read (decode) and encode one batch."""
        if self.side == "text":
            return self.encoder.encode([row["text"] for row in batch])
        return self.encoder.encode_pixels(self._decode(batch))

    def _media(self) -> MediaEmbedder:
        """The embedder of a shard holding videos (index_builder/video_index.py)."""
        if not hasattr(self, "media"):
            self.media = MediaEmbedder(self.bundle, self.encoder, self._decode)
        return self.media

    def _skip(self, item_id: str, reason: str) -> None:
        self.skipped.append({"id": item_id, "reason": reason})

    def _decode(self, batch: list[dict]) -> np.ndarray:
        images: list[Image.Image | None] = []
        for row in batch:
            try:
                images.append(load_image_for(row["image"], self.spec))
            except (ValueError, OSError) as exc:
                log.warning("skipping gallery image %r: %s", row["id"], exc)
                reason = str(exc).splitlines()[0].split(" <_io.")[0]  # PIL names its file object
                self._skip(row["id"], reason)
                images.append(None)
        size = self.spec.size
        out = np.zeros((len(batch), 3, size, size), np.float32)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            out[good] = preprocess_images([im for im in images if im is not None], self.spec)
        return out


def _embed_ray(
    work: Path,
    bundle_path: Path,
    side: str,
    todo: list[int],
    threads: int | None,
    batch_size: int,
    workers: int,
) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    shards = ray.data.from_items([{"shard": i} for i in todo])
    embedded = shards.map_batches(
        ShardEmbedder,
        fn_constructor_args=(work, bundle_path, side, threads, batch_size),
        batch_size=1,
        concurrency=workers,
        num_cpus=threads or 1,
    )
    with progress(total=len(todo), desc=f"embed {side}s (ray)", unit="shard") as bar:
        for _ in embedded.iter_rows():
            bar.update()
