"""Building an index: read the sources, embed them (resumably) and publish the rows and vectors
as a new version of any backend's store."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import embed
from index_builder.backends import open_store
from index_builder.backends.base import SIDES, IndexOptions, Store
from index_builder.bundle import Bundle
from index_builder.data.common import Skips
from index_builder.manifest import dataset_root, manifest_path, read_info
from index_builder.sources import SourceOptions, dataset_rows, image_rows, text_rows
from index_builder.video_index import finish_video_rows, is_video_row, video_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedOptions:
    """How to run the embedding stage."""

    engine: str = "local"
    shard_size: int = 4096
    batch_size: int = 16  # small batches: less padding, warmer caches on a CPU
    threads: int | None = None
    workers: int = 1


Shards = Sequence[np.ndarray]
Rows = dict[str, list[dict[str, Any]]]
MAX_NAMED = 100  # unreadable inputs named in index.json (all are counted)


@dataclass(frozen=True)
class Sources:
    """What to index: a captioned dataset (both sides) and/or an image source and a text
    source, each optional (see `index_builder.sources`)."""

    data: str | None = None
    images: str | None = None
    texts: str | None = None
    options: SourceOptions = SourceOptions()

    def describe(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"images": self.images, "texts": self.texts}
        if self.data:
            info = read_info(self.data)
            summary.update(
                path=str(dataset_root(self.data).resolve()),
                name=info.get("name"),
                fingerprint=info.get("fingerprint"),
            )
        return {**summary, "split": self.options.split}


def read_sources(root: Path, sources: Sources) -> tuple[Rows, dict[str, Skips]]:
    """Rows per side from the sources, and the rows skipped while reading them."""
    skips = {side: Skips(examples=MAX_NAMED) for side in SIDES}
    rows: Rows = {side: [] for side in SIDES}
    if sources.data:
        manifest_path(sources.data)  # a missing dataset is a clear error here
        rows = dataset_rows(sources.data, sources.options.split)
    if sources.images:
        files = root / "files"
        rows["image"] = image_rows(sources.images, sources.options, files, skips["image"])
    if sources.texts:
        rows["text"] = text_rows(sources.texts, sources.options, skips["text"])
    if not rows["image"] and not rows["text"]:
        raise ValueError("empty gallery: the sources hold no usable images or texts")
    return rows, skips


def embed_rows(
    root: Path, bundle: Bundle, rows: Rows, embedding: EmbedOptions, skips: dict[str, Skips]
) -> tuple[Path, Rows, dict[str, list[np.ndarray]]]:
    """Embed every row (resumably); images and videos that cannot be decoded are dropped with
    their captions and counted in `skips`. Returns the work directory, kept rows and shards.
    Video files become video rows with keyframes (index_builder/video_index.py)."""
    rows = {**rows, "image": video_rows(rows["image"], root / "files", bundle)}
    work = embed.work_dir_for(root, bundle, rows)
    embed.prepare(work, bundle, rows, embedding.shard_size)
    paths = embed.embed_work(
        work, bundle, embedding.engine, embedding.threads, embedding.batch_size, embedding.workers
    )
    shards = {side: embed.load_shards(paths[side]) for side in SIDES}
    finish_video_rows(rows["image"])
    bad = embed.skipped_ids(paths["image"])
    if not bad:
        return work, rows, shards
    videos = {row["id"] for row in rows["image"] if is_video_row(row)}
    for item in bad:
        what = "video" if item["id"] in videos else "image"
        skips["image"].add(f"unreadable {what} ({item['reason']})", item["id"])
    gone = {item["id"] for item in bad}
    keep = {
        "image": [row["id"] not in gone for row in rows["image"]],
        "text": [row.get("image_id") not in gone for row in rows["text"]],
    }
    kept = {side: [r for r, k in zip(rows[side], keep[side], strict=True) if k] for side in SIDES}
    return work, kept, {side: _select(shards[side], keep[side]) for side in SIDES}


def _select(shards: Shards, keep: list[bool]) -> list[np.ndarray]:
    """The kept rows of each shard (shards without a dropped row stay memory-mapped)."""
    out, start = [], 0
    for shard in shards:
        mask = np.asarray(keep[start : start + len(shard)], dtype=bool)
        out.append(shard if mask.all() else np.asarray(shard)[mask])
        start += len(shard)
    return out


def skip_record(skips: Skips) -> dict[str, Any]:
    return {"count": skips.total, "reasons": dict(skips.counts), "examples": skips.examples}


def describe_skips(record: dict[str, Any], indent: str = "", named: int = 5) -> str:
    """A skip record for a person: the count, then one line per named item with its whole
    reason, then the count per reason of those not named."""
    lines = [f"{indent}skipped {record['count']} inputs:"]
    lines += [f"{indent}  {example}" for example in record["examples"][:named]]
    if record["count"] > named:
        reasons = ", ".join(f"{n} {reason}" for reason, n in record["reasons"].items())
        lines.append(f"{indent}  ... {record['count'] - named} more; in all: {reasons}")
    return "\n".join(lines)


def index_sources(
    root: str | Path,
    bundle: Bundle,
    sources: Sources,
    options: IndexOptions | None = None,
    embedding: EmbedOptions | None = None,
    keep: int = 3,
    store: Store | None = None,
) -> str:
    """Read the sources, embed them (resumably) and publish a new version built from them
    into `store` (default: the FAISS versions under `root`; any backend's store works, and
    `root` then holds only the embedding work files and copied images)."""
    root = Path(root)
    options = options or IndexOptions()
    store = store or open_store(root, keep=keep)
    store.check_options(options, bundle.embed_dim)  # fail before the embedding pass
    rows, skips = read_sources(root, sources)
    work, rows, shards = embed_rows(root, bundle, rows, embedding or EmbedOptions(), skips)
    version = store.publish(
        bundle_id=bundle.bundle_id,
        dim=bundle.embed_dim,
        shards=shards,
        rows=rows,
        options=options,
        dataset=sources.describe(),
        bundle_path=bundle.path,
        skipped={side: skip_record(skips[side]) for side in SIDES},
    )
    shutil.rmtree(work, ignore_errors=True)  # the embeddings now live in the index
    return version
