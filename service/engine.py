"""The search engine: bundle encoders, the served index version, micro-batches and hot swaps."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.bundle import Bundle
from index_builder.store import IndexStore, LoadedIndex
from service.batching import MicroBatcher
from service.errors import Conflict, NotFound, NotReady
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


@dataclass(frozen=True)
class Job:
    """One query in a micro-batch: the input, the index version it searches and how deep."""

    query: Any  # str for text, (3, S, S) float32 pixels for an image
    index: LoadedIndex
    depth: int


class Gallery:
    """One loaded index version plus the lookups the image route needs."""

    def __init__(self, index: LoadedIndex) -> None:
        self.index = index

    @property
    def version(self) -> str:
        return self.index.version

    @cached_property
    def image_rows(self) -> dict[str, int]:
        return {str(row["id"]): i for i, row in enumerate(self.index.images)}

    def image_path(self, image_id: str) -> Path:
        """The file behind a gallery id; ids come only from the index, never paths from clients."""
        row = self.image_rows.get(image_id)
        if row is None:
            raise NotFound(f"no gallery image with id {image_id!r}")
        path = Path(self.index.images[row]["image"])
        if not path.is_file():
            raise NotFound(f"the file of gallery image {image_id!r} is missing on the server")
        return path


class Engine:
    """Owns everything a search needs; `gallery` is swapped atomically by reference.

    A request takes `engine.gallery` once and keeps that object, so a swap never changes the
    index under a request in flight; the old version is freed when its last request ends.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = IndexStore(settings.index)
        self.bundle = Bundle.load(settings.bundle)
        # Refuse to start on a mismatch: checked on index.json before anything heavy loads.
        check_compatible(self.bundle, self.store.read_info(), self.store.current() or "?")
        self.executor = ThreadPoolExecutor(settings.batch_workers, thread_name_prefix="cots-encode")
        self.gallery: Gallery | None = None
        self.load_error: str | None = None
        self._encoders: dict[str, Any] = {}
        self._rejected: str | None = None
        self._swap_lock = asyncio.Lock()
        wait = settings.batch_wait_ms / 1000
        self.batchers = {
            modality: MicroBatcher(
                partial(self._run_batch, modality),
                self.executor,
                max_batch=settings.batch_size,
                max_wait_s=wait,
                workers=settings.batch_workers,
            )
            for modality in ("text", "image")
        }

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def load(self) -> None:
        """Open both encoders and the CURRENT index in the thread pool (the app answers
        /health meanwhile, and /ready says 503)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._open_encoders)
            gallery = await loop.run_in_executor(self.executor, self._open_gallery, None)
        except (OSError, ValueError, KeyError) as exc:
            self.load_error = str(exc)
            log.error("loading failed: %s", exc)
            return
        self._install(gallery)
        log.info("ready: bundle %s, index version %s", self.bundle.bundle_id, gallery.version)

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _open_encoders(self) -> None:
        from index_builder.encoders import ImageEncoder, TextEncoder

        threads = self.settings.intra_threads or None
        batch = self.settings.batch_size
        self._encoders = {
            "text": TextEncoder(self.bundle, threads=threads, batch_size=batch),
            "image": ImageEncoder(self.bundle, threads=threads, batch_size=batch),
        }

    def _open_gallery(self, version: str | None) -> Gallery:
        gallery = Gallery(self.store.open(version, bundle=self.bundle))
        _ = gallery.image_rows  # build the id map off the event loop
        return gallery

    def _install(self, gallery: Gallery) -> None:
        self.gallery = gallery
        for side in ("image", "text"):
            self.metrics.gallery_size.labels(side).set(len(gallery.index.rows(side)))
        self.metrics.ready.set(1)

    def current(self) -> Gallery:
        gallery = self.gallery
        if gallery is None:
            reason = f": {self.load_error}" if self.load_error else " (loading)"
            raise NotReady(f"the service is not ready{reason}")
        return gallery

    # -- search ----------------------------------------------------------------------------

    async def search(self, modality: str, queries: list[Any], depth: int) -> tuple[Gallery, list]:
        """Encode `queries` ("text": strings, "image": pixel arrays) with one tower and search
        the other side of the current gallery; returns the gallery used and hits per query."""
        gallery = self.current()
        jobs = [Job(query, gallery.index, depth) for query in queries]
        return gallery, await self.batchers[modality].submit(jobs)

    def _run_batch(self, modality: str, jobs: list[Job]) -> list[list[Hit]]:
        """One encoder call for the whole micro-batch, then one search per index version."""
        self.metrics.batch_size.labels(modality).observe(len(jobs))
        with self.metrics.timed("encode", modality):
            if modality == "text":
                vectors = self._encoders["text"].encode([job.query for job in jobs])
            else:
                vectors = self._encoders["image"].encode_pixels(np.stack([j.query for j in jobs]))
        vectors = np.nan_to_num(vectors, copy=False)  # a degenerate input must not reach FAISS
        side = "image" if modality == "text" else "text"
        results: list[list[Hit]] = [[] for _ in jobs]
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.index), []).append(i)
        with self.metrics.timed("search", modality):
            for members in groups.values():
                index = jobs[members[0]].index
                depth = max(jobs[i].depth for i in members)
                scores, rows = index.search(side, vectors[members], depth)
                for j, i in enumerate(members):
                    results[i] = [
                        Hit(int(r), min(1.0, max(-1.0, float(s))))
                        for s, r in zip(
                            scores[j, : jobs[i].depth], rows[j, : jobs[i].depth], strict=True
                        )
                        if r >= 0
                    ]
        return results

    # -- hot swap --------------------------------------------------------------------------

    async def reload(self, version: str | None = None) -> tuple[str | None, str]:
        """Load `version` (default: what CURRENT names) in the background and swap to it.

        Returns (previous version, served version). A version built with another bundle, or
        one that cannot be read, is refused (Conflict) and the old one keeps serving."""
        if not self._encoders:
            raise NotReady("the service is still loading its encoders")
        async with self._swap_lock:
            loop = asyncio.get_running_loop()
            target = version or await loop.run_in_executor(None, self.store.current)
            previous = self.gallery.version if self.gallery else None
            if target is None:
                raise NotFound(f"no index under {self.store.root}")
            if target == previous:
                return previous, target
            if not (self.store.version_dir(target) / "index.json").is_file():
                raise NotFound(f"index version {target} not found under {self.store.root}")
            try:
                info = await loop.run_in_executor(None, self.store.read_info, target)
                check_compatible(self.bundle, info, target)
            except ValueError as exc:
                raise self._refuse(target, "rejected", exc) from None
            try:
                gallery = await loop.run_in_executor(None, self._open_gallery, target)
            except (OSError, ValueError, KeyError) as exc:
                raise self._refuse(target, "failed", exc) from None
            self._install(gallery)
            self._rejected = None
            self.metrics.swaps.labels("swapped").inc()
            log.info("swapped index version %s -> %s", previous, target)
            return previous, target

    def _refuse(self, version: str, result: str, exc: Exception) -> Conflict:
        self.metrics.swaps.labels(result).inc()
        self._rejected = version
        log.error("not swapping to index version %s (%s): %s", version, result, exc)
        return Conflict(f"not swapping to index version {version}: {exc}", code=f"swap_{result}")

    async def watch(self) -> None:
        """Poll CURRENT; swap when it names a new version (a refused one is not retried
        until CURRENT moves again)."""
        interval = self.settings.watch_interval_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self.gallery is None:
                continue
            try:
                target = await loop.run_in_executor(None, self.store.current)
            except OSError as exc:
                log.warning("cannot read CURRENT under %s: %s", self.store.root, exc)
                continue
            if target in (None, self.gallery.version, self._rejected):
                continue
            try:
                await self.reload(target)
            except (Conflict, NotFound) as exc:
                log.warning("index watcher: %s", exc.detail)


def check_compatible(bundle: Bundle, info: dict[str, Any], version: str) -> None:
    """The same check `LoadedIndex.check_bundle` makes, on index.json alone (cheap, at start)."""
    if int(info.get("embed_dim", -1)) != bundle.embed_dim or info.get("bundle_id") != (
        bundle.bundle_id
    ):
        raise ValueError(
            f"index version {version} was built with bundle {info.get('bundle_id')} "
            f"(dimension {info.get('embed_dim')}), but the service loads bundle "
            f"{bundle.bundle_id} (dimension {bundle.embed_dim}); serve the bundle the index "
            "was built with, or rebuild the index with this bundle"
        )
