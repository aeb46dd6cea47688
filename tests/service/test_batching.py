"""Micro-batching: concurrent queries share one call, results keep their order, errors reach
every caller of the failed batch, and the event loop keeps running while a batch computes."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.batching import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def make(fn, **kwargs):
    executor = ThreadPoolExecutor(2)
    options = {"max_batch": 16, "max_wait_s": 0.05, "workers": 1, **kwargs}
    return MicroBatcher(fn, executor, **options), executor


def test_concurrent_submits_form_one_batch_in_order():
    calls: list[list[int]] = []

    def double(items):
        calls.append(list(items))
        return [2 * x for x in items]

    async def main():
        batcher, executor = make(double)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await batcher.stop()
        executor.shutdown()
        return results

    assert run(main()) == [[2 * i] for i in range(10)]
    assert calls == [list(range(10))]


def test_batches_never_exceed_max_batch():
    sizes: list[int] = []

    def echo(items):
        sizes.append(len(items))
        return list(items)

    async def main():
        batcher, executor = make(echo, max_batch=4, max_wait_s=0.01)
        batcher.start()
        out = await batcher.submit(list(range(11)))
        await batcher.stop()
        executor.shutdown()
        return out

    assert run(main()) == list(range(11))
    assert max(sizes) <= 4 and sum(sizes) == 11


def test_an_error_reaches_the_batch_and_the_next_batch_works():
    def fragile(items):
        if "bad" in items:
            raise ValueError("boom")
        return [item.upper() for item in items]

    async def main():
        batcher, executor = make(fragile, max_wait_s=0.02)
        batcher.start()
        first = await asyncio.gather(
            batcher.submit(["ok"]), batcher.submit(["bad"]), return_exceptions=True
        )
        second = await batcher.submit(["fine"])
        await batcher.stop()
        executor.shutdown()
        return first, second

    first, second = run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == ["FINE"]


def test_the_event_loop_runs_while_a_batch_computes():
    def slow(items):
        time.sleep(0.3)
        return items

    async def main():
        batcher, executor = make(slow, max_wait_s=0)
        batcher.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await batcher.submit([1])
        task.cancel()
        await batcher.stop()
        executor.shutdown()
        return ticks

    assert run(main()) >= 10


def test_an_idle_batcher_dispatches_a_lone_query_at_once():
    """No batch runs, so the query goes without waiting out the (long) window."""

    async def main():
        batcher, executor = make(list, max_wait_s=1.0)
        batcher.start()
        start = time.perf_counter()
        out = await batcher.submit([7])
        took = time.perf_counter() - start
        await batcher.stop()
        executor.shutdown()
        return out, took

    out, took = run(main())
    assert out == [7] and took < 0.2


def gate(calls: list[list[int]]):
    """A batch function whose first call blocks until `release` is set (`started` once it
    runs), so that tests can queue queries while a batch is in flight."""
    started, release = threading.Event(), threading.Event()

    def fn(items):
        calls.append(list(items))
        if len(calls) == 1:
            started.set()
            release.wait(5)
        return list(items)

    return fn, started, release


async def wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


def test_queries_queued_behind_a_running_batch_form_the_next_batch():
    calls: list[list[int]] = []
    fn, started, release = gate(calls)

    async def main():
        batcher, executor = make(fn, max_wait_s=1.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))
        await wait_for(started)
        rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 6)]
        await asyncio.sleep(0.02)
        release.set()
        start = time.perf_counter()
        results = await asyncio.gather(first, *rest)
        took = time.perf_counter() - start
        await batcher.stop()
        executor.shutdown()
        return results, took

    results, took = run(main())
    assert results == [[i] for i in range(6)]
    assert calls == [[0], [1, 2, 3, 4, 5]] and took < 0.5


def test_a_second_worker_gathers_until_the_running_batch_ends():
    """With two workers, queries arriving one by one while a batch runs join one batch,
    which goes as soon as the running batch ends (not after the 10 s window)."""
    calls: list[list[int]] = []
    fn, started, release = gate(calls)

    async def main():
        batcher, executor = make(fn, max_wait_s=10.0, workers=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))
        await wait_for(started)
        rest = []
        for i in range(1, 4):
            rest.append(asyncio.ensure_future(batcher.submit([i])))
            await asyncio.sleep(0.01)
        release.set()
        start = time.perf_counter()
        results = await asyncio.gather(first, *rest)
        took = time.perf_counter() - start
        await batcher.stop()
        executor.shutdown()
        return results, took

    results, took = run(main())
    assert results == [[i] for i in range(4)]
    assert calls == [[0], [1, 2, 3]] and took < 1.0


def test_stop_fails_every_query_a_worker_holds():
    """stop() while one batch runs and a second worker gathers: both callers get an error,
    none waits forever."""
    calls: list[list[int]] = []
    fn, started, release = gate(calls)

    async def main():
        batcher, executor = make(fn, max_wait_s=10.0, workers=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))
        await wait_for(started)
        second = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.02)  # the second worker holds it, waiting for more
        await asyncio.wait_for(batcher.stop(), 1)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 1)
        executor.shutdown()
        return results

    first, second = run(main())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert "shutting down" in str(second)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(list, ThreadPoolExecutor(1), max_batch=0, max_wait_s=0)


def test_concurrent_http_queries_share_encoder_calls(settings_for, serve):
    """Twelve simultaneous requests reach the text tower in fewer than twelve calls."""
    from service.app import create_app

    app = create_app(settings_for(batch_wait_ms=30, batch_size=32))
    with serve(app) as server:
        barrier = threading.Barrier(12)
        statuses = []

        def one(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                barrier.wait()
                statuses.append(
                    http.post("/search/text-to-image", json={"text": "red"}).status_code
                )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert statuses == [200] * 12
    calls = float(re.search(r'cots_batch_size_count\{modality="text"\} (\S+)', metrics).group(1))
    total = float(re.search(r'cots_batch_size_sum\{modality="text"\} (\S+)', metrics).group(1))
    assert total == 12 and calls < 12


def test_searches_run_with_search_and_lone_search_threads(settings_for, open_client, monkeypatch):
    """COTS_SEARCH_THREADS and COTS_LONE_SEARCH_THREADS reach every thread that searches (the
    setting is per thread): the encoder pool's batches, a lone query, and 'more like this' in
    the default pool."""
    import faiss

    from index_builder.backends.faiss.version import LoadedIndex

    seen: list[int] = []
    search = LoadedIndex.find

    def recording(self, *args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return search(self, *args, **kwargs)

    monkeypatch.setattr(LoadedIndex, "find", recording)
    settings = settings_for(search_threads=3, lone_search_threads=4, batch_workers=2)
    with open_client(settings) as c:
        assert c.post("/search/text-to-image", json={"text": "red"}).status_code == 200
        assert c.post("/search/image-to-image", json={"id": "red"}).status_code == 200
        two = c.post("/search/text-to-image", json={"texts": ["red", "blue"]})
        assert two.status_code == 200
    assert seen == [4, 4, 3]  # a lone query and 'more like this': lone_search_threads
