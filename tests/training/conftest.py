"""A tiny synthetic gallery (coloured shapes with captions) and a tiny-preset config."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from index_builder.manifest import Record, write_manifest

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (10, 10, 10),
    "cyan": (20, 200, 220),
}
SHAPES = ("square", "circle", "triangle")


def make_gallery(root: Path, per_split: tuple[int, int, int] = (36, 6, 6)) -> Path:
    """Coloured shapes on white, each with two captions; splits by position in the list."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    combos = [(c, s, big) for big in (True, False) for s in SHAPES for c in COLOURS]
    splits = ["train"] * per_split[0] + ["val"] * per_split[1] + ["test"] * per_split[2]
    records = []
    for i, ((colour, shape, big), split) in enumerate(zip(combos, splits, strict=False)):
        image = Image.new("RGB", (72, 72), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = (8, 8, 64, 64) if big else (22, 22, 50, 50)
        rgb = COLOURS[colour]
        if shape == "square":
            draw.rectangle(box, fill=rgb)
        elif shape == "circle":
            draw.ellipse(box, fill=rgb)
        else:
            draw.polygon(
                [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb
            )
        name = f"images/{i:03d}.png"
        image.save(root / name)
        size = "big" if big else "small"
        captions = (f"a {size} {colour} {shape}", f"{colour} {shape} on white")
        records.append(Record(f"item-{i:03d}", name, captions, split))
    write_manifest(root, records, {"name": "shapes", "source": "synthetic"})
    return root


@pytest.fixture(scope="session")
def gallery(tmp_path_factory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("gallery"))


TINY_OVERRIDES = [
    "model.preset=tiny",
    "data.batch_size=8",
    "data.workers=0",
    "data.eval_batch_size=32",
    "contrast.queue_size=16",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "train.log_every=1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cots_home(tmp_path_factory, monkeypatch):
    """Default artifact paths ($COTS_HOME: runs, the feature cache) under pytest's temp dir."""
    monkeypatch.setenv("COTS_HOME", str(tmp_path_factory.getbasetemp() / "cots-home"))
