"""Files kept by content under an index root's `files/` (uploads, WebDataset images): their
names, the journal of a change's uploads, and their collection once no version names them.
Every backend's store collects through here; each says which names its kept versions hold."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from index_builder.atomic import atomic_write_text

log = logging.getLogger(__name__)

# Files kept by content under root/files/ (`sources.store_file`), and how long one no version
# names is kept anyway: a build may have stored it and not yet published.
FILES_DIR = "files"
FILES_GRACE_S = 3600.0
STORED_NAME = re.compile(r"[0-9a-f]{64}\.[A-Za-z0-9]{1,8}")
STORED_NAME_IN = re.compile(rb"[0-9a-f]{64}\.[A-Za-z0-9]{1,8}")


def names_in(path: Path) -> set[str]:
    """The stored file names a file mentions (a regular expression over its mapped bytes)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return set()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return {m.group().decode() for m in STORED_NAME_IN.finditer(data)}


def collect_stored_files(root: Path, named: set[str], grace_s: float = FILES_GRACE_S) -> list[str]:
    """Remove the files under `root/files/` (uploads and WebDataset images, stored by content)
    that neither `named` (the names the kept versions hold) nor an embedding or change in
    progress (`work/`, `staging/`) names, and that were not stored or wanted in the last
    `grace_s` seconds (a build may be about to name them); the uploads of a change whose
    process died (kill -9; its journal under work/ outlived it) go at once. Returns the
    names removed."""
    files = root / FILES_DIR
    if not files.is_dir():
        return []
    present = {p.name for p in files.iterdir() if STORED_NAME.fullmatch(p.name)}
    orphaned = _orphaned_uploads(root / "work", grace_s)
    if not present:
        return []
    named = set(named)
    for folder in (root / "work", root / "staging"):
        if folder.is_dir():
            for path in folder.rglob("*.json*"):
                named |= names_in(path)
    cutoff = time.time() - grace_s
    removed = []
    for name in sorted(present - named):
        path = files / name
        with contextlib.suppress(FileNotFoundError):
            if name in orphaned or path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(name)
    if removed:
        log.info("removed %d stored files no index version names", len(removed))
    return removed


@contextlib.contextmanager
def journal_uploads(root: Path, names: Iterable[str]) -> Iterator[None]:
    """Name the files a change is about to store under `files/` in a journal under `work/`
    for as long as the change runs: `collect_stored_files` spares them meanwhile, and if
    this process dies first (kill -9), the next collection removes those no version names
    at once instead of an hour later. The journal is named for this host and process (its
    id and start time, so a restarted container that reuses the id is not taken for it)."""
    names = sorted(names)
    if not names:
        yield
        return
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    journal = work / f"{_JOURNAL_PREFIX}{os.uname().nodename}-{pid}-{_started(pid)}.json"
    atomic_write_text(journal, json.dumps(names))
    try:
        yield
    finally:
        journal.unlink(missing_ok=True)


_JOURNAL_PREFIX = "uploads-"
_JOURNAL = re.compile(r"uploads-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)\.json")


def _started(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat); 0 where unknown
    (not Linux), -1 when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return -1
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command in ()


def _orphaned_uploads(work: Path, grace_s: float) -> set[str]:
    """The names in upload journals whose process is gone (this host) or that are older than
    `grace_s` (another host's); those journals are removed."""
    if not work.is_dir():
        return set()
    host = os.uname().nodename
    cutoff = time.time() - grace_s
    orphaned: set[str] = set()
    for journal in work.glob(f"{_JOURNAL_PREFIX}*.json"):
        match = _JOURNAL.fullmatch(journal.name)
        if match is None:
            continue
        try:
            start = _started(int(match["pid"])) if match["host"] == host else 0
            alive = start != 0 and start == int(match["start"])
            gone = start != 0 and not alive  # this host's, and provably dead
            if alive or not (gone or journal.stat().st_mtime < cutoff):
                continue  # its change may still be running
            names = json.loads(journal.read_text())
            journal.unlink()
        except (OSError, ValueError):
            continue
        if gone:  # else (another host's, or unknown) its files fall back to the grace period
            orphaned |= {n for n in names if isinstance(n, str) and STORED_NAME.fullmatch(n)}
    return orphaned
