"""Synthetic video clips: two shape events in sequence, captioned in time order, by seed.

A clip is two events, one per half: a coloured shape grows, shrinks, appears or disappears
("a red square grows, then a blue circle disappears"). Items come in swapped pairs: item 2k
shows events (A, B) and item 2k+1 the same events as (B, A), in the same split. Both clips of a
pair hold the same frames in another order, so a model that ignores frame order (mean pooling)
cannot tell them apart, and each verb is undone by its opposite played backwards (grows /
shrinks, appears / disappears): only the order of the frames says which clip a caption means.
Each verb changes what the shape looks like, not where it is, so a frozen image tower with
global pooling sees it.
"""

from __future__ import annotations

import functools
import math
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from index_builder.atomic import atomic_write_bytes, atomic_write_json, read_json
from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    parallel_map,
    progress,
    run_import,
    split_bucket,
)
from index_builder.data.synthetic import COLOURS, shape_polygon
from index_builder.manifest import Record
from index_builder.video import encode_video

VERSION = 3  # 2: no repeated pairs; 3: "an orange"
MAX_COUNT = 100_000
SHAPES = ("circle", "square", "triangle", "star")
VERBS = ("grows", "shrinks", "appears", "disappears")
SMALL, LARGE = 0.1, 0.36  # radius as a fraction of the side
MARKER = "RENDER.json"


@dataclass(frozen=True)
class SyntheticVideoConfig:
    count: int = 400
    seed: int = 0
    size: int = 96  # square side in pixels (even: H.264 needs it)
    frames: int = 16  # per clip; each event takes half
    fps: int = 8
    workers: int = 2


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    verb: str

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {self.verb}"

    def radius(self, t: float) -> float:
        """The shape's radius at time t in [0, 1] of its half (0: not drawn)."""
        if self.verb == "grows":
            return SMALL + (LARGE - SMALL) * t
        if self.verb == "shrinks":
            return LARGE - (LARGE - SMALL) * t
        shown = t >= 0.5 if self.verb == "appears" else t < 0.5
        return (SMALL + LARGE) / 2 if shown else 0.0


@functools.lru_cache(maxsize=4)
def event_pairs(seed: int) -> tuple[tuple[Event, Event], ...]:
    """Every pair of events in two colours (5,376), in an order shuffled by `seed`: pairs
    repeat only past that many, so no two clips of a smaller gallery are the same."""
    events = [Event(c, s, v) for c in sorted(COLOURS) for s in SHAPES for v in VERBS]
    pairs = [(a, b) for i, a in enumerate(events) for b in events[i + 1 :] if a.colour != b.colour]
    random.Random(f"cots-synthetic-video-{seed}").shuffle(pairs)
    return tuple(pairs)


def make_events(seed: int, pair: int) -> tuple[Event, Event]:
    """The two events of pair `pair`."""
    pairs = event_pairs(seed)
    return pairs[pair % len(pairs)]


def clip_events(seed: int, index: int) -> tuple[Event, Event]:
    """Item `index`: its pair's events, swapped for the odd member."""
    first, second = make_events(seed, index // 2)
    return (first, second) if index % 2 == 0 else (second, first)


def captions(events: tuple[Event, Event]) -> tuple[str, ...]:
    a, b = (event.phrase() for event in events)
    return (f"{a}, then {b}", f"first {a} and then {b}")


def draw_frame(event: Event, t: float, size: int) -> np.ndarray:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    radius = event.radius(t) * size
    if radius > 0:
        draw = ImageDraw.Draw(image)
        x = y = size / 2
        fill = COLOURS[event.colour]
        if event.shape == "circle":
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
        elif event.shape == "square":
            half = radius / math.sqrt(2) * 1.2
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:
            draw.polygon(shape_polygon(event.shape, x, y, radius), fill=fill)
    return np.asarray(image)


def render_clip(events: tuple[Event, Event], size: int, frames: int) -> list[np.ndarray]:
    half = frames // 2
    out = []
    for i in range(frames):
        event = events[0] if i < half else events[1]
        span = half if i < half else frames - half
        step = i if i < half else i - half
        out.append(draw_frame(event, step / max(1, span - 1), size))
    return out


def video_name(seed: int, index: int) -> str:
    return f"videos/{index // 1000:04d}/synv-{seed}-{index:06d}.mp4"


def render_item(job: tuple[SyntheticVideoConfig, int, str, bool]) -> tuple[str, ...]:
    cfg, index, root, reuse = job
    events = clip_events(cfg.seed, index)
    path = Path(root) / video_name(cfg.seed, index)
    if not (reuse and path.exists()):
        data = encode_video(render_clip(events, cfg.size, cfg.frames), fps=cfg.fps)
        atomic_write_bytes(path, data)
    return captions(events)


def _prepare_videos(videos: Path, params: dict) -> bool:
    """True when videos rendered earlier with the same parameters can be kept."""
    marker = videos / MARKER
    if marker.is_file() and read_json(marker) == params:
        return True
    shutil.rmtree(videos, ignore_errors=True)
    atomic_write_json(marker, params)
    return False


def pair_split(key: str) -> str:
    """Both clips of a pair share a split: 10 % test, 10 % val by the pair's hash bucket
    (twice the usual held-out share: a small gallery still gets a test set of a few dozen)."""
    bucket = split_bucket(key)
    return "test" if bucket < 0.1 else "val" if bucket < 0.2 else "train"


def import_synthetic_video(cfg: SyntheticVideoConfig, out: str | Path) -> ImportResult:
    if not 10 <= cfg.count <= MAX_COUNT or cfg.count % 2:
        raise ValueError(f"--count must be even and between 10 and {MAX_COUNT:,}, got {cfg.count}")
    if cfg.size < 32 or cfg.size % 2:
        raise ValueError(f"--size must be even and at least 32 pixels, got {cfg.size}")
    if cfg.frames < 4 or cfg.fps < 1:
        raise ValueError(f"need --frames >= 4 and --fps >= 1, got {cfg.frames} and {cfg.fps}")
    options = {**asdict(cfg), "workers": None, "version": VERSION}
    fp = fingerprint("synthetic-video", options)
    info = {
        "name": Path(out).name,
        "source": "synthetic-video",
        "media": "video",
        **{k: v for k, v in options.items() if k in ("seed", "size", "frames", "fps")},
    }

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:  # splits: by pair, below
        root = Path(out)
        reuse = _prepare_videos(root / "videos", {**options, "count": None})
        jobs = ((cfg, i, str(root), reuse) for i in range(cfg.count))
        results = parallel_map(render_item, jobs, cfg.workers, chunksize=16)
        for index, texts in enumerate(progress(results, "synthetic-video", cfg.count)):
            rid = f"synv-{cfg.seed}-{index:06d}"
            split = pair_split(f"synv-{cfg.seed}-pair-{index // 2}")
            yield Record(rid, video_name(cfg.seed, index), texts, split, {"pair": index // 2})

    return run_import(out, info, fp, produce)
