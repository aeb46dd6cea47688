"""The search engine: the served version (`service.versions`), micro-batched encoding and
search in the encoder pool, clip and large-image decodes in the decode pool, and changes to the
collection (`service.changes`)."""

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index_builder import filters
from index_builder.backends.base import CorruptIndex
from index_builder.collection import ChangeResult
from index_builder.search import Searcher
from service.batching import MicroBatcher
from service.changes import Changes, storable_id
from service.errors import (
    CORRUPT,
    InvalidInput,
    NotFound,
    NotReady,
    backend_failure,
)
from service.items import Items
from service.metrics import Metrics
from service.settings import Settings
from service.versions import Versions

log = logging.getLogger(__name__)
Hits = list[dict[str, Any]]


@dataclass(frozen=True)
class Job:
    """One query in a micro-batch: the input, the searcher (encoders + index) it started on,
    the side it searches, how deep and with which metadata filter."""

    query: Any  # str for text, (3, S, S) float32 pixels for an image
    searcher: Searcher
    side: str
    depth: int
    filter: dict[str, Any] | None = None

    @property
    def group(self) -> Hashable:
        """Jobs that one index search can answer together."""
        return id(self.searcher), self.side, json.dumps(self.filter, sort_keys=True)


class Engine(Versions):
    """Everything a search needs: the served version (`Versions`: load, swap, watch), the
    encoder and decode pools with the micro-batchers that search it, and the changes to the
    collection (`Changes`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.executor = ThreadPoolExecutor(
            settings.batch_workers,
            thread_name_prefix="cots-encode",
            initializer=faiss.omp_set_num_threads,
            initargs=(settings.search_threads,),
        )
        super().__init__(settings, metrics, self.executor)
        # Clips decode in their own small pool, with a bound on the work admitted (a decode
        # runs on to its own deadline even after the request gave up on it).
        self.decoder = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="cots-decode")
        self._decoding = threading.BoundedSemaphore(2 * settings.decode_workers)
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
        self.changes = Changes(self)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def decode(self, work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `work` (a clip's or a large image's decode) in the decode pool; a 503 (code
        busy) when the pool already holds as much work as it admits."""
        if not self._decoding.acquire(blocking=False):
            detail = "too many clips or large images are being decoded; retry shortly"
            raise NotReady(detail, "busy")
        try:
            future = self.decoder.submit(work)
        except BaseException:
            self._decoding.release()
            raise
        future.add_done_callback(lambda _: self._decoding.release())
        return asyncio.wrap_future(future)

    # -- search ----------------------------------------------------------------------------

    async def search(
        self,
        modality: str,
        side: str,
        queries: list[Any],
        k: int,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
        gallery: Searcher | None = None,
    ) -> tuple[Searcher, list[Hits]]:
        """Encode `queries` ("text": strings, "image": pixel arrays) with one tower and search
        `side` of `gallery` (default: the current one) for the page (`k` from `offset`);
        returns the searcher used and the hits per query. Image routes pass the searcher
        whose bundle preprocessed the pixels."""
        gallery = gallery or self.current()
        check_query(gallery, side, filter)
        jobs = [Job(query, gallery, side, k + offset, filter) for query in queries]
        with backend_errors(partial(self.mark_damaged, gallery)):
            found = await self.batchers[modality].submit(jobs)
        return gallery, [hits[offset:] for hits in found]

    async def similar(
        self, side: str, item_id: str, k: int, offset: int = 0, filter: dict[str, Any] | None = None
    ) -> tuple[Searcher, Hits]:
        """'More like this': search `side` with the stored vector of item `item_id` (the item
        itself is not a hit); no encoder runs."""
        gallery = self.current()
        check_query(gallery, side, filter)
        loop = asyncio.get_running_loop()
        with backend_errors(partial(self.mark_damaged, gallery)):  # Milvus: a round trip
            if not storable_id(item_id) or (
                await loop.run_in_executor(None, gallery.index.row_of, side, item_id) is None
            ):
                raise NotFound(f"no {side} with id {item_id!r} in the index", "unknown_id")
            search = partial(gallery.similar, side, item_id, k, offset=offset, filter=filter)
            with self.metrics.timed("search", "id"):
                hits = await loop.run_in_executor(None, self._in_search_threads, search)
        return gallery, hits

    def _in_search_threads(self, search: Callable[[], Hits]) -> Hits:
        """`search()` with `search_threads` OpenMP threads: the setting is per thread, and
        this runs in the event loop's default pool, not the engine's."""
        faiss.omp_set_num_threads(self.settings.search_threads)
        return search()

    def _run_batch(self, modality: str, jobs: list[Job]) -> list[Hits]:
        """One encoder call per bundle in the micro-batch (one, except around a bundle swap),
        then one search per (index version, side, filter); a query never meets another
        bundle's encoder."""
        self.metrics.batch_size.labels(modality).observe(len(jobs))
        results: list[Hits] = [[] for _ in jobs]
        for members in _group(range(len(jobs)), lambda i: id(jobs[i].searcher.encoders)):
            encoders = jobs[members[0]].searcher.encoders
            with self.metrics.timed("encode", modality):
                vectors = encoders.encode(modality, [jobs[i].query for i in members])
            vectors = np.nan_to_num(vectors, copy=False)  # a degenerate input must not reach FAISS
            position = {i: p for p, i in enumerate(members)}
            with self.metrics.timed("search", modality):
                for part in _group(members, lambda i: jobs[i].group):
                    job = jobs[part[0]]
                    depth = max(jobs[i].depth for i in part)
                    found = job.searcher.search(
                        job.side, vectors[[position[i] for i in part]], depth, filter=job.filter
                    )
                    for i, hits in zip(part, found, strict=True):
                        results[i] = hits[: jobs[i].depth]
        return results

    def image_file(self, image_id: str) -> Path:
        """The file behind a gallery image id; ids come only from the index, never paths
        from clients."""
        gallery = self.current()
        with backend_errors(partial(self.mark_damaged, gallery)):
            index = gallery.index
            if (
                not storable_id(image_id)
                or not index.has("image")
                or index.row_of("image", image_id) is None
            ):
                raise NotFound(f"no gallery image with id {image_id!r}")
            path = Path(gallery.image_path(image_id))
        if not path.is_file():
            raise NotFound(f"the file of gallery image {image_id!r} is missing on the server")
        return path

    # -- changes to the collection ----------------------------------------------------------

    async def add(self, items: Items, extensions: list[str]) -> tuple[str, ChangeResult]:
        """Add `items` (their images checked, with file `extensions`) to the served version
        as a new version, and serve it; returns the version served before and the change."""
        return await self.changes.add(items, extensions)

    async def delete(self, ids: list[str], side: str | None) -> tuple[str, ChangeResult]:
        """Delete `ids` from `side` (or every side holding them) as a new version, and serve
        it; an unknown id changes nothing (404)."""
        return await self.changes.delete(ids, side)


