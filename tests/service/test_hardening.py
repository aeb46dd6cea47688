"""What an outside attack on the running service found (issue 17), kept closed: a bad-input
table for both search endpoints, thin images, deep nesting, path traversal through
/admin/reload, what /ready tells a client, 405s, the OpenAPI error documents, the key checked
before the body is read and a stalled body timed out."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from index_builder.backends.faiss.store import IndexStore
from index_builder.preprocess import sha256_file

T2I = "/search/text-to-image"
I2T = "/search/image-to-text"
JSON = {"Content-Type": "application/json"}
DEEP = b"[" * 100_000 + b"]" * 100_000


def png(size=(20, 20), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


THIN = png((1, 20000), "L")  # about 100 bytes; scaling its short side up once cost 2.8 GB
WIDE = png((20000, 1), "L")


def upload(data: bytes, name: str = "x.png") -> tuple:
    return ("image", (name, data, "image/png"))


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"detail", "code"} and body["detail"], body
    assert body["code"] == code, body
    assert "Traceback" not in response.text


# (endpoint, request keyword arguments, status, code)
BAD_INPUT = {
    "t2i deep array": (T2I, {"content": DEEP, "headers": JSON}, 400, "malformed_json"),
    "t2i deep text": (
        T2I,
        {"content": b'{"text": ' + DEEP + b"}", "headers": JSON},
        400,
        "malformed_json",
    ),
    "t2i not utf-8": (
        T2I,
        {"content": b'{"text": "\xff\xfe"}', "headers": JSON},
        400,
        "malformed_json",
    ),
    "t2i truncated": (T2I, {"content": b'{"text": "red"', "headers": JSON}, 400, "malformed_json"),
    "t2i empty body": (T2I, {"content": b"", "headers": JSON}, 400, "malformed_json"),
    "t2i 5000-digit k": (
        T2I,
        {"content": b'{"text": "red", "k": ' + b"9" * 5000 + b"}", "headers": JSON},
        400,
        "malformed_json",
    ),
    "t2i infinite k": (
        T2I,
        {"content": b'{"text": "red", "k": 1e400}', "headers": JSON},
        422,
        "invalid_input",
    ),
    "t2i array body": (T2I, {"json": ["red"]}, 422, "invalid_input"),
    "i2t deep array": (I2T, {"content": DEEP, "headers": JSON}, 400, "malformed_json"),
    "i2t deep images": (
        I2T,
        {"content": b'{"images": ' + DEEP + b"}", "headers": JSON},
        400,
        "malformed_json",
    ),
    "i2t not utf-8": (
        I2T,
        {"content": b'{"image": "\xff"}', "headers": JSON},
        400,
        "malformed_json",
    ),
    "i2t empty body": (I2T, {"content": b"", "headers": JSON}, 400, "malformed_json"),
    **{
        f"i2t multipart {field}={value[:12]!r}": (
            I2T,
            {"files": [upload(png())], "data": {field: value}},
            422,
            "invalid_input",
        )
        for field in ("k", "offset")
        for value in ("--5", "²", "9" * 5000, "٣", "1e3", "0x10", "-", "5-", "+-5", "")
    },
    "i2t multipart k=-5": (
        I2T,
        {"files": [upload(png())], "data": {"k": "-5"}},
        422,
        "k_out_of_range",
    ),
    "i2t thin upload": (I2T, {"files": [upload(THIN)]}, 422, "extreme_aspect_ratio"),
    "i2t wide upload": (I2T, {"files": [upload(WIDE)]}, 422, "extreme_aspect_ratio"),
    "i2t four thin uploads": (
        I2T,
        {"files": [upload(THIN, f"{i}.png") for i in range(4)]},
        422,
        "extreme_aspect_ratio",
    ),
    "i2t thin base64": (
        I2T,
        {"json": {"image": base64.b64encode(THIN).decode()}},
        422,
        "extreme_aspect_ratio",
    ),
    "i2t 21:1": (I2T, {"files": [upload(png((21, 1)))]}, 422, "extreme_aspect_ratio"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_a_4xx_json_error(client, case):
    endpoint, kwargs, status, code = BAD_INPUT[case]
    assert_error(client.post(endpoint, **kwargs), status, code)


def test_the_aspect_ratio_limit_is_inclusive_and_a_setting(client, settings_for, open_client):
    assert client.post(I2T, files=[upload(png((20, 1)))]).status_code == 200
    assert client.post(I2T, files=[upload(png((1, 20)))]).status_code == 200
    with open_client(settings_for(max_aspect_ratio=2)) as strict:
        assert strict.post(I2T, files=[upload(png((20, 10)))]).status_code == 200
        response = strict.post(I2T, files=[upload(png((21, 10)))])
        assert_error(response, 422, "extreme_aspect_ratio")
        assert "21x10" in response.json()["detail"]
        assert strict.get("/info").json()["limits"]["max_aspect_ratio"] == 2


def test_an_over_limit_chunked_body_is_413_on_both_endpoints(settings_for, open_client):
    settings = settings_for(max_image_bytes=1024, max_batch=1)  # a body limit of about 67 kB

    def chunks():
        for _ in range(200):
            yield b" " * 1024

    with open_client(settings) as small:
        for endpoint in (T2I, I2T):
            assert_error(small.post(endpoint, content=chunks(), headers=JSON), 413, "too_large")


def test_405_names_the_allowed_methods(client):
    for path, allowed in (
        (T2I, "POST"),
        (I2T, "POST"),
        ("/info", "GET"),
        ("/admin/reload", "POST"),
    ):
        response = client.put(path)
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed


def test_openapi_documents_every_error_status(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in ((T2I, "post"), (I2T, "post"), ("/info", "get"), ("/metrics", "get")):
        assert "401" in paths[path][method]["responses"], path
    for path in (T2I, I2T):
        assert {"400", "408", "413", "415", "422", "503"} <= set(paths[path]["post"]["responses"])
    assert {"401", "404", "422", "503"} <= set(paths["/images/{image_id}"]["get"]["responses"])
    assert "503" in paths["/ready"]["get"]["responses"]
    reload = paths["/admin/reload"]["post"]["responses"]
    assert {"401", "403", "404", "409", "422", "503"} <= set(reload)
    assert "application/json" in paths[T2I]["post"]["requestBody"]["content"]


# -- /ready and /admin/reload tell a client a code and a short reason; never a path -----------


def _no_leak(response, *secrets: str) -> None:
    text = response.text
    for secret in secrets:
        assert secret not in text, text
    assert "faiss" not in text.lower() and "Error in" not in text, text


def _wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def test_ready_gives_a_code_and_a_short_reason_and_logs_the_details(
    root, settings_for, open_client, caplog
):
    version = IndexStore(root).current()
    faiss_file = root / "versions" / version / "text.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated
    with open_client(settings_for(index=root, watch_interval_s=0), ready=False) as client:
        _wait_for(lambda: client.get("/ready").json().get("code") == "load_failed")
        ready = client.get("/ready")
        assert_error(ready, 503, "load_failed")
        _no_leak(ready, str(root), str(faiss_file))
        search = client.post(T2I, json={"text": "red"})
        assert_error(search, 503, "load_failed")
        _no_leak(search, str(root))
    assert "not a readable FAISS index" in caplog.text  # the details stay in the server log


TRAVERSAL = [
    "../../other/versions/{v}",
    "../other/versions/{v}",
    "{other}/versions/{v}",
    "/etc/passwd",
    "{v}/../../../other/versions/{v}",
    "versions/{v}",
    "./{v}",
    "{v}/",
    "{v}\n",
    "{v}\x00",
    "..",
    ".",
    "",
    "..%2F..%2Fother%2Fversions%2F{v}",
    "..\\..\\other\\versions\\{v}",
    "v\u0660\u0660\u0660\u0660\u0660\u0661-20250101T000000Z",  # Arabic-Indic digits
    "x" * 5000,
    "{v}" + "x" * 5000,
]


def test_admin_reload_accepts_only_version_names_under_the_root(
    root, tmp_path, settings_for, open_client, build
):
    other = tmp_path / "other"  # a second index root beside this one, with a valid version
    shutil.copytree(root, other)
    store = IndexStore(root)
    first = store.current()
    elsewhere = build(other)
    key = {"X-API-Key": "adm"}
    with open_client(settings_for(index=root, admin_key="adm")) as client:
        for pattern in TRAVERSAL:
            version = pattern.format(v=elsewhere, other=other)
            response = client.post("/admin/reload", json={"version": version}, headers=key)
            assert_error(response, 422, "invalid_input")
            _no_leak(response, str(root), str(tmp_path))
        missing = client.post("/admin/reload", json={"version": elsewhere}, headers=key)
        assert_error(missing, 404, "not_found")
        _no_leak(missing, str(root), str(tmp_path))
        assert client.get("/info").json()["index"]["version"] == first
    assert store.current() == first


def test_a_refused_version_is_described_without_paths(root, settings_for, open_client, build):
    store = IndexStore(root)
    first = store.current()
    broken = build(root)
    faiss_file = root / "versions" / broken / "image.faiss"
    faiss_file.write_bytes(b"not faiss")
    store.switch(first)
    key = {"X-API-Key": "adm"}
    with open_client(settings_for(index=root, admin_key="adm")) as client:
        refused = client.post("/admin/reload", json={"version": broken}, headers=key)
        assert_error(refused, 409, "swap_failed")
        _no_leak(refused, str(root), str(faiss_file))
        assert broken in refused.json()["detail"]
        assert client.get("/info").json()["index"]["version"] == first
    assert store.current() == first


# -- the key before the body, and a stalled body times out ---------------------------------------


def _raw_request(url: str, head: str, body: bytes, timeout: float) -> tuple[bytes, float]:
    """Send `head` and part of a body, then read one response (or whatever came before
    `timeout`): (bytes received, seconds until the first byte)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(head.encode() + body)
        received, first = b"", None
        try:
            while not _complete(received) and (chunk := sock.recv(65536)):
                first = first or time.monotonic() - start
                received += chunk
        except TimeoutError:
            pass
        return received, first if first is not None else float("inf")


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def test_the_key_is_checked_before_the_body_and_a_stalled_body_times_out(settings_for, serve):
    from service.app import create_app

    settings = settings_for(api_key="s3cret", admin_key="adm", body_timeout_s=0.5)
    with serve(create_app(settings)) as server:
        for path in (T2I, I2T, "/admin/reload"):
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n"
            )
            # No key: refused at once, without waiting for the rest of the body.
            answer, first = _raw_request(server.url, head, b'{"text": ', timeout=3)
            assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:200])
            assert first < 1.0
            # With the key, a body that stops short is answered 408 after the read timeout.
            key = "adm" if path.startswith("/admin") else "s3cret"
            keyed = head.replace("Host: x\r\n", f"Host: x\r\nX-API-Key: {key}\r\n")
            answer, first = _raw_request(server.url, keyed, b'{"text": ', timeout=5)
            assert answer.startswith(b"HTTP/1.1 408"), (path, answer[:200])
            assert b'"code":"body_timeout"' in answer
            assert 0.4 < first < 3.0
        with httpx.Client(base_url=server.url) as http:  # the server still answers
            response = http.post(T2I, json={"text": "red"}, headers={"X-API-Key": "s3cret"})
            assert response.status_code == 200


