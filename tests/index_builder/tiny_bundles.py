"""Tiny bundles made with onnx.helper (no torch): a linear image tower, a bag-of-words text one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_builder.bundle import Bundle
from index_builder.preprocess import ImageSpec, TextSpec
from index_builder.synthetic import (  # noqa: F401 (the tests import these from here)
    WORDS,
    make_tokenizer,
    save_bundle,
    text_graph,
)


def make_tiny_bundle(out: Path, dim: int = 8, size: int = 8, seed: int = 0) -> Bundle:
    """image: flatten -> linear -> L2; text: bag of words over WORDS."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3 * size * size, dim)).astype(np.float32)
    table = rng.standard_normal((len(WORDS) + 2, dim)).astype(np.float32)
    image = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["proj"]),
            helper.make_node("LpNormalization", ["proj"], ["embedding"], axis=1, p=2),
        ],
        "image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])],
        [numpy_helper.from_array(weight, "W")],
    )
    spec = ImageSpec(size=size, resize=size)
    return save_bundle(out, image, text_graph(table), spec, TextSpec(context_length=8))


COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "black": (0, 0, 0)}
THINGS = ["cat", "dog", "car", "tree", "house"]


def make_gallery(root: Path, n: int = 12, prefix: str = "g") -> Path:
    """A dataset directory of n small coloured images with two captions each."""
    from PIL import Image

    from index_builder.manifest import Record, write_manifest

    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLOURS)
    for i in range(n):
        colour, thing = names[i % len(names)], THINGS[i % len(THINGS)]
        image = Image.new("RGB", (10 + i % 3, 10), COLOURS[colour])
        image.putpixel((i % 8, 3), (255, 255, 0))
        image.save(root / "images" / f"{prefix}{i}.png")
        captions = (f"a {colour} {thing}", f"the {thing} is {colour}")
        records.append(Record(f"{prefix}{i}", f"images/{prefix}{i}.png", captions, "test"))
    write_manifest(root, records, {"name": "tiny", "fingerprint": prefix})
    return root
