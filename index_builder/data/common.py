"""What every importer shares: fingerprints, skip counting, the split rule, the import run,
image checks, PNG canvases, pools."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from index_builder.atomic import atomic_write_bytes, atomic_write_json, read_json
from index_builder.manifest import INFO, MANIFEST, Record, move_splits, write_manifest
from index_builder.progress import progress as show_progress

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
RENDER_MARKER = "RENDER.json"
TEST_FRACTION = 0.05  # of the hash range [0, 1): test below it, val just above, train the rest
VAL_FRACTION = 0.05
HELD_OUT_MIN_ITEMS = 20  # from this many items on, val and test are never left empty
SPLIT_RULE = {
    "hash": "sha1",
    "test": TEST_FRACTION,
    "val": VAL_FRACTION,
    "min_items": HELD_OUT_MIN_ITEMS,
    "version": 2,
}


def fingerprint(source: str, options: dict[str, Any], files: Iterable[str | Path] = ()) -> str:
    """Hash of the importer, its options, the split rule and the (path, size, mtime) of its
    input files."""
    described = json.dumps([source, options, SPLIT_RULE], sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


class Skips:
    """Row-level problems: a count per reason and the first few examples for the log; and
    the rows merged into another (same image or id), counted per reason."""

    def __init__(self, examples: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.merged: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = examples

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{example}: {reason}")

    def merge(self, reason: str) -> None:
        self.merged[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} ({by_reason}); e.g. " + "; ".join(self.examples)

    def merge_summary(self) -> str:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self.merged.most_common())
        return f"merged {sum(self.merged.values())} ({by_reason})"


def split_bucket(key: str) -> float:
    """A stable position in [0, 1) for a key: the first 8 bytes of its SHA-1."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(key: str) -> str:
    """The split of one key by its bucket: test, then val, then train; every machine agrees."""
    bucket = split_bucket(key)
    if bucket < TEST_FRACTION:
        return "test"
    return "val" if bucket < TEST_FRACTION + VAL_FRACTION else "train"


class Splits:
    """The one split rule of every importer, for the items whose source gives no split.

    An item's key (the image's content digest, or the id of a rendered item) picks its split
    (`split_of`). When the dataset has at least HELD_OUT_MIN_ITEMS items and val or test is
    still empty, the train key with the lowest bucket moves to val and the next one to test,
    each with all of its items: the fewest moves, decided by the keys alone, so the same
    images get the same splits whatever importer reads them.
    """

    def __init__(self) -> None:
        self.nearest: dict[str, tuple[float, list[str]]] = {}  # the two lowest train keys

    def assign(self, rid: str, key: str) -> str:
        split = split_of(key)
        if split != "train":
            return split
        if key in self.nearest:
            self.nearest[key][1].append(rid)
            return split
        self.nearest[key] = (split_bucket(key), [rid])
        if len(self.nearest) > 2:
            del self.nearest[max(self.nearest, key=lambda k: self.nearest[k][0])]
        return split

    def moves(self, counts: Mapping[str, int]) -> dict[str, str]:
        """id -> split for the train items that move so that val and test are not empty."""
        if sum(counts.values()) < HELD_OUT_MIN_ITEMS:
            return {}
        empty = [split for split in ("val", "test") if not counts.get(split)]
        train_left = counts.get("train", 0)
        moves: dict[str, str] = {}
        for split, (_, ids) in zip(empty, sorted(self.nearest.values()), strict=False):
            if train_left - len(ids) < 1:  # never empty train
                break
            train_left -= len(ids)
            moves.update(dict.fromkeys(ids, split))
        return moves


@dataclass
class ImportResult:
    out: Path
    info: dict[str, Any]
    up_to_date: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    merged: dict[str, int] = field(default_factory=dict)


def up_to_date(out: Path, fp: str) -> dict[str, Any] | None:
    """The previous description when `out` holds a complete import with this fingerprint."""
    if not (out / MANIFEST).is_file() or not (out / INFO).is_file():
        return None
    try:
        info = read_json(out / INFO)
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("fingerprint") == fp else None


