"""Tiny bundles made with onnx.helper (no torch): a linear image tower, a bag-of-words text one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index_builder.bundle import Bundle, write_bundle
from index_builder.preprocess import ImageSpec, TextSpec

if TYPE_CHECKING:
    from onnx import GraphProto

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "apple",
    "ball",
    "star",
    "sun",
]


def make_tokenizer(path: Path, words: Sequence[str] = WORDS, lowercase: bool = False) -> Path:
    """A word-level tokenizer: [PAD] 0, [UNK] 1, then `words` in order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def text_graph(table: np.ndarray) -> GraphProto:
    """Text tower: the masked sum of the token rows of `table` (a bag of words), L2-normalised."""
    from onnx import TensorProto, helper, numpy_helper

    return helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["tok"]),  # (B, L, D)
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
            helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
            helper.make_node("LpNormalization", ["pooled"], ["embedding"], axis=1, p=2),
        ],
        "text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", table.shape[1]])],
        [
            numpy_helper.from_array(table, "E"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )


def save_bundle(
    out: Path,
    image: GraphProto,
    text: GraphProto,
    image_spec: ImageSpec,
    text_spec: TextSpec,
    source: str = "synthetic",
    words: Sequence[str] = WORDS,
    lowercase: bool = False,
) -> Bundle:
    """Check and save the two tower graphs (opset 17), a tokenizer over `words`, as a bundle."""
    import onnx
    from onnx import helper

    work = out.parent / f".{out.name}-src"
    work.mkdir(parents=True, exist_ok=True)
    for name, graph in (("image", image), ("text", text)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, work / f"{name}.onnx")
    return write_bundle(
        out,
        image_onnx=work / "image.onnx",
        text_onnx=work / "text.onnx",
        tokenizer_json=make_tokenizer(work / "tokenizer.json", words, lowercase),
        embed_dim=text.output[0].type.tensor_type.shape.dim[1].dim_value,
        image_spec=image_spec,
        text_spec=text_spec,
        opset=17,
        extra={"source": {"checkpoint": source}},
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
