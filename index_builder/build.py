"""Turn embedding shards and row metadata into a published index version (build and add)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import embed, faiss_index
from index_builder.atomic import atomic_write_json
from index_builder.bundle import Bundle
from index_builder.data.common import Skips
from index_builder.filters import field_types
from index_builder.manifest import dataset_root, manifest_path, read_info
from index_builder.sources import SourceOptions, dataset_rows, image_rows, text_rows
from index_builder.store import (
    FORMAT_VERSION,
    INDEX_FILES,
    INDEX_JSON,
    META_FILES,
    SIDES,
    VECTOR_FILES,
    IndexStore,
    write_jsonl,
)
from index_builder.video_index import finish_video_rows, is_video_row, video_rows

log = logging.getLogger(__name__)
OTHER = {"image": "text", "text": "image"}
K = faiss_index.TUNE_K  # search parameters are tuned for recall@K


@dataclass(frozen=True)
class IndexOptions:
    """How to index each side; `factory` None chooses from the gallery size and budget."""

    factory: str | None = None
    memory_budget: int = 4 << 30
    target_recall: float = 0.95
    queries: int = 1000
    on_disk: bool = False
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.memory_budget <= 0:
            raise ValueError(f"memory budget must be positive, got {self.memory_budget}")


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


def index_side(
    side: str,
    shards: Shards,
    query_shards: Shards | None,
    dim: int,
    options: IndexOptions,
    out: Path,
) -> dict[str, Any]:
    """Build, save and tune one side, and store its vectors beside the index; recall is
    measured with the other side's vectors as queries (captions against the image index,
    images against the caption index), or with the side's own when it stands alone."""
    count = sum(len(s) for s in shards)
    if count == 0:
        raise ValueError(f"cannot index an empty gallery ({side} side has no vectors)")
    factory = options.factory or faiss_index.choose_factory(count, dim, options.memory_budget)
    started = time.perf_counter()
    file = out / INDEX_FILES[side]
    if options.on_disk:
        ivfdata = file.with_suffix(".ivfdata")
        index = faiss_index.build_ivf_on_disk(factory, shards, dim, file, ivfdata)
    else:
        index = faiss_index.build_index(factory, shards, dim, options.use_gpu)
        faiss_index.write_index(index, file)
    write_vectors(out / VECTOR_FILES[side], shards, dim)
    seconds = time.perf_counter() - started
    query_side = OTHER[side] if query_shards else side
    queries = faiss_index.sample_rows(query_shards or shards, options.queries, seed=1)
    truth = faiss_index.exact_knn(queries, shards, min(K, count))
    stored = np.load(out / VECTOR_FILES[side], mmap_mode="r")
    params, recall = faiss_index.tune(index, queries, truth, options.target_recall, stored=stored)
    log.info(
        "%s index %s: %d vectors, recall@10 %.3f with %s", side, factory, count, recall, params
    )
    return {
        "factory": factory,
        "count": count,
        "rows": count,
        "deleted": 0,
        "file": file.name,
        "meta": META_FILES[side],
        "vectors": VECTOR_FILES[side],
        "search_params": params,
        "recall_at_10": round(recall, 4),
        "target_recall": options.target_recall,
        "queries": len(queries),
        "query_side": query_side,
        "bytes": sum(p.stat().st_size for p in out.glob(f"{side}.*") if p.suffix == ".faiss"),
        "build_seconds": round(seconds, 3),
    }


def write_vectors(path: Path, shards: Shards, dim: int) -> None:
    """The shards as one row-aligned float32 `.npy` file, written shard by shard."""
    total = sum(len(s) for s in shards)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, dim))
    start = 0
    for shard in shards:
        out[start : start + len(shard)] = shard
        start += len(shard)
    out.flush()
    del out


def publish(
    store: IndexStore,
    *,
    bundle_id: str,
    dim: int,
    shards: Mapping[str, Shards],
    rows: dict[str, list[dict[str, Any]]],
    options: IndexOptions,
    dataset: dict[str, Any],
    bundle_path: str | Path | None = None,
    skipped: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Build the sides that have rows into a new version and make it current; returns the
    version name. A side without rows is absent from the version (a photo folder has no
    captions, a text corpus no images).

    `bundle_path` (the bundle's directory) is recorded so that a service following the index
    can load the bundle a version was built with; `skipped` (per side: count and examples of
    unreadable inputs) is recorded with each side."""
    present = [side for side in SIDES if rows.get(side)]
    if not present:
        raise ValueError("empty gallery: no images and no texts to index")
    for side in present:
        if sum(len(s) for s in shards[side]) != len(rows[side]):
            raise ValueError(f"{side} side: vector count does not match the metadata rows")
    with store.new_version() as staging:
        sides = {}
        for side in present:
            write_jsonl(staging / META_FILES[side], rows[side])
            other = shards[OTHER[side]] if OTHER[side] in present else None
            sides[side] = index_side(side, shards[side], other, dim, options, staging)
            sides[side]["fields"] = field_types(row.get("meta") or {} for row in rows[side])
            sides[side]["skipped"] = (skipped or {}).get(side, {"count": 0, "examples": []})
        write_info(staging, bundle_id, bundle_path, dim, dataset, None, sides)
        version = staging.name
    return version


def write_info(
    staging: Path,
    bundle_id: str,
    bundle_path: str | Path | None,
    dim: int,
    dataset: dict[str, Any],
    parent: str | None,
    sides: dict[str, Any],
) -> None:
    info = info_record(staging.name, bundle_id, bundle_path, dim, dataset, parent, sides)
    atomic_write_json(staging / INDEX_JSON, info)


def info_record(
    version: str,
    bundle_id: str,
    bundle_path: str | Path | None,
    dim: int,
    dataset: dict[str, Any],
    parent: str | None,
    sides: dict[str, Any],
) -> dict[str, Any]:
    """What a version records about itself (index.json; a Milvus version's record)."""
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle_id": bundle_id,
        "bundle_path": str(Path(bundle_path).resolve()) if bundle_path else None,
        "embed_dim": dim,
        "metric": "inner_product",
        "dataset": dataset,
        "parent": parent,
        "sides": sides,
    }


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
    store: Any = None,
) -> str:
    """Read the sources, embed them (resumably) and publish a new version built from them
    into `store` (default: the FAISS versions under `root`; any backend's store works, and
    `root` then holds only the embedding work files and copied images)."""
    root = Path(root)
    options = options or IndexOptions()
    store = store or IndexStore(root, keep)
    if options.factory:  # fail before the embedding pass, not after it
        faiss_index.make_index(options.factory, bundle.embed_dim)
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
