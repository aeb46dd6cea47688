"""Video defined once: decode with limits, uniform frame sampling, frame pixels, keyframe strips.

A video is N frames (default 12, CLIP4Clip's protocol) sampled uniformly by frame index, each
preprocessed exactly as an image (`preprocess_image` with the bundle's `ImageSpec`), encoded by
the image tower, then pooled over time (`VideoSpec.pooling`). Training, export, indexing and
serving all call `decode_video` and `video_pixels`; a bundle stores the `VideoSpec`.

Decoding is untrusted work: file size, resolution and duration are checked before any frame is
decoded, and decoding stops at a deadline. Every refusal is a `VideoError` (a ValueError) with a
stable `code` and a `kind` (`too_large`, `unsupported`, `invalid`) that the service maps to
413 / 415 / 422 and importers and the indexer count as a skip.
Torch-free: PyAV (FFmpeg inside the wheel), NumPy and Pillow.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.atomic import atomic_open
from index_builder.preprocess import ImageSpec, preprocess_image

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi")
SAMPLINGS = ("uniform",)
POOLINGS = ("meanP", "seqTransf")
# FFmpeg demuxers that read still images: a photo opened as a "video" is refused, not indexed.
IMAGE_DEMUXERS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe")
KEYFRAME_HEIGHT = 96


@dataclass(frozen=True)
class VideoSpec:
    """`frames` sampled by `sampling` (uniform: the centres of `frames` equal runs of the
    video's frame indices; a shorter video gives all of its frames and a mask), each
    preprocessed with the image spec and encoded by the image tower, then pooled over time
    by `pooling` (meanP: masked mean of the unit frame embeddings, re-normalised; seqTransf:
    a small temporal transformer first, see training/video_model.py)."""

    frames: int = 12
    sampling: str = "uniform"
    pooling: str = "meanP"

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"video frames must be at least 1, got {self.frames}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"video sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"video pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> VideoSpec:
        return cls(**obj)


@dataclass(frozen=True)
class VideoLimits:
    """What a decode accepts: checked before decoding (bytes, pixels, duration) and during
    it (the deadline, checked after every frame)."""

    max_bytes: int = 200 << 20
    max_pixels: int = 3840 * 2160
    max_seconds: float = 600.0
    timeout_s: float = 30.0


class VideoError(ValueError):
    """A video that cannot be used; `code` says why, `kind` how a front end should answer."""

    kind = "invalid"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class VideoTooLarge(VideoError):
    kind = "too_large"


class VideoUnsupported(VideoError):
    kind = "unsupported"


@dataclass(frozen=True)
class Clip:
    """The sampled frames of a decoded video (RGB) and what the container said about it."""

    frames: list[Image.Image]
    indices: list[int]
    count: int  # frames in the video
    seconds: float
    width: int
    height: int
    codec: str


def is_video_path(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def sample_indices(count: int, frames: int) -> list[int]:
    """Uniform sampling: the centre of each of `frames` equal runs of `count` frame indices;
    every index when the video is shorter."""
    if count <= frames:
        return list(range(count))
    return [int((i + 0.5) * count / frames) for i in range(frames)]


@dataclass(frozen=True)
class Probe:
    """What the container says about a video that passed the header checks."""

    count: int  # frames
    seconds: float
    width: int
    height: int
    codec: str


def probe_video(source: str | Path | bytes, limits: VideoLimits = VideoLimits()) -> Probe:
    """Every check that needs no decoding (size, image or not, a video stream with a known
    codec, resolution, duration, frame count); importers run this, a `VideoError` if any fails.
    A file truncated after its header passes; `decode_video` finds it."""
    import av

    data = _read_bounded(source, limits.max_bytes)
    _refuse_images(data)
    try:
        return _probe(av, data, limits, time.monotonic() + limits.timeout_s)
    except av.error.FFmpegError as exc:
        raise VideoError(f"corrupt or truncated video: {_reason(exc)}", "corrupt_video") from None


def decode_video(
    source: str | Path | bytes, frames: int, limits: VideoLimits = VideoLimits()
) -> Clip:
    """Decode the uniformly sampled frames of a video file or bytes after `probe_video`'s
    checks, within `limits.timeout_s`; any problem is a `VideoError`."""
    import av

    data = _read_bounded(source, limits.max_bytes)
    _refuse_images(data)
    deadline = time.monotonic() + limits.timeout_s
    try:
        probe = _probe(av, data, limits, deadline)
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            wanted = sample_indices(probe.count, frames)
            images = _decode_frames(container, stream, wanted, deadline, limits.max_pixels)
    except av.error.FFmpegError as exc:
        raise VideoError(f"corrupt or truncated video: {_reason(exc)}", "corrupt_video") from None
    return Clip(images, wanted, probe.count, probe.seconds, probe.width, probe.height, probe.codec)


def _probe(av: Any, data: bytes, limits: VideoLimits, deadline: float) -> Probe:
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        stream = _video_stream(container)
        seconds = _check_header(container, stream, limits)
        count = _frame_count(container, stream, deadline)
        context = stream.codec_context
        if not seconds:
            seconds = count / float(stream.average_rate or 25)
        return Probe(count, seconds, int(context.width), int(context.height), str(context.name))


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _read_bounded(source: str | Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, bytes):
        size, data = len(source), source
    else:
        size = Path(source).stat().st_size  # FileNotFoundError for a missing file
        data = b""
    if size == 0:
        raise VideoError("zero-length video: the file is empty", "empty_video")
    if size > max_bytes:
        raise VideoTooLarge(
            f"video of {size} bytes is over the limit of {max_bytes} bytes", "video_too_large"
        )
    return data or Path(source).read_bytes()  # type: ignore[arg-type]


def _refuse_images(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return
    raise VideoUnsupported(f"an image ({fmt}) was sent where a video was expected", "not_a_video")


def _video_stream(container: Any) -> Any:
    if container.format.name.split(",")[0] in IMAGE_DEMUXERS:
        raise VideoUnsupported("an image was sent where a video was expected", "not_a_video")
    if not container.streams.video:
        if container.streams.audio:
            raise VideoUnsupported("audio only: the file has no video stream", "audio_only")
        raise VideoUnsupported("the file has no video stream", "no_video_stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None or context.name in ("", "none") or not _has_decoder(context.name):
        tag = getattr(stream, "codec_tag", "") or "?"
        raise VideoUnsupported(f"unknown video codec (tag {tag!r})", "unknown_codec")
    return stream


def _has_decoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "r")
    except Exception:  # PyAV raises UnknownCodecError or ValueError by version
        return False
    return True


def _check_header(container: Any, stream: Any, limits: VideoLimits) -> float:
    """Resolution and duration from the container, before any frame is decoded."""
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width * height > limits.max_pixels:
        raise VideoTooLarge(
            f"{width}x{height} video is over the limit of {limits.max_pixels} pixels per frame",
            "too_many_pixels",
        )
    seconds = 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    if seconds > limits.max_seconds:
        raise VideoTooLarge(
            f"video of {seconds:.1f} s is over the limit of {limits.max_seconds:g} s",
            "video_too_long",
        )
    return seconds


def _frame_count(container: Any, stream: Any, deadline: float) -> int:
    """Frames the container declares, else counted by demuxing (no decoding)."""
    if stream.frames:
        return int(stream.frames)
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
        if time.monotonic() > deadline:
            raise VideoError("video decode took longer than the time limit", "decode_timeout")
    if count == 0:
        raise VideoError("the video has no frames", "empty_video")
    return count


def _decode_frames(
    container: Any, stream: Any, wanted: list[int], deadline: float, max_pixels: int
) -> list:
    if not wanted:
        raise VideoError("the video has no frames", "empty_video")
    targets, last = set(wanted), wanted[-1]
    images = []
    for index, frame in enumerate(container.decode(stream)):
        # Every frame: a stream may switch resolution after a small first header.
        if frame.width * frame.height > max_pixels:
            raise VideoTooLarge(
                f"frame {index} is {frame.width}x{frame.height}, over the limit of "
                f"{max_pixels} pixels per frame",
                "too_many_pixels",
            )
        if index in targets:
            images.append(frame.to_image())
        if time.monotonic() > deadline:
            raise VideoError("video decode took longer than the time limit", "decode_timeout")
        if index >= last:
            break
    if not images:
        raise VideoError("the video has no decodable frames", "empty_video")
    if len(images) < len(wanted):
        raise VideoError(
            f"truncated video: {len(images)} of the {len(wanted)} sampled frames decode",
            "truncated_video",
        )
    return images


def video_pixels(
    frames: Sequence[Image.Image], spec: ImageSpec, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled frames -> pixels (count, 3, S, S) float32 (zeros past the last frame) and the
    frame mask (count,) bool, each frame preprocessed as an image."""
    if len(frames) > count:
        raise ValueError(f"{len(frames)} frames for a video spec of {count}")
    pixels = np.zeros((count, 3, spec.size, spec.size), np.float32)
    for i, frame in enumerate(frames):
        pixels[i] = preprocess_image(frame.convert("RGB"), spec)
    mask = np.arange(count) < len(frames)
    return pixels, mask


def keyframe_strip(frames: Sequence[Image.Image], height: int = KEYFRAME_HEIGHT) -> Image.Image:
    """The frames scaled to `height` side by side, in time order."""
    scaled = [_fit_height(frame, height) for frame in frames]
    strip = Image.new("RGB", (sum(f.width for f in scaled), height), (255, 255, 255))
    left = 0
    for frame in scaled:
        strip.paste(frame, (left, 0))
        left += frame.width
    return strip


def _fit_height(frame: Image.Image, height: int) -> Image.Image:
    width = max(1, round(frame.width * height / frame.height))
    return frame.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def save_keyframes(frames: Sequence[Image.Image], directory: Path) -> list[Path]:
    """`strip.jpg` and one `<i>.jpg` per sampled frame, each written atomically; returns the
    per-frame files (the strip is `directory / "strip.jpg"`)."""
    paths = []
    for i, frame in enumerate(frames):
        paths.append(_save_jpeg(_fit_height(frame, KEYFRAME_HEIGHT * 2), directory / f"{i}.jpg"))
    _save_jpeg(keyframe_strip(frames), directory / "strip.jpg")
    return paths


def _save_jpeg(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def encode_video(
    frames: Sequence[np.ndarray], fps: int = 8, codec: str = "libx264", container: str = "mp4"
) -> bytes:
    """RGB uint8 frames (H, W, 3) -> the bytes of a video (H.264 in MP4 by default; even H, W)."""
    import av

    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream: Any = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()
