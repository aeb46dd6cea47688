"""Every endpoint's happy path next to its failure siblings (bad input is a 4xx JSON, never 5xx)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder.encoders import ImageEncoder, TextEncoder

T2I = "/search/text-to-image"
I2T = "/search/image-to-text"
I2I = "/search/image-to-image"
T2T = "/search/text-to-text"


def png(rgb=(255, 0, 0), size=(20, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def with_ihdr_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (a decompression bomb's signature)."""
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return (
        data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    )


def b64(data: bytes, prefix: str = "") -> str:
    return prefix + base64.b64encode(data).decode()


def assert_error(response, status: int, code: str | None = None, words: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}
    if code:
        assert body["code"] == code
    assert words.lower() in body["detail"].lower()
    assert "Traceback" not in response.text


def reference(assets, text=None, image=None):
    """Exact cosine ranking computed here with the encoders (what the service must return)."""
    bundle = assets["bundle"]
    if text is not None:
        query = TextEncoder(bundle).encode([text])[0]
        gallery = ImageEncoder(bundle).encode_paths([row["image"] for row in assets["gallery"]])
        ids = [row["id"] for row in assets["gallery"]]
    else:
        query = ImageEncoder(bundle).encode_images([Image.open(io.BytesIO(image)).convert("RGB")])[
            0
        ]
        texts = [
            (f"{r['id']}#{n}", c) for r in assets["gallery"] for n, c in enumerate(r["captions"])
        ]
        gallery = TextEncoder(bundle).encode([t for _, t in texts])
        ids = [i for i, _ in texts]
    scores = gallery @ query
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


# -- text to image ---------------------------------------------------------------------------


def test_text_to_image_ranks_like_exact_cosine(client, assets):
    response = client.post(T2I, json={"text": "a red square", "k": 8})
    assert response.status_code == 200
    body = response.json()
    ids, scores = reference(assets, text="a red square")
    assert [h["id"] for h in body["hits"]][0] == ids[0] == "red"
    np.testing.assert_allclose([h["score"] for h in body["hits"]], scores, atol=1e-5)
    assert [h["rank"] for h in body["hits"]] == list(range(1, 9))
    hit = body["hits"][0]
    assert hit["captions"] == ["a red square", "red"]
    assert hit["meta"] == {"channels": ["r"], "brightness": 1, "pure": True}
    assert hit["url"] == "/images/red" and hit["thumbnail_url"].startswith("/images/red?size=")
    assert set(hit) == {"id", "score", "rank", "captions", "meta", "url", "thumbnail_url"}
    assert str(assets["base"]) not in response.text  # no server path reaches a client
    assert body["results"][0]["query"] == "a red square"
    assert body["bundle_id"] == assets["bundle"].bundle_id
    assert body["index_version"].startswith("v000001-")
    assert body["took_ms"] > 0 and body["k"] == 8 and body["offset"] == 0


def test_text_batch_and_paging(client):
    body = client.post(T2I, json={"texts": ["blue", "the yellow photo"], "k": 1}).json()
    assert [r["query"] for r in body["results"]] == ["blue", "the yellow photo"]
    assert [r["hits"][0]["id"] for r in body["results"]] == ["blue", "yellow"]
    assert body["hits"] == body["results"][0]["hits"]
    full = client.post(T2I, json={"text": "cyan", "k": 6}).json()["hits"]
    page = client.post(T2I, json={"text": "cyan", "k": 2, "offset": 3}).json()["hits"]
    assert page == [dict(h) for h in full[3:5]]
    assert [h["rank"] for h in page] == [4, 5]
    default = client.post(T2I, json={"text": "cyan"}).json()
    assert default["k"] == 10 and len(default["hits"]) == 8  # the gallery has 8 images


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"text": ""}, "empty_text", "empty"),
        ({"text": "   "}, "empty_text", "empty"),
        ({"texts": ["red", ""]}, "empty_text", "texts[1]"),
        ({"text": "red " * 300}, "text_too_long", "limit"),
        ({"text": "red", "k": 0}, "invalid_input", "k"),
        ({"text": "red", "k": 101}, "k_out_of_range", "max_k"),
        ({"text": "red", "offset": -1}, "invalid_input", "offset"),
        ({"text": "red", "offset": 1001}, "offset_out_of_range", "max_offset"),
        ({"text": "red", "texts": ["blue"]}, "invalid_input", "exactly one"),
        ({}, "invalid_input", "exactly one"),
        ({"text": "red", "image": b64(png())}, "invalid_input", "not both"),
        ({"texts": ["red"] * 17}, "batch_too_large", "limit of 16"),
        ({"texts": []}, "invalid_input", "empty"),
        ({"text": "red", "colour": 1}, "invalid_input", "colour"),
        ({"text": 7}, "invalid_input", "text"),
    ],
)
def test_text_to_image_bad_input(client, body, code, words):
    assert_error(client.post(T2I, json=body), 422, code, words)


