"""Turn embedding shards and row metadata into a published index version (build and add)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import embed, faiss_index
from index_builder.atomic import atomic_write_json
from index_builder.bundle import Bundle
from index_builder.manifest import dataset_root, load_records, manifest_path, read_info
from index_builder.store import (
    FORMAT_VERSION,
    INDEX_FILES,
    INDEX_JSON,
    META_FILES,
    SIDES,
    IndexStore,
    LoadedIndex,
    write_jsonl,
)

log = logging.getLogger(__name__)
OTHER = {"image": "text", "text": "image"}
K = 10


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


def index_side(
    side: str, shards: Shards, query_shards: Shards, dim: int, options: IndexOptions, out: Path
) -> dict[str, Any]:
    """Build, save and tune one side; recall is measured with the other side's vectors as
    queries (captions against the image index, images against the caption index)."""
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
    seconds = time.perf_counter() - started
    queries = faiss_index.sample_rows(query_shards, options.queries, seed=1)
    params, recall = faiss_index.tune(
        index, queries, faiss_index.exact_knn(queries, shards, min(K, count)), options.target_recall
    )
    log.info(
        "%s index %s: %d vectors, recall@10 %.3f with %s", side, factory, count, recall, params
    )
    return {
        "factory": factory,
        "count": count,
        "file": file.name,
        "meta": META_FILES[side],
        "search_params": params,
        "recall_at_10": round(recall, 4),
        "target_recall": options.target_recall,
        "queries": len(queries),
        "bytes": sum(p.stat().st_size for p in out.glob(f"{side}.*") if p.suffix != ".jsonl"),
        "build_seconds": round(seconds, 3),
    }


def publish(
    store: IndexStore,
    *,
    bundle_id: str,
    dim: int,
    shards: dict[str, Shards],
    rows: dict[str, list[dict[str, Any]]],
    options: IndexOptions,
    dataset: dict[str, Any],
    bundle_path: str | Path | None = None,
) -> str:
    """Build both sides into a new version and make it current; returns the version name.

    `bundle_path` (the bundle's directory) is recorded so that a service following the index
    can load the bundle a version was built with."""
    for side in SIDES:
        if sum(len(s) for s in shards[side]) != len(rows[side]):
            raise ValueError(f"{side} side: vector count does not match the metadata rows")
    with store.new_version() as staging:
        for side in SIDES:
            write_jsonl(staging / META_FILES[side], rows[side])
        sides = {
            side: index_side(side, shards[side], shards[OTHER[side]], dim, options, staging)
            for side in SIDES
        }
        _write_info(staging, bundle_id, bundle_path, dim, dataset, None, sides)
        version = staging.name
    return version


def add(
    store: IndexStore,
    current: LoadedIndex,
    vectors: dict[str, np.ndarray],
    rows: dict[str, list[dict[str, Any]]],
    dataset: dict[str, Any],
    bundle_path: str | Path | None = None,
) -> str:
    """A new version holding the current one plus new vectors (no retraining).

    Recall is re-measured where the index can return its stored vectors exactly (flat
    codes); for compressed codes it is recorded as null (run a rebuild to measure it).
    `bundle_path` defaults to the one the current version records."""
    known = {row["id"] for row in current.images}
    clash = sorted(known & {row["id"] for row in rows["image"]})
    if clash:
        raise ValueError(f"{len(clash)} image ids are already in the index, e.g. {clash[0]!r}")
    with store.new_version() as staging:
        sides = {}
        for side in SIDES:
            index = current.indexes[side]
            if _on_disk(index):
                raise ValueError("an on-disk index cannot be appended to; run `cots index rebuild`")
            index.add(np.ascontiguousarray(vectors[side], dtype=np.float32))
            faiss_index.write_index(index, staging / INDEX_FILES[side])
            write_jsonl(staging / META_FILES[side], current.rows(side) + rows[side])
            sides[side] = {**current.info["sides"][side], "count": int(index.ntotal)}
        for side in SIDES:
            sides[side].update(_remeasure(current, side, sides[side]["target_recall"]))
            sides[side]["bytes"] = (staging / INDEX_FILES[side]).stat().st_size
        path = bundle_path or current.info.get("bundle_path")
        _write_info(
            staging, current.bundle_id, path, current.embed_dim, dataset, current.version, sides
        )
        version = staging.name
    return version


def _remeasure(current: LoadedIndex, side: str, target: float) -> dict[str, Any]:
    index, other = current.indexes[side], current.indexes[OTHER[side]]
    base, queries_from = _exact_vectors(index), _exact_vectors(other)
    if base is None or queries_from is None:
        return {"recall_at_10": None}
    queries = faiss_index.sample_rows([queries_from], 1000, seed=1)
    truth = faiss_index.exact_knn(queries, [base], min(K, len(base)))
    params, recall = faiss_index.tune(index, queries, truth, target)
    return {"search_params": params, "recall_at_10": round(recall, 4), "queries": len(queries)}


def _exact_vectors(index: Any) -> np.ndarray | None:
    """All stored vectors, when the index keeps them uncompressed (Flat, HNSW, IVF-Flat)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        if not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat):
            return None
        ivf.make_direct_map()
    except RuntimeError:
        base = faiss.downcast_index(index)
        storage = faiss.downcast_index(base.storage) if hasattr(base, "storage") else base
        if not isinstance(storage, faiss.IndexFlat):
            return None
    return index.reconstruct_n(0, index.ntotal)


