"""Progress of long loops: a tqdm bar on a terminal, a plain log line every ~15 s elsewhere.

A stage run with its output in a log file (`cots demo > demo.log 2>&1`, a CronJob, CI) gets
lines such as

    12:00:15 INFO index_builder.progress: openclipart: 1,234/5,209 items (24%), 82.3 items/s,
    0:48 left

and, for a loop that logged any, a last line with its count and time. The one helper of the
project: every long loop (importers, embedding, feature caching, training) goes through it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")
EVERY_S = 15.0  # seconds between two log lines


def interactive() -> bool:
    """Whether progress goes to a terminal (a bar) rather than a log (lines)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(
    items: Iterable[T] | None = None,
    desc: str = "",
    total: int | None = None,
    unit: str = "item",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    every: float | None = None,
) -> Any:  # tqdm on a terminal, LogProgress elsewhere: the same calls work on both
    """Progress over `items` (iterate the result) or, without them, a counter to `update(n)`.
    Both kinds offer iteration, `update`, `set_postfix`, `close` and `with`."""
    if total is None and items is not None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive() or disable:
        return tqdm(
            items,
            desc=desc,
            total=total,
            unit=unit,
            initial=initial,
            disable=disable,
            leave=leave,
            dynamic_ncols=True,
        )
    return LogProgress(items, desc, total, unit, initial, EVERY_S if every is None else every)


class LogProgress(Generic[T]):
    """tqdm's interface, written as a log line every `every` seconds: count, rate, time left."""

    def __init__(
        self,
        items: Iterable[T] | None,
        desc: str,
        total: int | None,
        unit: str = "item",
        initial: int = 0,
        every: float = EVERY_S,
    ) -> None:
        self.items, self.desc, self.total, self.unit = items, desc, total, unit
        self.n = self.initial = initial
        self.every = every
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.logged = False
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        assert self.items is not None, "progress() without items: call update()"
        try:
            for item in self.items:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.logged = True
            log.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """The last line, for a loop long enough to have logged one."""
        if self.closed:
            return
        self.closed = True
        if self.logged:
            elapsed = time.monotonic() - self.start
            rate = (self.n - self.initial) / max(elapsed, 1e-9)
            log.info(
                "%s: %s %ss in %s (%.1f %ss/s)",
                self.desc,
                f"{self.n:,}",
                self.unit,
                clock(elapsed),
                rate,
                self.unit,
            )

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        count = f"{self.n:,}"
        if self.total:
            count += f"/{self.total:,} {self.unit}s ({self.n / self.total:.0%})"
        else:
            count += f" {self.unit}s"
        text = f"{self.desc}: {count}, {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0:
            text += f", {clock((self.total - self.n) / rate)} left"
        else:
            text += f", {clock(elapsed)} so far"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text


def clock(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    minutes, secs = divmod(int(round(max(seconds, 0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