def test_text_to_image_wrong_content_type_and_malformed_json(client):
    response = client.post(T2I, content=b"text=red", headers={"Content-Type": "text/plain"})
    assert_error(response, 415, "wrong_content_type", "application/json")
    response = client.post(
        T2I, content=b'{"text": "red"', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "malformed_json", "not valid JSON")
    lone_surrogate = b'{"text": "red \\ud800"}'  # valid JSON, not encodable text
    response = client.post(
        T2I, content=lone_surrogate, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_input", "unicode")


# -- image to text ---------------------------------------------------------------------------


def test_image_to_text_multipart_ranks_like_exact_cosine(client, assets):
    data = png((0, 0, 255))
    response = client.post(I2T, files={"image": ("blue.png", data, "image/png")}, data={"k": "16"})
    assert response.status_code == 200, response.text
    body = response.json()
    ids, scores = reference(assets, image=data)
    assert {h["id"] for h in body["hits"][:2]} == set(ids[:2]) == {"blue#0", "blue#1"}
    np.testing.assert_allclose([h["score"] for h in body["hits"]], scores, atol=1e-5)
    hit = body["hits"][0]
    assert hit["image_id"] == "blue" and hit["text"] in ("blue", "a blue square")
    assert hit["url"] == "/images/blue" and "image_path" not in hit
    assert hit["meta"]["style"] in ("word", "sentence")
    assert body["results"][0]["query"] == "blue.png"


def test_image_to_text_batch_multipart_and_base64(client):
    files = [
        ("image", ("a.png", png((255, 255, 0)), "image/png")),
        ("image", ("b.jpg", _jpeg((0, 0, 0)), "image/jpeg")),
    ]
    body = client.post(I2T, files=files, data={"k": "1"}).json()
    assert [r["hits"][0]["image_id"] for r in body["results"]] == ["yellow", "black"]
    json_body = {
        "images": [b64(png((0, 255, 0))), b64(png((255, 0, 255)), "data:image/png;base64,")]
    }
    body = client.post(I2T, json={**json_body, "k": 2, "offset": 1}).json()
    assert [r["query"] for r in body["results"]] == ["images[0]", "images[1]"]
    assert [r["hits"][0]["image_id"] for r in body["results"]] == ["green", "magenta"]
    assert [h["rank"] for h in body["hits"]] == [2, 3]
    single = client.post(I2T, json={"image": b64(png((255, 255, 255)))}).json()
    assert single["hits"][0]["image_id"] == "white"


def _jpeg(rgb) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(out, format="JPEG")
    return out.getvalue()


def _upload(client, data: bytes, name="x.png", kind="image/png", **form):
    return client.post(I2T, files={"image": (name, data, kind)}, data=form)


def test_image_to_text_bad_uploads(client):
    assert_error(
        _upload(client, b"hello, not an image", "a.txt", "text/plain"), 415, "not_an_image"
    )
    assert_error(_upload(client, png()[:60]), 400, "bad_content", "truncated or corrupt")
    data = png()
    start = data.index(b"IDAT") + 4
    corrupt = data[:start] + bytes(len(data) - start - 16) + data[-16:]  # zeroed pixel stream
    assert_error(_upload(client, corrupt), 400, "bad_content")
    assert_error(_upload(client, b""), 422, "invalid_input", "empty")
    assert_error(_upload(client, png(), k="0"), 422, "k_out_of_range")
    assert_error(_upload(client, png(), k="ten"), 422, "invalid_input", "integer")
    assert_error(_upload(client, png(), text="red"), 422, "text_and_image", "not both")
    assert_error(_upload(client, png(), colour="red"), 422, "invalid_input", "colour")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert_error(_upload(client, eps, "x.eps", "application/postscript"), 415, "not_an_image")
    many = [("image", (f"{i}.png", png(), "image/png")) for i in range(17)]
    assert_error(client.post(I2T, files=many), 422, "batch_too_large")
    response = client.post(I2T, data={"k": "3"})  # a form without any image
    assert response.status_code in (415, 422)


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"image": "not base64!!"}, 400, "bad_content", "malformed base64"),
        ({"image": "data:image/png;base64,@@@"}, 400, "bad_content", "malformed base64"),
        (
            {"image": "data:text/plain;base64," + b64(b"hi")},
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        ({"image": "data:image/png," + "abc"}, 400, "bad_content", "base64"),
        ({"image": b64(b"plain text bytes")}, 415, "not_an_image", "not an image"),
        ({"image": b64(png()), "text": "red"}, 422, "invalid_input", "not both"),
        ({"images": [b64(png())] * 17}, 422, "batch_too_large", "limit"),
        ({"image": b64(png()), "images": [b64(png())]}, 422, "invalid_input", "exactly one"),
        ({"image": b64(png()), "k": 1000}, 422, "k_out_of_range", "max_k"),
    ],
)
def test_image_to_text_bad_json(client, body, status, code, words):
    assert_error(client.post(I2T, json=body), status, code, words)


def test_image_to_text_wrong_content_type_and_malformed_json(client):
    response = client.post(I2T, content=png(), headers={"Content-Type": "image/png"})
    assert_error(response, 415, "wrong_content_type", "multipart/form-data")
    response = client.post(I2T, content=b"{", headers={"Content-Type": "application/json"})
    assert_error(response, 400, "malformed_json")


