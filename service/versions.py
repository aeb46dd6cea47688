"""The served version: a `Searcher` (bundle, encoders, index) loaded at start, swapped
atomically by reference on a reload, a change or CURRENT moving (the watcher), and refused
when it cannot be served (another bundle, damaged or unreadable files)."""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import Executor
from typing import Any

from index_builder.backends import open_store
from index_builder.backends.base import CorruptIndex, Store, check_bundle, is_version_name
from index_builder.bundle import Bundle
from index_builder.encoders import Encoders
from index_builder.search import Searcher
from service.errors import (
    CORRUPT,
    Conflict,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    without_paths,
)
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class Versions:
    """Owns the served `searcher` (a `Searcher`: index + encoders + bundle), swapped
    atomically by reference.

    A request takes `searcher` once and keeps that object, so a swap never changes the
    index, the encoders or the bundle under a request in flight; the old ones are freed when
    their last request ends. Encoders and versions open in `executor`.
    """

    def __init__(self, settings: Settings, metrics: Metrics, executor: Executor) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.store = open_store(settings.index, settings.backend_config())
        # Refuse to start on a mismatch: checked on index.json before anything heavy loads.
        self.bundle, self._first = resolve_bundle(settings, self.store)
        self.searcher: Searcher | None = None
        self.encoders: Encoders | None = None  # the served bundle's (ready before a searcher)
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

    async def load(self) -> None:
        """Open both encoders and the index version checked at start in the thread pool (the
        app answers /health meanwhile, and /ready says 503); the watcher takes it from there."""
        loop = asyncio.get_running_loop()
        try:
            self.encoders = await loop.run_in_executor(
                self.executor, self._open_encoders, self.bundle
            )
            searcher = await loop.run_in_executor(
                self.executor, self._open_searcher, self._first, self.encoders
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
        self._install(searcher)
        log.info("ready: bundle %s, index version %s", self.bundle.bundle_id, searcher.version)

    def _open_encoders(self, bundle: Bundle) -> Encoders:
        threads = self.settings.intra_threads or None
        return Encoders.open(bundle, threads=threads, batch_size=self.settings.batch_size)

    def _open_searcher(self, version: str | None, encoders: Encoders) -> Searcher:
        index = self.store.open(version, bundle=encoders.bundle)
        for side in index.sides:
            index.warm(side)  # id lookups and filter columns, off the event loop
        return Searcher(index, encoders)

    def _install(self, searcher: Searcher) -> None:
        self.searcher = searcher  # the one assignment requests see: the triple changes at once
        # Everything alive now (the version, encoders, libraries: ~90k objects) leaves the
        # collector's generations: a full collection over them took ~25 ms, a stall of every
        # request in flight (the p99 of text-to-image at concurrency 16 on a 1M gallery). A
        # version holds no reference cycles, so a swapped-out one is still freed.
        gc.freeze()
        self.encoders, self.bundle = searcher.encoders, searcher.bundle
        self.load_error = None
        self.count_gallery(searcher)
        self.metrics.ready.set(1)

    def count_gallery(self, searcher: Searcher) -> None:
        """The gallery size metrics: at a swap, and after a change made in place (Milvus)."""
        for side, count in counts(searcher).items():
            self.metrics.gallery_size.labels(side).set(count)

    def current(self) -> Searcher:
        """The searcher to serve with; NotReady (a code and a short reason, never the load
        error, which may name server paths) while none is loaded."""
        searcher = self.searcher
        if searcher is not None:
            return searcher
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
        searcher = self.current()
        if self._damaged is searcher:
            raise NotReady(CORRUPT, "index_corrupt")
        return searcher

    def mark_damaged(self, searcher: Searcher) -> None:
        self._damaged = searcher

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
            previous = self.searcher.version if self.searcher else None
            if target is None:
                raise NotFound("no index version is current (CURRENT is missing)")
            if not is_version_name(target):
                raise NotFound(f"CURRENT names no index version ({target[:40]!r})")
            # The served version again only when a search found it damaged (files restored).
            again = self.searcher is not None and self._damaged is self.searcher
            searcher = await self._prepare(target) if target != previous or again else None
            if version is not None:
                await loop.run_in_executor(None, self._point_current, version)
            if searcher is not None:
                self._swap(searcher, previous)
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
            return await loop.run_in_executor(None, self._open_searcher, target, encoders)
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

    def _swap(self, searcher: Searcher, previous: str | None) -> None:
        old_bundle = self.bundle.bundle_id
        self._install(searcher)
        self._rejected = self.refusal = None
        self.metrics.swaps.labels("swapped").inc()
        log.info("swapped index version %s -> %s", previous, searcher.version)
        if searcher.bundle.bundle_id != old_bundle:
            log.info("swapped bundle %s -> %s", old_bundle, searcher.bundle.bundle_id)

    async def serve_change(self, version: str, served: str) -> None:
        """Swap to a change's new version, which CURRENT already names; if it cannot be
        served, point CURRENT back at `served` before the watcher sees it again."""
        loop = asyncio.get_running_loop()
        async with self._swap_lock:
            try:
                searcher = await self._prepare(version)
            except ServiceError:
                await loop.run_in_executor(None, self._point_current, served)
                raise
            self._swap(searcher, served)

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
        if self.searcher is None:
            failed = self.load_error is not None
            if failed and (target != self._failed or loop.time() >= self._retry_at):
                await self._recover(target)
            return
        if target in (None, self.searcher.version, self._rejected):
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
        assert self.searcher is not None
        log.info("recovered: serving index version %s", self.searcher.version)


def _reason(result: str, exc: BaseException) -> str:
    """Why a version was refused, fit for a client (no server path, no FAISS text)."""
    if result == "rejected":
        return without_paths(str(exc))
    if isinstance(exc, CorruptIndex):
        return "its files are truncated or damaged (details in the log)"
    return "its files cannot be read (details in the log)"


def counts(searcher: Searcher) -> dict[str, int]:
    """Live items per side (0 for an absent side)."""
    index = searcher.index
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
