"""The search engine: the served `Searcher` (bundle, encoders, index), micro-batches, hot
swaps and changes to the collection."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
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
from index_builder.backends import open_store
from index_builder.backends.base import CorruptIndex, Store, check_bundle, is_version_name
from index_builder.bundle import Bundle
from index_builder.collection import Change, ChangeResult, change, delete_ids
from index_builder.encoders import Encoders
from index_builder.filters import check_storable, show
from index_builder.search import Searcher
from index_builder.sources import store_file, stored_name
from index_builder.stored_files import journal_uploads
from service.batching import MicroBatcher
from service.items import Items
from service.errors import (
    CORRUPT,
    Conflict,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    without_paths,
)
from service.metrics import Metrics
from service.settings import Settings

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


class Engine:
    """Owns everything a search needs; `gallery` (a `Searcher`: index + encoders + bundle)
    is swapped atomically by reference.

    A request takes `engine.gallery` once and keeps that object, so a swap never changes the
    index, the encoders or the bundle under a request in flight; the old ones are freed when
    their last request ends.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = open_store(settings.index, settings.backend_config())
        # Refuse to start on a mismatch: checked on index.json before anything heavy loads.
        self.bundle, self._first = resolve_bundle(settings, self.store)
        self.executor = ThreadPoolExecutor(
            settings.batch_workers,
            thread_name_prefix="cots-encode",
            initializer=faiss.omp_set_num_threads,
            initargs=(settings.search_threads,),
        )
        # Clips decode in their own small pool, with a bound on the work admitted (a decode
        # runs on to its own deadline even after the request gave up on it).
        self.decoder = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="cots-decode")
        self._decoding = threading.BoundedSemaphore(2 * settings.decode_workers)
        self.gallery: Searcher | None = None
        self.encoders: Encoders | None = None  # the served bundle's (ready before a gallery)
        self.load_error: str | None = None  # why the first load failed (for the log only)
        self._rejected: str | None = None
        # The last version refused and why (a client-safe reason, for /ready).
        self.refusal: tuple[str, str] | None = None
        self._damaged: Searcher | None = None  # the served searcher, once found damaged
        # While no version is served after a failed first load: the version that failed,
        # and when (event-loop time) and after how long a delay the watcher tries again.
        self._failed: str | None = None
        self._retry_at = 0.0
        self._retry_delay = settings.watch_interval_s
        self._swap_lock = asyncio.Lock()
        self._change_lock = asyncio.Lock()
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
        """Open both encoders and the index version checked at start in the thread pool (the
        app answers /health meanwhile, and /ready says 503); the watcher takes it from there."""
        loop = asyncio.get_running_loop()
        try:
            self.encoders = await loop.run_in_executor(
                self.executor, self._open_encoders, self.bundle
            )
            gallery = await loop.run_in_executor(
                self.executor, self._open_gallery, self._first, self.encoders
            )
        except Exception as exc:  # any failure: logged, retried, never a silent dead task
            self.load_error, self._failed = str(exc), self._first
            self.refusal = (self._first, _reason("failed", exc))
            delay = self._schedule_retry(loop.time())
            log.error(
                "loading index version %s failed (retry in %.3g s): %s: %s",
                self._first,
                delay,
                type(exc).__name__,
                exc,
            )
            return
        self._install(gallery)
        log.info("ready: bundle %s, index version %s", self.bundle.bundle_id, gallery.version)

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

    def _open_encoders(self, bundle: Bundle) -> Encoders:
        threads = self.settings.intra_threads or None
        return Encoders.open(bundle, threads=threads, batch_size=self.settings.batch_size)

    def _open_gallery(self, version: str | None, encoders: Encoders) -> Searcher:
        index = self.store.open(version, bundle=encoders.bundle)
        for side in index.sides:
            index.warm(side)  # id lookups and filter columns, off the event loop
        return Searcher(index, encoders)

    def _install(self, gallery: Searcher) -> None:
        self.gallery = gallery  # the one assignment requests see: the triple changes at once
        # Everything alive now (the version, encoders, libraries: ~90k objects) leaves the
        # collector's generations: a full collection over them took ~25 ms, a stall of every
        # request in flight (the p99 of text-to-image at concurrency 16 on a 1M gallery). A
        # version holds no reference cycles, so a swapped-out one is still freed.
        gc.freeze()
        self.encoders, self.bundle = gallery.encoders, gallery.bundle
        self.load_error = None
        for side, count in counts(gallery).items():
            self.metrics.gallery_size.labels(side).set(count)
        self.metrics.ready.set(1)

    def current(self) -> Searcher:
        """The searcher to serve with; NotReady (a code and a short reason, never the load
        error, which may name server paths) while none is loaded."""
        gallery = self.gallery
        if gallery is not None:
            return gallery
        if self.load_error is not None:
            version, reason = self.refusal or (self._failed, "details in the log")
            raise NotReady(
                f"the service could not load index version {version} ({reason}) and keeps "
                "retrying; move CURRENT or reload another version",
                code="load_failed",
            )
        raise NotReady("the service is loading its bundle and index")

    def ready(self) -> Searcher:
        """`current()`, and NotReady (index_corrupt) once a search has found its files
        damaged on disk: until another version (or the same one, reloaded) is served, a
        load balancer should send its traffic elsewhere."""
        gallery = self.current()
        if self._damaged is gallery:
            raise NotReady(CORRUPT, "index_corrupt")
        return gallery

    def _mark_damaged(self, gallery: Searcher) -> None:
        self._damaged = gallery

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
        with backend_errors(partial(self._mark_damaged, gallery)):
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
        with backend_errors(partial(self._mark_damaged, gallery)):  # Milvus: a round trip
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
        with backend_errors(partial(self._mark_damaged, gallery)):
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

    # -- hot swap --------------------------------------------------------------------------

    async def reload(self, version: str | None = None) -> tuple[str | None, str]:
        """Load `version` (default: what CURRENT names) in the background and swap to it.

        Returns (previous version, served version). A version built with another bundle is
        refused (Conflict) unless `follow_bundle` is on; then the bundle its index.json records
        is loaded and verified, its encoders opened, and bundle, encoders and index swap
        together. A version that cannot be read is refused; the old one keeps serving. An
        explicit `version` (a rollback, say) becomes CURRENT, through the store's atomic
        switch, before it serves, so the watcher agrees with it. The served version is read
        again only when a search found its files damaged (restored since, say)."""
        if self.encoders is None:
            raise NotReady("the service is still loading its encoders")
        if version is not None and not is_version_name(version):
            raise InvalidInput(f"version: {version[:40]!r} is not an index version name")
        async with self._swap_lock:
            loop = asyncio.get_running_loop()
            target = version or await loop.run_in_executor(None, self.store.current)
            previous = self.gallery.version if self.gallery else None
            if target is None:
                raise NotFound("no index version is current (CURRENT is missing)")
            if not is_version_name(target):
                raise NotFound(f"CURRENT names no index version ({target[:40]!r})")
            # The served version again only when a search found it damaged (files restored).
            again = self.gallery is not None and self._damaged is self.gallery
            gallery = await self._prepare(target) if target != previous or again else None
            if version is not None:
                await loop.run_in_executor(None, self._point_current, version)
            if gallery is not None:
                self._swap(gallery, previous)
            return previous, target

    async def _prepare(self, target: str) -> Searcher:
        """Read, check and open a version (and its bundle's encoders when it swaps too)."""
        loop = asyncio.get_running_loop()
        if target not in await loop.run_in_executor(None, self.store.versions):
            raise NotFound(f"index version {target} not found")
        bundle = self.bundle
        try:
            info = await loop.run_in_executor(None, self.store.read_info, target)
            if self.settings.follow_bundle and info.get("bundle_id") != bundle.bundle_id:
                bundle = await loop.run_in_executor(None, load_recorded_bundle, info, target)
            check_bundle(bundle, info, target)
        except Exception as exc:  # a malformed index.json is refused, whatever it raises
            raise self._refuse(target, "rejected", exc) from None
        try:
            encoders = self.encoders
            assert encoders is not None
            if bundle is not self.bundle:  # new towers load while the old ones serve
                encoders = await loop.run_in_executor(None, self._open_encoders, bundle)
            return await loop.run_in_executor(None, self._open_gallery, target, encoders)
        except Exception as exc:  # whatever a broken version raises, the old one serves on
            raise self._refuse(target, "failed", exc) from None

    def _point_current(self, version: str) -> None:
        if self.store.current() == version:
            return
        try:
            self.store.switch(version)
        except OSError as exc:
            log.error("cannot point CURRENT at %s: %s", version, exc)
            raise Conflict(
                f"cannot point CURRENT at {version} (is the index root read-only?); not "
                "swapping, since the watcher would follow CURRENT back",
                code="current_not_writable",
            ) from None
        log.info("CURRENT now names %s (an explicit reload)", version)

    def _swap(self, gallery: Searcher, previous: str | None) -> None:
        old_bundle = self.bundle.bundle_id
        self._install(gallery)
        self._rejected = self.refusal = None
        self.metrics.swaps.labels("swapped").inc()
        log.info("swapped index version %s -> %s", previous, gallery.version)
        if gallery.bundle.bundle_id != old_bundle:
            log.info("swapped bundle %s -> %s", old_bundle, gallery.bundle.bundle_id)

    # -- changes to the collection ----------------------------------------------------------

    async def add(self, items: Items, extensions: list[str]) -> tuple[str, ChangeResult]:
        """Add `items` (their images checked, with file `extensions`) to the served version
        as a new version, and serve it; returns the version served before and the change."""
        return await self._change(partial(self._add_items, items, extensions))

    async def delete(self, ids: list[str], side: str | None) -> tuple[str, ChangeResult]:
        """Delete `ids` from `side` (or every side holding them) as a new version, and serve
        it; an unknown id changes nothing (404)."""
        unknown = [item_id for item_id in ids if not storable_id(item_id)]
        if unknown:
            detail = f"{len(unknown)} ids are not in the index, e.g. {show(unknown[0])}"
            raise NotFound(detail, "unknown_ids")
        return await self._change(
            lambda gallery, stored: delete_ids(self.store, ids, side, current=gallery.index)
        )

    async def _change(
        self, make: Callable[[Searcher, list[Path]], ChangeResult]
    ) -> tuple[str, ChangeResult]:
        """One change at a time, built on the served version with its encoders in the thread
        pool; requests keep being served from the old version until the swap. A change that
        fails leaves no file it stored; a new version that cannot be served is refused and
        CURRENT goes back to the served one."""
        async with self._change_lock:
            gallery = self.current()
            loop = asyncio.get_running_loop()
            stored: list[Path] = []  # files this request created under files/
            try:
                result = await loop.run_in_executor(None, make, gallery, stored)
            except BaseException as exc:
                await loop.run_in_executor(None, _remove, stored)
                raise _change_error(exc) from None
            if result.version != gallery.version:
                await self._serve_change(result.version, gallery.version)
            return gallery.version, result

    async def _serve_change(self, version: str, served: str) -> None:
        """Swap to a change's new version, which CURRENT already names; if it cannot be
        served, point CURRENT back at `served` before the watcher sees it again."""
        loop = asyncio.get_running_loop()
        async with self._swap_lock:
            try:
                gallery = await self._prepare(version)
            except ServiceError:
                await loop.run_in_executor(None, self._point_current, served)
                raise
            self._swap(gallery, served)

    def _add_items(
        self, items: Items, extensions: list[str], gallery: Searcher, stored: list[Path]
    ) -> ChangeResult:
        names = [stored_name(u.data, e) for u, e in zip(items.images, extensions, strict=True)]
        with journal_uploads(self.store.root, names):  # a kill -9 leaves them collectable
            request = self._change_request(items, extensions, gallery, stored)
            return change(self.store, gallery.index, request, bundle_path=gallery.bundle.path)

    def _change_request(
        self, items: Items, extensions: list[str], gallery: Searcher, stored: list[Path]
    ) -> Change:
        rows: dict[str, list[dict[str, Any]]] = {"image": [], "text": []}
        vectors = {}
        if items.images:
            # Kept under the index root by content (as WebDataset images are), so the files
            # outlive the versions that point at them; those this request creates are noted
            # in `stored`, to be removed if the change fails.
            paths = []
            for upload, extension in zip(items.images, extensions, strict=True):
                path, created = store_file(self.store.root / "files", upload.data, extension)
                paths.append(path)
                if created:
                    stored.append(path)
            vectors["image"] = gallery.encoders.image.encode_paths(paths)
            rows["image"] = [
                {"id": upload.id, "image": str(path), "captions": [], "meta": upload.meta}
                for upload, path in zip(items.images, paths, strict=True)
            ]
        if items.texts:
            vectors["text"] = gallery.encoders.text.encode([item.text for item in items.texts])
            rows["text"] = [
                {"id": item.id, "text": item.text, "meta": item.meta} for item in items.texts
            ]
        return Change(rows=rows, vectors=vectors, upsert=items.upsert)

    def _refuse(self, version: str, result: str, exc: Exception) -> Conflict:
        """Count and log a refused version; the client's reason names no server path, and an
        unreadable version's (FAISS's own text included) stays in the log."""
        self.metrics.swaps.labels(result).inc()
        self._rejected = version
        log.error(
            "not swapping to index version %s (%s): %s: %s",
            version,
            result,
            type(exc).__name__,
            exc,
        )
        reason = _reason(result, exc)
        self.refusal = (version, reason)
        return Conflict(f"not swapping to index version {version}: {reason}", code=f"swap_{result}")

    async def watch(self) -> None:
        """Poll CURRENT; swap when it names a new version (a refused one is not retried
        until CURRENT moves again). While a failed first load leaves nothing to serve, retry:
        at once when CURRENT moves, else after a delay that doubles from the poll interval up
        to `load_retry_max_s`."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher never dies: it logs and keeps watching
                log.exception("index watcher: unexpected error (still watching)")

    async def _watch_once(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            target = await loop.run_in_executor(None, self.store.current)
        except OSError as exc:
            log.warning("cannot read CURRENT: %s", exc)
            return
        if self.gallery is None:
            failed = self.load_error is not None
            if failed and (target != self._failed or loop.time() >= self._retry_at):
                await self._recover(target)
            return
        if target in (None, self.gallery.version, self._rejected):
            return
        try:
            await self.reload()  # what CURRENT names once the swap lock is held
        except ServiceError as exc:
            log.warning("index watcher: %s", exc.detail)

    def _schedule_retry(self, now: float) -> float:
        """The delay before the next retry of a failed first load; each one doubles it."""
        delay = self._retry_delay
        self._retry_delay = min(2 * delay, self.settings.load_retry_max_s)
        self._retry_at = now + delay
        return delay

    async def _recover(self, target: str | None) -> None:
        """Retry the failed first load with the version CURRENT names now."""
        loop = asyncio.get_running_loop()
        self._failed = target
        try:
            if self.encoders is None:
                self.encoders = await loop.run_in_executor(
                    self.executor, self._open_encoders, self.bundle
                )
            await self.reload()
        except Exception as exc:
            delay = self._schedule_retry(loop.time())
            reason = exc.detail if isinstance(exc, ServiceError) else exc
            log.warning("still no index to serve (next retry in %.3g s): %s", delay, reason)
            return
        assert self.gallery is not None
        log.info("recovered: serving index version %s", self.gallery.version)


def storable_id(item_id: str) -> bool:
    """An id a version can hold: valid UTF-8 (no lone surrogate) without NUL. Another is no
    item, a 404, and never reaches a backend (Milvus answered it with a 503)."""
    try:
        check_storable(item_id, "id")
    except ValueError:
        return False
    return "\x00" not in item_id


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _change_error(exc: BaseException) -> BaseException:
    """The client's answer to a change that failed: a full disk is 507, another storage
    error 503, bad content 422; the served version is untouched in every case."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, KeyError):
        return NotFound(str(exc.args[0]), "unknown_ids")
    if isinstance(exc, RuntimeError):  # another writer holds the index root's lock
        return Conflict(str(exc), "busy")
    if isinstance(exc, ValueError):
        return InvalidInput(without_paths(str(exc)), "invalid_change")
    if isinstance(exc, OSError):
        log.error("a change failed writing the index root: %s", exc)
        if exc.errno in _FULL:
            return InsufficientStorage(
                "the index root is full: the change was not made (the served version is intact)"
            )
        return NotReady(
            "the index root cannot be written: the change was not made (details in the log)",
            "storage_error",
        )
    return exc


