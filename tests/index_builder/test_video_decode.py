"""Video decoding: uniform sampling against exact references, limits, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_videos import bad_videos, colour_clip, grey_clip

from index_builder.preprocess import ImageSpec, preprocess_image
from index_builder.video import (
    VideoError,
    VideoLimits,
    VideoSpec,
    decode_video,
    keyframe_strip,
    probe_video,
    sample_indices,
    save_keyframes,
    video_pixels,
)


def test_sample_indices_are_run_centres():
    assert sample_indices(16, 4) == [2, 6, 10, 14]
    assert sample_indices(12, 12) == list(range(12))
    assert sample_indices(5, 12) == [0, 1, 2, 3, 4]
    for count, frames in ((100, 12), (13, 12), (1000, 7)):
        got = sample_indices(count, frames)
        assert got == [int((i + 0.5) * count / frames) for i in range(frames)]
        assert len(set(got)) == frames and got == sorted(got)


def test_decode_returns_the_sampled_frames():
    clip = decode_video(grey_clip(16), 4)
    assert clip.indices == [2, 6, 10, 14] and clip.count == 16
    assert (clip.width, clip.height, clip.codec) == (32, 32, "h264")
    assert clip.seconds == pytest.approx(2.0)
    levels = [float(np.asarray(frame).mean()) for frame in clip.frames]
    assert levels == pytest.approx([10 * i for i in clip.indices], abs=3)


def test_short_video_gives_all_frames_and_a_mask():
    clip = decode_video(grey_clip(3), 12)
    assert clip.indices == [0, 1, 2]
    spec = ImageSpec(size=8, resize=8)
    pixels, mask = video_pixels(clip.frames, spec, 12)
    assert pixels.shape == (12, 3, 8, 8) and mask.tolist() == [True] * 3 + [False] * 9
    for i, frame in enumerate(clip.frames):
        np.testing.assert_array_equal(pixels[i], preprocess_image(frame, spec))
    assert not pixels[3:].any()


@pytest.mark.parametrize(
    ("name", "kind", "code"),
    [
        ("corrupt", "invalid", "corrupt_video"),
        ("truncated", "invalid", "corrupt_video"),
        ("zero-length", "invalid", "empty_video"),
        ("audio-only", "unsupported", "audio_only"),
        ("image", "unsupported", "not_a_video"),
        ("unknown-codec", "unsupported", "unknown_codec"),
    ],
)
def test_bad_inputs_are_video_errors(tmp_path, name, kind, code):
    data = bad_videos()[name]
    for source in (data, _write(tmp_path / f"{name}.mp4", data)):
        with pytest.raises(VideoError) as caught:
            decode_video(source, 4)
        assert (caught.value.kind, caught.value.code) == (kind, code)
        assert isinstance(caught.value, ValueError)


def test_truncated_after_the_header_is_caught_by_decoding(tmp_path):
    """A file cut after its (front) index passes the header checks; decoding notices."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 32, 3), np.uint8) for _ in range(40)]
    faststart = _faststart(frames, tmp_path / "faststart.mp4")
    cut = faststart[: int(len(faststart) * 0.6)]
    assert probe_video(cut).count == 40  # the header is intact
    with pytest.raises(VideoError) as caught:
        decode_video(cut, 12)
    assert caught.value.code in ("truncated_video", "corrupt_video")


def _faststart(frames: list[np.ndarray], path) -> bytes:
    """The clip as an MP4 with its index (moov) before the data, like a streamed file."""
    import av

    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (VideoLimits(max_bytes=1000), "video_too_large"),
        (VideoLimits(max_pixels=32 * 31), "too_many_pixels"),
        (VideoLimits(max_seconds=1.5), "video_too_long"),
    ],
)
def test_limits_are_checked_before_decoding(limits, code):
    with pytest.raises(VideoError) as caught:
        decode_video(grey_clip(16), 4, limits)
    assert (caught.value.kind, caught.value.code) == ("too_large", code)


def test_decode_stops_at_the_deadline():
    with pytest.raises(VideoError) as caught:
        decode_video(grey_clip(16), 4, VideoLimits(timeout_s=0.0))
    assert (caught.value.kind, caught.value.code) == ("invalid", "decode_timeout")


def test_keyframes_and_strip(tmp_path):
    clip = decode_video(colour_clip([(255, 0, 0), (0, 0, 255)], per=4), 4)
    paths = save_keyframes(clip.frames, tmp_path / "kf")
    assert [p.name for p in paths] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    strip = Image.open(tmp_path / "kf" / "strip.jpg")
    assert strip.size == (4 * 96, 96)
    left, right = np.asarray(strip)[48, 10], np.asarray(strip)[48, -10]
    assert left[0] > 200 > left[2] and right[2] > 200 > right[0]  # red first, then blue
    assert keyframe_strip(clip.frames, 10).size == (40, 10)


def test_video_spec_round_trip_and_checks():
    spec = VideoSpec(frames=8, pooling="seqTransf")
    assert VideoSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="pooling"):
        VideoSpec(pooling="max")
    with pytest.raises(ValueError, match="frames"):
        VideoSpec(frames=0)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