def run_import(
    out: str | Path,
    info: dict[str, Any],
    fp: str,
    produce: Callable[[Skips, Splits], Iterable[Record]],
) -> ImportResult:
    """Write `produce`'s records as the dataset at `out`, unless it is already up to date.

    `produce` counts what it skips or merges in its Skips and takes the split of every item
    without one from its Splits; the moves that keep val and test non-empty are applied
    before the fingerprint is written, so an interrupted import is redone, never half-split.
    """
    out = Path(out)
    previous = up_to_date(out, fp)
    if previous is not None:
        log.info("%s is up to date (fingerprint %s)", out, fp)
        return ImportResult(out, previous, up_to_date=True)
    skips, splits = Skips(), Splits()
    # write_manifest copies `info` after it has drained the records, so the counts that
    # the generator fills in along the way land in dataset.json.
    full_info = {**info, "split_rule": SPLIT_RULE, "skipped": skips.counts, "merged": skips.merged}
    try:
        description = write_manifest(out, produce(skips, splits), full_info)
    except ValueError as exc:
        if skips.total and str(exc).startswith("no usable records"):
            raise ValueError(f"{exc}; {skips.summary()}") from None
        raise
    moves = splits.moves(description["splits"])
    if moves:
        description["splits"] = move_splits(out, moves)
        log.info("moved %d item(s) out of train so that val and test are not empty", len(moves))
    description = {**description, "fingerprint": fp, "moved": moves}
    atomic_write_json(out / INFO, description)
    if skips.total:
        log.warning("%s", skips.summary())
    if skips.merged:
        log.warning("%s", skips.merge_summary())
    return ImportResult(out, description, skipped=dict(skips.counts), merged=dict(skips.merged))


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on an interactive terminal, a log line every ~15 s elsewhere (a log file
    shows how far an import is); see index_builder.progress."""
    yield from show_progress(items, desc=desc, total=total)


def parallel_map(
    fn: Callable[[T], R], jobs: Iterable[T], workers: int, chunksize: int = 8
) -> Iterator[R]:
    """`map` in a process pool, results in input order and streamed (constant memory)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, maxtasksperchild=500) as pool:
        yield from pool.imap(fn, jobs, chunksize=chunksize)


def fit_square(image: Image.Image, size: int, margin: float = 0.04) -> Image.Image:
    """Scale to fit inside `size` x `size` (aspect kept) centred on white; alpha is flattened."""
    rgba = image.convert("RGBA")
    inner = max(1, round(size * (1 - 2 * margin)))
    scale = inner / max(rgba.size)
    new = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
    rgba = rgba.resize(new, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgba, ((size - new[0]) // 2, (size - new[1]) // 2), mask=rgba.getchannel("A"))
    return canvas


def content_box(image: Image.Image, threshold: int = 8) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels that are not (nearly) transparent; None when there are none."""
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a > threshold else 0).getbbox()


def write_png(path: str | Path, image: Image.Image) -> None:
    """Encode and write atomically: a killed import never leaves a truncated PNG behind."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_square(image: Image.Image, path: str | Path, size: int) -> str | None:
    """Crop a rendering to its drawn pixels and write it as a `size` square PNG.

    None on success, or the reason it was skipped (nothing drawn).
    """
    box = content_box(image)
    if box is None:
        return "empty rendering"
    write_png(path, fit_square(image.crop(box), size))
    return None


def path_id(prefix: str, relpath: str) -> str:
    """A record id from a relative path: "a/b c.png" -> "<prefix>.a.b_c.png"."""
    dotted = relpath.replace(os.sep, ".").replace("/", ".")
    return f"{prefix}." + re.sub(r"[^A-Za-z0-9_.\-]+", "_", dotted)


def prepare_render_dir(images: Path, params: dict[str, Any]) -> bool:
    """Record the render parameters beside the images; True when earlier renders can be reused.

    Images left by an interrupted run are complete files (written atomically), so a rerun
    with the same parameters keeps them; other parameters mean they must be redone, so the
    stale ones are removed first (an interrupted redo must not mix the two).
    """
    marker = images / RENDER_MARKER
    reusable = marker.is_file() and read_json(marker) == params
    if not reusable:
        for stale in images.rglob("*.png"):
            stale.unlink()
        atomic_write_json(marker, params)
    return reusable


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_problem(data: bytes) -> str | None:
    """Why image bytes cannot be used, or None when they decode in full.

    A header check alone passes a truncated file that later aborts indexing or training.
    JPEGs decode at 1/8 scale (`draft`): that still reads the whole entropy-coded stream,
    so truncation is caught, at about half the cost.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS:
        return "unreadable image"
    with image:
        if not (image.width and image.height):
            return "unreadable image"
        try:
            image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        except _DECODE_ERRORS:
            return "truncated or corrupt image"
    return None


def read_image(path: Path) -> tuple[str, str | None]:
    """(SHA-1 of the file's bytes, why it cannot be used or None): decoded in full.

    The digest is the item's split key, so the same image gets the same split whatever
    importer reads it, under whatever name.
    """
    if not path.is_file():
        return "", "missing image"
    try:
        data = path.read_bytes()
    except OSError:
        return "", "unreadable image"
    return hashlib.sha1(data).hexdigest(), decode_problem(data)


def load_json_input(path: Path, what: str) -> Any:
    """A whole-input JSON file: missing or malformed is one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return read_json(path)