def _reason(result: str, exc: BaseException) -> str:
    """Why a version was refused, fit for a client (no server path, no FAISS text)."""
    if result == "rejected":
        return without_paths(str(exc))
    if isinstance(exc, CorruptIndex):
        return "its files are truncated or damaged (details in the log)"
    return "its files cannot be read (details in the log)"


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
        detail = f"the index backend failed: {without_paths(str(exc))}"
        raise NotReady(detail, "backend_unavailable") from None


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


def counts(gallery: Searcher) -> dict[str, int]:
    """Live items per side (0 for an absent side)."""
    index = gallery.index
    return {side: index.live_count(side) if index.has(side) else 0 for side in ("image", "text")}


def resolve_bundle(settings: Settings, store: Store) -> tuple[Bundle, str]:
    """The bundle to start with and the CURRENT version it was checked against:
    `settings.bundle`, or with `follow_bundle` the bundle CURRENT's index.json records when
    they differ (a pod restarted after a bundle swap); a mismatch is refused."""
    bundle = Bundle.load(settings.bundle)
    info = store.read_info()  # CURRENT's; no index is a FileNotFoundError
    version = str(info["version"])
    if settings.follow_bundle and info.get("bundle_id") != bundle.bundle_id:
        log.warning(
            "index version %s was built with bundle %s, not %s (%s): following it",
            version,
            info.get("bundle_id"),
            bundle.bundle_id,
            settings.bundle,
        )
        bundle = load_recorded_bundle(info, version)
    check_bundle(bundle, info, version)
    return bundle, version


def load_recorded_bundle(info: dict[str, Any], version: str) -> Bundle:
    """The bundle an index version records (`bundle_path`), checked against its files'
    hashes and the version's `bundle_id`."""
    path = info.get("bundle_path")
    if not path:
        raise ValueError(
            f"index version {version} was built with bundle {info.get('bundle_id')} but records "
            "no bundle_path to load it from; rebuild it with this version of `cots index`"
        )
    bundle = Bundle.load(path)
    if bundle.bundle_id != info.get("bundle_id"):
        raise ValueError(
            f"index version {version} was built with bundle {info.get('bundle_id')}, but the "
            f"bundle at its bundle_path {path} is {bundle.bundle_id} (replaced since the build)"
        )
    return bundle
