"""Tiny synthetic bundles and galleries (no torch, no training) for tests and benches.

The colour towers: the image tower averages the normalised pixels per channel (so a red square
embeds near (1, -1, -1)); the text tower sums word embeddings where colour words sit at the same
points. "a red square" therefore retrieves the red image, and a red image retrieves red
captions. Graphs are made with onnx.helper (the `onnx` package is needed only here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions
from index_builder.bundle import Bundle, write_bundle
from index_builder.encoders import ImageEncoder, TextEncoder
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


DIM = 8
SIZE = 8
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
FILLER = ("a", "an", "the", "of", "square", "photo", "colour")


def make_bundle(out: Path, bias: float = 0.1) -> Bundle:
    """image: per-channel pixel means -> 3 of DIM axes (+ bias) -> L2; text: colour words there."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((3, DIM), np.float32)
    weight[:, :3] = np.eye(3)
    offset = np.zeros(DIM, np.float32)
    offset[3] = bias  # keeps every embedding away from zero
    table = np.zeros((2 + len(COLOURS) + len(FILLER), DIM), np.float32)
    table[:, 3] = bias
    for i, rgb in enumerate(COLOURS.values()):
        table[2 + i, :3] = np.asarray(rgb) / 127.5 - 1  # the pixel values after (x-0.5)/0.5
    image = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[2, 3], keepdims=0),  # (B, 3)
            helper.make_node("MatMul", ["mean", "W"], ["proj"]),
            helper.make_node("Add", ["proj", "b"], ["shifted"]),
            helper.make_node("LpNormalization", ["shifted"], ["embedding"], axis=1, p=2),
        ],
        "image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(offset, "b"),
        ],
    )
    return save_bundle(
        out,
        image,
        text_graph(table),
        ImageSpec(size=SIZE, resize=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
        TextSpec(context_length=16),
        source="synthetic colour towers",
        words=[*COLOURS, *FILLER],
        lowercase=True,
    )


def colour_meta(rgb: tuple[int, int, int]) -> dict:
    """Metadata to filter on: the lit channels (a list), how many (a number), pure or mixed."""
    channels = [c for c, value in zip("rgb", rgb, strict=True) if value]
    return {"channels": channels, "brightness": len(channels), "pure": len(channels) == 1}


def make_gallery(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        path = out / f"{name}.png"
        Image.new("RGB", (32, 24), rgb).save(path)
        rows.append(
            {
                "id": name,
                "image": str(path),
                "captions": [f"a {name} square", name],
                "meta": colour_meta(rgb),
            }
        )
    return rows


def caption_rows(gallery: list[dict]) -> list[dict]:
    """The text side: each caption, with the image it describes and its style as metadata."""
    return [
        {
            "id": f"{row['id']}#{n}",
            "image_id": row["id"],
            "text": caption,
            "meta": {"style": "sentence" if " " in caption else "word"},
        }
        for row in gallery
        for n, caption in enumerate(row["captions"])
    ]


def build_version(
    root: Path, bundle: Bundle, gallery: list[dict], sides=("image", "text"), store=None
) -> str:
    """Embed the gallery with the bundle and publish a version through index_builder (only
    `sides`: an uncaptioned photo folder has no text side) under root, or into `store` (any
    backend's)."""
    texts = caption_rows(gallery)
    shards = {}
    if "image" in sides:
        shards["image"] = [
            ImageEncoder(bundle, threads=1).encode_paths([row["image"] for row in gallery])
        ]
    if "text" in sides:
        shards["text"] = [TextEncoder(bundle, threads=1).encode([row["text"] for row in texts])]
    store = store or open_store(root)
    config = getattr(store, "config", None)  # only Milvus's store has one
    milvus = isinstance(config, BackendConfig) and config.name == "milvus"
    exact = None if milvus else "Flat"  # Milvus: exact below 10k
    return store.publish(
        bundle_id=bundle.bundle_id,
        dim=bundle.embed_dim,
        shards=shards,
        rows={
            "image": gallery if "image" in sides else [],
            "text": texts if "text" in sides else [],
        },
        options=IndexOptions(factory=exact, use_gpu=False, queries=16),
        dataset={"name": "colours", "path": "synthetic", "fingerprint": "test"},
        bundle_path=bundle.path,
    )
