"""Micro-batching: queries from concurrent requests are gathered into one call in a thread pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Runs `fn(items) -> results` (same length, same order) in `executor` on batches of at
    most `max_batch` queued items.

    An idle batcher dispatches at once: a lone query never waits. While another batch runs,
    a worker that took a query waits up to `max_wait_s` (or until no batch runs any more) for
    others to join it. `workers` batches may run at once; while they run, new items queue up
    and form the next batch, so under load batches grow by themselves and the event loop
    never blocks.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        max_batch: int,
        max_wait_s: float,
        workers: int = 1,
    ) -> None:
        if max_batch < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError("need max_batch >= 1, workers >= 1 and max_wait_s >= 0")
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0  # batches in the executor now
        self._idle: asyncio.Future[None] | None = None  # resolved when _running drops to 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the service is shutting down"))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue `items` and wait for their results (an error in the batch is raised here)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        for entry in pending:
            self._queue.put_nowait(entry)
        return list(await asyncio.gather(*(entry.future for entry in pending)))

    async def _collect(self) -> list[_Pending[T, R]]:
        """The next batch: the first queued item and what is queued behind it, plus, while
        another batch runs, what arrives before it ends or `max_wait_s` passes."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        self._take_queued(batch)
        try:
            await self._gather_more(batch)
        except asyncio.CancelledError:  # stop() while waiting: the held queries fail too
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(RuntimeError("the service is shutting down"))
            raise
        return batch

    async def _gather_more(self, batch: list[_Pending[T, R]]) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch and self._running:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if self._idle is None or self._idle.done():
                self._idle = loop.create_future()
            getter = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait(
                    (getter, self._idle), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                getter.cancel()  # no-op once it holds an item; else the queue keeps its items
            if getter.done() and not getter.cancelled():
                batch.append(getter.result())
                self._take_queued(batch)

    def _take_queued(self, batch: list[_Pending[T, R]]) -> None:
        assert self._queue is not None
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._collect() if not entry.future.done()]
            if not batch:
                continue
            self._running += 1
            try:
                results = await loop.run_in_executor(
                    self.executor, self.fn, [entry.item for entry in batch]
                )
            except BaseException as exc:
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("cancelled")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self._finished()
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)

    def _finished(self) -> None:
        self._running -= 1
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
