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
    """Collects items until `max_batch` are waiting or `max_wait_s` has passed since the first,
    then runs `fn(items) -> results` (same length, same order) in `executor`.

    `workers` batches may run at once; while they run, new items queue up and form the next
    batch, so under load batches grow by themselves and the event loop never blocks.
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
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._collect() if not entry.future.done()]
            if not batch:
                continue
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
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
