"""What every importer shares: fingerprints, skip counting, the import run, PNG canvases, pools."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from tqdm import tqdm

from index_builder.atomic import atomic_write_bytes, atomic_write_json, read_json
from index_builder.manifest import INFO, MANIFEST, Record, write_manifest

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
RENDER_MARKER = "RENDER.json"


def fingerprint(source: str, options: dict[str, Any], files: Iterable[str | Path] = ()) -> str:
    """Hash of the importer, its options and the (path, size, mtime) of its input files."""
    digest = hashlib.sha256(json.dumps([source, options], sort_keys=True, default=str).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


class Skips:
    """Row-level problems: a count per reason and the first few examples for the log."""

    def __init__(self, examples: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = examples

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{example}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} ({by_reason}); e.g. " + "; ".join(self.examples)


@dataclass
class ImportResult:
    out: Path
    info: dict[str, Any]
    up_to_date: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


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
    produce: Callable[[Skips], Iterable[Record]],
) -> ImportResult:
    """Write `produce`'s records as the dataset at `out`, unless it is already up to date."""
    out = Path(out)
    previous = up_to_date(out, fp)
    if previous is not None:
        log.info("%s is up to date (fingerprint %s)", out, fp)
        return ImportResult(out, previous, up_to_date=True)
    skips = Skips()
    # write_manifest copies `info` after it has drained the records, so the skip
    # counts that the generator fills in along the way land in dataset.json.
    full_info = {**info, "fingerprint": fp, "skipped": skips.counts}
    try:
        description = write_manifest(out, produce(skips), full_info)
    except ValueError as exc:
        if skips.total and str(exc).startswith("no usable records"):
            raise ValueError(f"{exc}; {skips.summary()}") from None
        raise
    if skips.total:
        log.warning("%s", skips.summary())
    return ImportResult(out, description, skipped=dict(skips.counts))


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on an interactive terminal, silence elsewhere (logs and tests stay clean)."""
    yield from tqdm(items, desc=desc, total=total, unit="item", disable=None, dynamic_ncols=True)


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


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (missing, not an image), or None when it can.

    Only the header is read: a full decode of every image would dominate the import.
    """
    if not path.is_file():
        return "missing image"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable image"
    return None if width and height else "unreadable image"


def load_json_input(path: Path, what: str) -> Any:
    """A whole-input JSON file: missing or malformed is one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return read_json(path)