# -- deep pages: complete against exact search, and `exhausted` at the end of the gallery -----


def _hnsw_root(root, bundle, n: int = 3000) -> np.ndarray:
    """A version of n random unit vectors per side in an HNSW index, built for `bundle`."""
    from index_builder.backends.base import IndexOptions

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, bundle.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"s{i:05d}" for i in range(n)]
    IndexStore(root).publish(
        bundle_id=bundle.bundle_id,
        dim=bundle.embed_dim,
        shards={"image": [vectors], "text": [vectors]},
        rows={
            "image": [
                {"id": i, "image": f"/none/{i}.png", "captions": [], "meta": {}} for i in ids
            ],
            "text": [{"id": f"{i}#0", "image_id": i, "text": "synthetic"} for i in ids],
        },
        options=IndexOptions(factory="HNSW32", use_gpu=False, queries=64),
        dataset={"name": "synthetic", "path": "synthetic", "fingerprint": "hnsw"},
    )
    return vectors


def test_deep_pages_are_complete_and_match_exact_search(
    tmp_path, assets, settings_for, open_client
):
    from index_builder.encoders import TextEncoder

    vectors = _hnsw_root(tmp_path / "hnsw", assets["bundle"])
    query = TextEncoder(assets["bundle"]).encode(["a red square"])[0]
    exact = np.argsort(-(vectors @ query), kind="stable")
    with open_client(settings_for(index=tmp_path / "hnsw")) as client:
        sides = client.get("/info").json()["index"]["sides"]
        assert sides["image"]["search_params"]["efSearch"] < 100  # tuned for k=10
        for offset in (0, 400, 900, 1000):
            body = client.post(T2I, json={"text": "a red square", "k": 100, "offset": offset})
            body = body.json()
            assert len(body["hits"]) == 100, (offset, len(body["hits"]))
            assert body["exhausted"] is False
            assert [h["rank"] for h in body["hits"]] == list(range(offset + 1, offset + 101))
            found = {int(h["id"][1:]) for h in body["hits"]}
            window = set(exact[max(0, offset - 10) : offset + 110].tolist())
            assert len(found & window) >= 95, offset  # the same ranks as exact search