def _group(indices: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    """`indices` grouped by `key(i)`, in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


@contextlib.contextmanager
def backend_errors(damaged: Callable[[], None] | None = None) -> Iterator[None]:
    """An index backend that fails (Milvus unreachable, a collection gone) answers 503; a
    damaged version's files also call `damaged` (/ready then answers 503 too)."""
    try:
        yield
    except CorruptIndex as exc:
        log.error("the served index version is damaged: %s", exc)
        if damaged is not None:
            damaged()
        raise NotReady(CORRUPT, "index_corrupt") from None
    except OSError as exc:
        log.error("the index backend failed: %s", exc)
        raise NotReady(backend_failure(exc), "backend_unavailable") from None


def check_query(gallery: Searcher, side: str, filter: dict[str, Any] | None) -> None:
    """Refuse a search of an absent side or with a filter that does not fit the side's
    metadata fields, before any encoder runs."""
    if not gallery.index.has(side):
        present = " and ".join(gallery.index.sides) or "no"
        raise NotFound(
            f"this index has no {side} side (it holds {present} items): "
            f"build one with `cots index build --{side}s ...`",
            "side_absent",
        )
    try:
        filters.parse(filter, gallery.index.info["sides"][side].get("fields", {}))
    except filters.FilterError as exc:
        raise InvalidInput(f"filter: {exc}", "invalid_filter") from None
