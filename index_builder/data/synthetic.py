"""Synthetic scenes: coloured shapes with compositional captions, deterministic by seed."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    parallel_map,
    prepare_render_dir,
    progress,
    run_import,
    write_png,
)
from index_builder.manifest import Record

VERSION = 1
MAX_COUNT = 1_000_000
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "orange": (245, 130, 0),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SIZES = {"small": 0.09, "large": 0.18}  # radius as a fraction of the canvas side
RELATIONS = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}


@dataclass(frozen=True)
class SyntheticConfig:
    count: int = 1000
    seed: int = 0
    size: int = 256
    workers: int = 2


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cx: float  # centre, fraction of the canvas side
    cy: float

    def phrase(self, with_size: bool = True) -> str:
        words = [self.size, self.colour, self.kind] if with_size else [self.colour, self.kind]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    relation: str  # how shapes[0] sits relative to shapes[1]; "" for one shape

    def captions(self) -> tuple[str, ...]:
        if not self.relation:
            one = self.shapes[0]
            return (one.phrase(), f"{one.phrase(False)} on a white background")
        a, b = self.shapes
        return (
            f"{a.phrase()} {self.relation} {b.phrase()}",
            f"{b.phrase()} {RELATIONS[self.relation]} {a.phrase()}",
            f"{a.phrase(False)} and {b.phrase(False)}",
        )


def make_scene(seed: int, index: int) -> Scene:
    """The scene of item `index`: its own RNG, so any item can be made alone and in any order."""
    rng = random.Random(f"cots-synthetic-{seed}-{index}")
    colours = rng.sample(sorted(COLOURS), 2)  # two different colours keep captions unambiguous
    sizes = [rng.choice(sorted(SIZES)) for _ in range(2)]
    kinds = [rng.choice(SHAPES) for _ in range(2)]
    if rng.random() < 0.25:
        radius = SIZES[sizes[0]]
        cx, cy = (rng.uniform(radius + 0.05, 0.95 - radius) for _ in range(2))
        return Scene((Shape(kinds[0], colours[0], sizes[0], cx, cy),), "")
    relation = rng.choice(sorted(RELATIONS))
    # Each shape gets its own half of the canvas along the relation's axis.
    first, second = (0.25, 0.75) if relation in ("above", "to the left of") else (0.75, 0.25)
    shapes = []
    for k, along in enumerate((first, second)):
        radius = SIZES[sizes[k]]
        jitter = 0.25 - radius - 0.02
        main = along + rng.uniform(-jitter, jitter)
        across = rng.uniform(radius + 0.05, 0.95 - radius)
        cx, cy = (across, main) if relation in ("above", "below") else (main, across)
        shapes.append(Shape(kinds[k], colours[k], sizes[k], cx, cy))
    return Scene(tuple(shapes), relation)


def shape_polygon(kind: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if kind == "star":
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
        return [
            (x + q * math.sin(i * math.pi / 5), y - q * math.cos(i * math.pi / 5))
            for i, q in enumerate(radii)
        ]
    corners, turn = {"triangle": (3, 0.0), "diamond": (4, 0.0), "hexagon": (6, 0.5)}[kind]
    return [
        (
            x + r * math.sin((i + turn) * 2 * math.pi / corners),
            y - r * math.cos((i + turn) * 2 * math.pi / corners),
        )
        for i in range(corners)
    ]


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """Flat colours without anti-aliasing: every pixel is the background or a shape colour."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y, r = shape.cx * size, shape.cy * size, SIZES[shape.size] * size
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            half = r / math.sqrt(2) * 1.2
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:
            draw.polygon(shape_polygon(shape.kind, x, y, r), fill=fill)
    return image


def image_name(seed: int, index: int) -> str:
    """Sharded so that a million images never sit in one directory."""
    return f"images/{index // 1000:04d}/syn-{seed}-{index:07d}.png"


def render_item(job: tuple[int, int, int, str, bool]) -> tuple[str, ...]:
    seed, index, size, root, reuse = job
    scene = make_scene(seed, index)
    path = Path(root) / image_name(seed, index)
    if not (reuse and path.exists()):
        write_png(path, draw_scene(scene, size))
    return scene.captions()


def import_synthetic(cfg: SyntheticConfig, out: str | Path) -> ImportResult:
    if not 10 <= cfg.count <= MAX_COUNT:
        raise ValueError(f"--count must be between 10 and {MAX_COUNT:,}, got {cfg.count}")
    if cfg.size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {cfg.size}")
    options = {**asdict(cfg), "workers": None, "version": VERSION}
    fp = fingerprint("synthetic", options)
    info = {"name": Path(out).name, "source": "synthetic", "seed": cfg.seed, "size": cfg.size}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        root = Path(out)
        params = {"source": "synthetic", "seed": cfg.seed, "size": cfg.size, "version": VERSION}
        reuse = prepare_render_dir(root / "images", params)
        jobs = ((cfg.seed, i, cfg.size, str(root), reuse) for i in range(cfg.count))
        results = parallel_map(render_item, jobs, cfg.workers, chunksize=64)
        for index, captions in enumerate(progress(results, "synthetic", cfg.count)):
            rid = f"syn-{cfg.seed}-{index:07d}"
            yield Record(rid, image_name(cfg.seed, index), captions, splits.assign(rid, rid))

    return run_import(out, info, fp, produce)