def test_image_limits_are_checked_before_decoding(settings_for, open_client):
    settings = settings_for(max_image_bytes=4096, max_image_pixels=10_000, max_batch=2)
    with open_client(settings) as small:
        big = png(size=(50, 50)) + bytes(5000)
        assert_error(_upload(small, big), 413, "too_large", "4096 bytes")
        assert_error(small.post(I2T, json={"image": b64(big)}), 413, "too_large")
        assert_error(_upload(small, png(size=(101, 100))), 413, "too_many_pixels", "101x100")
        bomb = with_ihdr_size(png(), 100_000, 100_000)  # 10^10 pixels claimed by 70 bytes
        assert_error(_upload(small, bomb), 413, "too_many_pixels", "too many pixels")
        modest_bomb = with_ihdr_size(png(), 5000, 5000)  # under Pillow's own guard
        assert_error(_upload(small, modest_bomb), 413, "too_many_pixels", "5000x5000")
        huge = b"x" * (2 * 4096 * 4 // 3 + (1 << 16) + 1)
        response = small.post(I2T, content=huge, headers={"Content-Type": "application/json"})
        assert_error(response, 413, "too_large", "request body")
        assert _upload(small, png(size=(100, 100))).status_code == 200


# -- gallery images, status, metrics -----------------------------------------------------------


def test_gallery_images_and_thumbnails(client, assets):
    response = client.get("/images/red")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == Path(assets["gallery"][0]["image"]).read_bytes()
    thumb = client.get("/images/red", params={"size": 16})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 16
    assert_error(client.get("/images/red", params={"size": 5000}), 422, "invalid_input", "size")
    assert_error(client.get("/images/purple"), 404, "not_found", "purple")
    for probe in ("../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd"):
        response = client.get(f"/images/{probe}")
        assert response.status_code == 404 and "root:" not in response.text


def test_health_ready_info_metrics(client, assets):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    info = client.get("/info").json()
    assert ready == {
        "status": "ready",
        "index_version": info["index"]["version"],
        "bundle_id": assets["bundle"].bundle_id,
    }
    assert info["ready"] and info["gallery"] == {"images": 8, "texts": 16}
    assert info["index"]["sides"]["image"]["fields"] == {
        "brightness": "number",
        "channels": "list",
        "pure": "bool",
    }
    assert info["bundle"]["bundle_id"] == assets["bundle"].bundle_id
    assert info["index"]["sides"]["image"]["factory"] == "Flat"
    assert info["limits"]["max_k"] == 100
    client.post(T2I, json={"text": "red"})
    client.post(I2T, files={"image": ("r.png", png(), "image/png")})
    text = client.get("/metrics").text
    for stage, modality in (
        ("decode", "image"),
        ("encode", "text"),
        ("search", "text"),
        ("encode", "image"),
        ("search", "image"),
    ):
        assert f'cots_stage_seconds_count{{modality="{modality}",stage="{stage}"}}' in text
    assert (
        'cots_requests_total{endpoint="/search/text-to-image",method="POST",status="200"}' in text
    )
    assert 'cots_request_seconds_bucket{endpoint="/search/image-to-text"' in text
    assert "cots_ready 1.0" in text


def test_openapi_documents_scores_and_examples(client):
    schema = client.get("/openapi.json").json()
    hit = schema["components"]["schemas"]["ImageHit"]["properties"]["score"]
    assert "cosine similarity" in hit["description"]
    body = schema["paths"][I2T]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert schema["components"]["schemas"]["ImageSearchResponse"]["examples"]
    for path in (I2I, T2T, "/admin/items", "/admin/delete"):
        assert path in schema["paths"]
    form = schema["paths"][I2I]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "filter" in form["schema"]["properties"]
    assert client.get("/").headers["content-type"].startswith("text/html")


# -- keys and CORS ---------------------------------------------------------------------------


def test_api_and_admin_keys(settings_for, open_client):
    with open_client(settings_for(api_key="s3cret", admin_key="adm1n"), ready=False) as keyed:
        assert keyed.get("/health").status_code == 200
        assert_error(keyed.post(T2I, json={"text": "red"}), 401, "unauthorized", "API key")
        assert_error(
            keyed.get("/info", headers={"X-API-Key": "nope"}), 401, "unauthorized", "invalid"
        )
        assert_error(keyed.get("/images/red"), 401)
        assert keyed.get("/info", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert_error(keyed.post("/admin/reload", headers={"X-API-Key": "s3cret"}), 401)
        response = keyed.post("/admin/reload", headers={"X-API-Key": "adm1n"})
        assert response.status_code in (200, 503)


def test_admin_disabled_without_key_and_cors(client, settings_for, open_client):
    assert_error(client.post("/admin/reload"), 403, "forbidden", "COTS_ADMIN_KEY")
    with open_client(settings_for(cors_origins="https://gallery.example"), ready=False) as cors:
        preflight = cors.options(
            T2I,
            headers={
                "Origin": "https://gallery.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-api-key",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://gallery.example"
        other = cors.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
