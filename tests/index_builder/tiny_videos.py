"""Tiny video fixtures without torch: colour clips (PyAV), bad video files, and a video bundle
whose pooling graph is meanP in plain ONNX ops over any image tower graph."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from index_builder.bundle import Bundle, write_bundle
from index_builder.video import VideoSpec, encode_video


def colour_clip(colours: list[tuple[int, int, int]], size: int = 32, per: int = 4) -> bytes:
    """An H.264 MP4 showing each colour for `per` frames, in order."""
    frames = [np.full((size, size, 3), rgb, np.uint8) for rgb in colours for _ in range(per)]
    return encode_video(frames, fps=8)


def grey_clip(count: int, size: int = 32) -> bytes:
    """Frame i is uniform grey level 10 * i (to check which frames a decode samples)."""
    return encode_video([np.full((size, size, 3), 10 * i, np.uint8) for i in range(count)])


def audio_only() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for _ in range(8):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def unknown_codec() -> bytes:
    """An AVI whose video stream names a codec FFmpeg does not know (its FourCC replaced)."""
    frames = [np.full((32, 32, 3), 80, np.uint8)] * 4
    data = encode_video(frames, codec="mpeg4", container="avi")
    assert b"FMP4" in data
    return data.replace(b"FMP4", b"ZZZZ")


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_videos() -> dict[str, bytes]:
    """One file per bad input the issue names (limits: see `LIMIT_CASES` for the others)."""
    good = colour_clip([(255, 0, 0), (0, 0, 255)])
    return {
        "corrupt": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,
        "truncated": good[: len(good) // 2],
        "zero-length": b"",
        "audio-only": audio_only(),
        "image": png_bytes(),
        "unknown-codec": unknown_codec(),
    }


def over_default_limits() -> dict[str, bytes]:
    """Videos the default `VideoLimits` refuse: 4096 x 2160 pixels, 610 s (tiny files)."""
    return {
        "huge-resolution": encode_video([np.zeros((2160, 4096, 3), np.uint8)], fps=1),
        "too-long": encode_video([np.zeros((16, 16, 3), np.uint8)] * 610, fps=1),
    }


def pooling_graph(dim: int, frames: int):
    """meanP as ONNX: masked sum of the unit frame embeddings, L2-normalised."""
    from onnx import TensorProto, helper, numpy_helper

    return helper.make_graph(
        [
            helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
            helper.make_node("Mul", ["frames", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
            helper.make_node("LpNormalization", ["pooled"], ["embedding"], axis=1, p=2),
        ],
        "video",
        [
            helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["B", frames, dim]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", frames]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])],
        [
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )


def video_bundle(out: Path, image_bundle: Bundle, frames: int = 4) -> Bundle:
    """`image_bundle`'s towers and tokenizer plus a meanP pooling graph: a video bundle."""
    import onnx
    from onnx import helper

    model = helper.make_model(
        pooling_graph(image_bundle.embed_dim, frames), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.parent / f".{out.name}-pooling.onnx"
    onnx.save(model, source)
    return write_bundle(
        out,
        image_onnx=image_bundle.image_onnx,
        text_onnx=image_bundle.text_onnx,
        tokenizer_json=image_bundle.tokenizer_json,
        embed_dim=image_bundle.embed_dim,
        image_spec=image_bundle.image_spec,
        text_spec=image_bundle.text_spec,
        opset=17,
        extra={"source": {"checkpoint": "tiny video bundle"}},
        video=(source, VideoSpec(frames=frames)),
    )
