"""Changes to the collection: items added or deleted as a new index version, built on the
served one in a worker thread, one at a time, then served (or refused, CURRENT put back);
on Milvus, made in place in the served version, which sees them when the call returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from index_builder.backends.base import BackendFailed
from index_builder.collection import Change, ChangeResult, change, delete_ids
from index_builder.filters import check_storable, show
from index_builder.search import Searcher
from index_builder.sources import store_file, stored_name
from index_builder.stored_files import journal_uploads
from service.errors import (
    Conflict,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    backend_failure,
    without_paths,
)
from service.items import Items
from service.versions import Versions

log = logging.getLogger(__name__)


class Changes:
    """Adds and deletes items, one change at a time, on the versions `versions` serves."""

    def __init__(self, versions: Versions) -> None:
        self.versions = versions
        self.store = versions.store
        self._lock = asyncio.Lock()

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
            lambda searcher, stored: delete_ids(self.store, ids, side, current=searcher.index)
        )

    async def _change(
        self, make: Callable[[Searcher, list[Path]], ChangeResult]
    ) -> tuple[str, ChangeResult]:
        """One change at a time, built on the served version with its encoders in the thread
        pool; requests keep being served from the old version until the swap. A change that
        fails leaves no file it stored; a new version that cannot be served is refused and
        CURRENT goes back to the served one."""
        async with self._lock:
            searcher = self.versions.current()
            loop = asyncio.get_running_loop()
            stored: list[Path] = []  # files this request created under files/
            try:
                result = await loop.run_in_executor(None, make, searcher, stored)
            except BaseException as exc:
                await loop.run_in_executor(None, _remove, stored)
                raise _change_error(exc) from None
            if result.version != searcher.version:
                await self.versions.serve_change(result.version, searcher.version)
            else:  # changed in place (Milvus): the served index already sees it
                self.versions.count_gallery(searcher)
            return searcher.version, result

    def _add_items(
        self, items: Items, extensions: list[str], searcher: Searcher, stored: list[Path]
    ) -> ChangeResult:
        names = [stored_name(u.data, e) for u, e in zip(items.images, extensions, strict=True)]
        with journal_uploads(self.store.root, names):  # a kill -9 leaves them collectable
            request = self._change_request(items, extensions, searcher, stored)
            return change(self.store, searcher.index, request, bundle_path=searcher.bundle.path)

    def _change_request(
        self, items: Items, extensions: list[str], searcher: Searcher, stored: list[Path]
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
            vectors["image"] = searcher.encoders.image.encode_paths(paths)
            rows["image"] = [
                {"id": upload.id, "image": str(path), "captions": [], "meta": upload.meta}
                for upload, path in zip(items.images, paths, strict=True)
            ]
        if items.texts:
            vectors["text"] = searcher.encoders.text.encode([item.text for item in items.texts])
            rows["text"] = [
                {"id": item.id, "text": item.text, "meta": item.meta} for item in items.texts
            ]
        return Change(rows=rows, vectors=vectors, upsert=items.upsert)


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
    if isinstance(exc, BackendFailed):  # Milvus down or failing: nothing was changed
        log.error("a change failed in the index backend: %s", exc)
        return NotReady(backend_failure(exc), "backend_unavailable")
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
