"""Video search over HTTP: text-to-video and video-to-text, keyframes, and every bad clip as a
4xx JSON body (413 / 415 / 422)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_videos import bad_videos, colour_clip

from index_builder.video import encode_video


def _upload(client, data: bytes, name: str = "clip.mp4", **fields):
    form = {key: str(value) for key, value in fields.items()}
    return client.post(
        "/search/video-to-text", files={"video": (name, data, "video/mp4")}, data=form
    )


def test_text_to_video(video_client):
    response = video_client.post("/search/text-to-video", json={"text": "red", "k": 10})
    assert response.status_code == 200
    body = response.json()
    hits = body["hits"]
    assert hits[0]["id"] == "red" and hits[0]["score"] > 0.99
    assert {hit["id"] for hit in hits} == {"red", "blue", "green", "redblue"}  # no photo
    top = hits[0]
    assert top["meta"]["media"] == "video" and top["captions"] == ["a red clip"]
    assert top["video_url"] == "/videos/red" and top["url"] == "/images/red"
    assert top["keyframe_urls"] == [f"/videos/red/keyframes/{i}" for i in range(4)]
    frame = video_client.get(top["keyframe_urls"][2])
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert video_client.get(top["video_url"]).headers["content-type"] == "video/mp4"
    assert video_client.get(top["thumbnail_url"]).status_code == 200
    purple = video_client.post("/search/text-to-video", json={"texts": ["blue", "green"], "k": 1})
    assert [r["hits"][0]["id"] for r in purple.json()["results"]] == ["blue", "green"]


def test_text_to_video_failures(video_client, client):
    bad = video_client.post("/search/text-to-video", json={"text": "red", "filter": {"x": 1}})
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_filter")
    empty = video_client.post("/search/text-to-video", json={"text": "  "})
    assert (empty.status_code, empty.json()["code"]) == (422, "empty_text")
    form = video_client.post("/search/text-to-video", data={"text": "red"})
    assert form.status_code == 415
    none = client.post("/search/text-to-video", json={"text": "red"})  # an image index
    assert (none.status_code, none.json()["code"]) == (404, "side_absent")
    assert client.get("/info/video").json()["videos"] == 0
    missing = video_client.get("/videos/photo")  # an image, not a video
    assert missing.status_code == 404
    assert video_client.get("/videos/red/keyframes/9").status_code == 404


def test_video_to_text(video_client, video_assets):
    clip = (video_assets["clips"] / "blue.mp4").read_bytes()
    response = _upload(video_client, clip, k=2)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["hits"][0]["text"] == "blue" and body["results"][0]["query"] == "clip.mp4"
    assert len(body["hits"]) == 2 and body["k"] == 2
    green = _upload(video_client, colour_clip([(0, 255, 0)], size=48, per=6), k=1)
    assert green.json()["hits"][0]["text"] == "green"
    info = video_client.get("/info/video").json()
    assert info["videos"] == 4 and info["video_spec"]["frames"] == 4


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("corrupt", 422, "corrupt_video"),
        ("truncated", 422, "corrupt_video"),
        ("zero-length", 422, "empty_video"),
        ("audio-only", 415, "audio_only"),
        ("image", 415, "not_a_video"),
        ("unknown-codec", 415, "unknown_codec"),
    ],
)
def test_bad_clips(video_client, name, status, code):
    response = _upload(video_client, bad_videos()[name])
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert set(response.json()) == {"detail", "code"}


@pytest.mark.parametrize(
    ("limits", "status", "code"),
    [
        ({"max_video_bytes": 2048}, 413, "video_too_large"),
        ({"max_video_pixels": 64 * 47}, 413, "too_many_pixels"),
        ({"max_video_seconds": 1.0}, 413, "video_too_long"),
        ({"video_timeout_s": 1e-9}, 422, "decode_timeout"),
    ],
)
def test_clip_limits(video_client, limits, status, code):
    frames = np.random.default_rng(0).integers(0, 255, (16, 48, 64, 3), np.uint8)
    clip = encode_video(list(frames))  # 2 s, 64 x 48, noisy: over 2 kB
    state = video_client.app.state
    served = state.settings
    state.settings = served.model_copy(update=limits)
    try:
        response = _upload(video_client, clip)
    finally:
        state.settings = served
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert _upload(video_client, clip).status_code == 200


def test_bad_requests(video_client):
    wrong = video_client.post("/search/video-to-text", json={"video": "AAAA"})
    assert (wrong.status_code, wrong.json()["code"]) == (415, "wrong_content_type")
    nofile = video_client.post("/search/video-to-text", data={"k": "3"}, files={"x": ("a", b"1")})
    assert nofile.status_code == 422
    clip = colour_clip([(255, 0, 0)])
    assert _upload(video_client, clip, k=0).json()["code"] == "k_out_of_range"
    bad_filter = _upload(video_client, clip, filter='{"nope": 1}')
    assert (bad_filter.status_code, bad_filter.json()["code"]) == (422, "invalid_filter")