def _on_disk(index: Any) -> bool:
    import faiss

    try:
        invlists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return False
    return invlists is not None and isinstance(
        faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists
    )


def _write_info(
    staging: Path,
    bundle_id: str,
    bundle_path: str | Path | None,
    dim: int,
    dataset: dict[str, Any],
    parent: str | None,
    sides: dict[str, Any],
) -> None:
    atomic_write_json(
        staging / INDEX_JSON,
        {
            "format_version": FORMAT_VERSION,
            "version": staging.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle_id": bundle_id,
            "bundle_path": str(Path(bundle_path).resolve()) if bundle_path else None,
            "embed_dim": dim,
            "metric": "inner_product",
            "dataset": dataset,
            "parent": parent,
            "sides": sides,
        },
    )


def dataset_summary(dataset: str | Path, split: str | None) -> dict[str, Any]:
    info = read_info(dataset)
    return {
        "path": str(dataset_root(dataset).resolve()),
        "name": info.get("name"),
        "fingerprint": info.get("fingerprint"),
        "split": split,
    }


def _embed_records(
    root: Path, bundle: Bundle, dataset: str | Path, split: str | None, embedding: EmbedOptions
) -> tuple[Path, dict[str, list[dict[str, Any]]], dict[str, list[Path]]]:
    records = load_records(dataset, split)
    if not records:
        where = f" (split {split})" if split else ""
        raise ValueError(f"empty gallery: no records in {manifest_path(dataset)}{where}")
    rows = embed.gallery_rows(dataset, records)
    work = embed.work_dir_for(root, bundle, dataset)
    embed.prepare(work, bundle, rows, embedding.shard_size)
    paths = embed.embed_work(
        work, bundle, embedding.engine, embedding.threads, embedding.batch_size, embedding.workers
    )
    return work, rows, paths


def index_dataset(
    root: str | Path,
    bundle: Bundle,
    dataset: str | Path,
    split: str | None = None,
    options: IndexOptions | None = None,
    embedding: EmbedOptions | None = None,
    keep: int = 3,
) -> str:
    """Embed a gallery (resumably) and publish a new version built from it."""
    root = Path(root)
    options = options or IndexOptions()
    if options.factory:  # fail before the embedding pass, not after it
        faiss_index.make_index(options.factory, bundle.embed_dim)
    work, rows, paths = _embed_records(root, bundle, dataset, split, embedding or EmbedOptions())
    version = publish(
        IndexStore(root, keep),
        bundle_id=bundle.bundle_id,
        dim=bundle.embed_dim,
        shards={side: embed.load_shards(paths[side]) for side in SIDES},
        rows=rows,
        options=options,
        dataset=dataset_summary(dataset, split),
        bundle_path=bundle.path,
    )
    shutil.rmtree(work, ignore_errors=True)  # the embeddings now live in the index
    return version


def add_dataset(
    root: str | Path,
    bundle: Bundle,
    dataset: str | Path,
    split: str | None = None,
    embedding: EmbedOptions | None = None,
    keep: int = 3,
) -> str:
    """Append a gallery's items to the current version (same bundle) as a new version."""
    root = Path(root)
    store = IndexStore(root, keep)
    current = store.open(bundle=bundle)
    work, rows, paths = _embed_records(root, bundle, dataset, split, embedding or EmbedOptions())
    vectors = {side: np.concatenate(embed.load_shards(paths[side])) for side in SIDES}
    version = add(store, current, vectors, rows, dataset_summary(dataset, split), bundle.path)
    shutil.rmtree(work, ignore_errors=True)
    return version
