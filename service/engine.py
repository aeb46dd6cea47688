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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index_builder import filters
from index_builder.backends.base import CorruptIndex, Hit, Version
from index_builder.collection import ChangeResult
from index_builder.search import Searcher
from index_builder.video_index import is_video_row
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
Hits = list[Hit]
Frames = tuple[np.ndarray, np.ndarray]  # a clip's (pixels (N, 3, S, S), mask (N,))


@dataclass(frozen=True)
class Job:
    """One query in a micro-batch: the input, the searcher (encoders + index) it started on,
    the side it searches, the page (`k` hits from rank `offset` + 1) and the metadata
    filter."""

    query: str | np.ndarray  # a text, or (3, S, S) float32 pixels of an image
    searcher: Searcher
    side: str
    k: int
    offset: int = 0
    filter: dict[str, Any] | None = None

    @property
    def group(self) -> Hashable:
        """Jobs that one index search can answer together."""
        return id(self.searcher), self.side, json.dumps(self.filter, sort_keys=True)


@dataclass(frozen=True)
class Found:
    """A search's answer: the searcher it ran on, the hits of each query (rows included) and
    the served images that caption hits describe (image id -> its server path when
    COTS_EXPOSE_PATHS is on, else None), looked up in one batch off the event loop; an image
    deleted on its own is absent."""

    searcher: Searcher
    hits: list[Hits]
    described: dict[str, str | None] = field(default_factory=dict)


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
        searcher: Searcher | None = None,
    ) -> Found:
        """Encode `queries` ("text": strings, "image": pixel arrays) with one tower and search
        `side` of `searcher` (default: the current one) for the page (`k` from `offset`);
        returns the searcher used and the hits (with their rows) per query. Image routes pass
        the searcher whose bundle preprocessed the pixels."""
        searcher = searcher or self.current()
        check_side_and_filter(searcher, side, filter)
        jobs = [Job(query, searcher, side, k, offset, filter) for query in queries]
        with backend_errors(partial(self.mark_damaged, searcher)):
            found = await self.batchers[modality].submit(jobs)
            return await self.answer(searcher, side, found)

    async def similar(
        self, side: str, item_id: str, k: int, offset: int = 0, filter: dict[str, Any] | None = None
    ) -> Found:
        """'More like this': search `side` with the stored vector of item `item_id` (the item
        itself is not a hit); no encoder runs."""
        searcher = self.current()
        check_side_and_filter(searcher, side, filter)
        unknown = NotFound(f"no {side} with id {item_id!r} in the index", "unknown_id")
        if not storable_id(item_id):
            raise unknown
        loop = asyncio.get_running_loop()
        search = partial(searcher.find_similar, side, item_id, k, offset=offset, filter=filter)
        with backend_errors(partial(self.mark_damaged, searcher)):  # Milvus: round trips
            try:
                with self.metrics.timed("search", "id"):
                    hits = await loop.run_in_executor(None, self._in_search_threads, search)
            except KeyError:
                raise unknown from None
            return await self.answer(searcher, side, [hits])

    async def search_video(
        self, searcher: Searcher, query: Frames, k: int, offset: int, filter: dict[str, Any] | None
    ) -> Found:
        """One clip's (pixels, mask): encoded with `searcher`'s encoders in the encoder pool,
        then searched on its text side (the filter checked first)."""
        check_side_and_filter(searcher, "text", filter)
        loop = asyncio.get_running_loop()

        def run() -> Hits:
            with self.metrics.timed("encode", "video"):
                vectors = searcher.encoders.encode("video", [query])
            with self.metrics.timed("search", "video"):
                return searcher.find("text", vectors, k, offset, filter)[0]

        with backend_errors(partial(self.mark_damaged, searcher)):
            hits = await loop.run_in_executor(self.executor, run)
            return await self.answer(searcher, "text", [hits])

    async def answer(self, searcher: Searcher, side: str, hits: list[Hits]) -> Found:
        """`hits` with the served images their captions describe (text side), looked up in
        one batch in the default pool: a backend call never runs on the event loop."""
        ids = {
            str(h.item["image_id"]) for q in hits for h in q if h.item.get("image_id") is not None
        }
        if side != "text" or not ids or not searcher.index.has("image"):
            return Found(searcher, hits)
        loop = asyncio.get_running_loop()
        paths = self.settings.expose_paths
        described = await loop.run_in_executor(None, described_images, searcher.index, ids, paths)
        return Found(searcher, hits, described)

    def _in_search_threads(self, search: Callable[[], Hits]) -> Hits:
        """`search()` (one query) with `lone_search_threads` OpenMP threads: the setting is
        per thread, and this runs in the event loop's default pool, not the engine's."""
        with self._threads(1):
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
            with self.metrics.timed("search", modality), self._threads(len(jobs)):
                for part in _group(members, lambda i: jobs[i].group):
                    found = _search_part(
                        [jobs[i] for i in part], vectors[[position[i] for i in part]]
                    )
                    for i, hits in zip(part, found, strict=True):
                        results[i] = hits
        return results

    @contextlib.contextmanager
    def _threads(self, queries: int) -> Iterator[None]:
        """This thread's FAISS threads while it searches `queries` queries: a lone query's
        inverted lists split across `lone_search_threads` (the host is not busy), a batch
        with `search_threads`, which the thread keeps after."""
        lone = queries == 1 and self.settings.lone_search_threads
        faiss.omp_set_num_threads(lone or self.settings.search_threads)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(self.settings.search_threads)

    def video_row(self, video_id: str) -> dict[str, Any]:
        """The row of a gallery video (NotFound for an id that is not one)."""
        searcher = self.current()
        unknown = NotFound(f"no gallery video with id {video_id!r}")
        if not storable_id(video_id):
            raise unknown
        with backend_errors(partial(self.mark_damaged, searcher)):
            index = searcher.index
            row = index.row_of("image", video_id) if index.has("image") else None
            item = index.rows_at("image", [row])[0] if row is not None else None
        if item is None or not is_video_row(item):
            raise unknown
        return item

    def image_file(self, image_id: str) -> Path:
        """The file behind a gallery image id; ids come only from the index, never paths
        from clients."""
        searcher = self.current()
        unknown = NotFound(f"no gallery image with id {image_id!r}")
        if not storable_id(image_id):
            raise unknown
        with backend_errors(partial(self.mark_damaged, searcher)):
            try:
                path = searcher.image_path(image_id)  # its row looked up once
            except KeyError:
                raise unknown from None
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