def test_a_page_past_the_gallery_says_it_is_exhausted(client):
    full = client.post(T2I, json={"texts": ["red", "blue"], "k": 5}).json()
    assert full["exhausted"] is False and [r["exhausted"] for r in full["results"]] == [False] * 2
    last = client.post(T2I, json={"texts": ["red", "blue"], "k": 5, "offset": 5}).json()
    assert len(last["hits"]) == 3 and last["exhausted"] is True  # 8 images in the gallery
    assert [r["exhausted"] for r in last["results"]] == [True, True]
    image = client.post(I2T, files=[upload(png())], data={"k": "10", "offset": "10"}).json()
    assert len(image["hits"]) == 6 and image["exhausted"] is True  # 16 captions


def test_a_bundle_edited_after_export_is_refused_at_start(
    assets, settings_for, open_client, tmp_path
):
    """A tokenizer swapped in with its sha256 updated and the bundle_id kept (issue 17)."""
    edited = tmp_path / "bundle"
    shutil.copytree(assets["bundle"].path, edited)
    tokenizer = edited / "tokenizer.json"
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]  # "red" now finds blue images
    data = json.loads(tokenizer.read_text())
    data["model"]["vocab"] = vocab
    tokenizer.write_text(json.dumps(data))
    info = json.loads((edited / "bundle.json").read_text())
    info["files"]["tokenizer.json"] = sha256_file(tokenizer)
    (edited / "bundle.json").write_text(json.dumps(info))
    settings = settings_for(bundle=edited)
    with pytest.raises(ValueError, match="does not follow from its content"), open_client(settings):
        pass