def described_images(index: Version, ids: set[str], paths: bool) -> dict[str, str | None]:
    """The live images of `ids` (id -> the server path of the file when `paths`, else None):
    one batched lookup of the ids, and of the rows only when paths are wanted."""
    rows = index.rows_of("image", ids)
    if not paths:
        return dict.fromkeys(rows)
    items = index.rows_at("image", list(rows.values()))
    return {image_id: str(Path(item["image"])) for image_id, item in zip(rows, items, strict=True)}


def _search_part(jobs: list[Job], vectors: np.ndarray) -> list[Hits]:
    """One index search for jobs of one group: as deep as the deepest page and from the
    shallowest start, so each job's page is a slice of it (only rows on some page are
    read)."""
    start = min(job.offset for job in jobs)
    depth = max(job.offset + job.k for job in jobs) - start
    job = jobs[0]  # its side is checked (`check_side_and_filter`): straight to the index
    found = job.searcher.index.find(job.side, vectors, depth, offset=start, filter=job.filter)
    return [
        hits[job.offset - start : job.offset - start + job.k]
        for job, hits in zip(jobs, found, strict=True)
    ]


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


def check_side_and_filter(searcher: Searcher, side: str, filter: dict[str, Any] | None) -> None:
    """Refuse a search of an absent side or with a filter that does not fit the side's
    metadata fields, before any encoder runs."""
    if not searcher.index.has(side):
        present = " and ".join(searcher.index.sides) or "no"
        raise NotFound(
            f"this index has no {side} side (it holds {present} items): "
            f"build one with `cots index build --{side}s ...`",
            "side_absent",
        )
    try:
        filters.parse(filter, searcher.index.info["sides"][side].get("fields", {}))
    except filters.FilterError as exc:
        raise InvalidInput(f"filter: {exc}", "invalid_filter") from None
