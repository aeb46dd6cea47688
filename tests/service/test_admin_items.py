"""A live collection over HTTP: /admin/items adds or replaces images and texts, /admin/delete
removes items, each as a new index version the service swaps to; bad input is a 4xx and the
served version stays; searches under changes never fail."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image
from test_api import I2I, I2T, T2I, T2T, assert_error, b64, png

from index_builder.backends.faiss.store import IndexStore
from service.app import create_app

KEY = {"X-API-Key": "adm1n"}
PURPLE = {"channels": ["r", "b"], "brightness": 2, "pure": False, "year": 2024}


def _png(rgb, size=(16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def admin(root, settings_for, open_client):
    """A client over a private copy of the index, with the admin key set."""
    with open_client(settings_for(index=root, admin_key="adm1n")) as client:
        yield client


def _add_image(client, data: bytes, item_id: str, meta: dict, **form):
    files = {"image": (f"{item_id}.png", data, "image/png")}
    fields = {"ids": json.dumps([item_id]), "meta": json.dumps(meta), **form}
    return client.post("/admin/items", files=files, data=fields, headers=KEY)


def test_add_search_replace_delete(admin, root):
    purple = _png((128, 0, 128))
    added = _add_image(admin, purple, "purple", PURPLE)
    assert added.status_code == 200, added.text
    body = added.json()
    assert body["added"] == {"image": 1, "text": 0} and body["gallery"]["images"] == 9
    assert body["index_version"] == IndexStore(root).current() != body["previous_version"]
    assert admin.get("/info").json()["index"]["version"] == body["index_version"]

    found = admin.post(I2I, files={"image": ("q.png", purple, "image/png")}).json()
    assert found["hits"][0]["id"] == "purple" and found["hits"][0]["meta"] == PURPLE
    assert found["index_version"] == body["index_version"]
    assert admin.get("/images/purple").content == purple
    assert [p.suffix for p in (root / "files").iterdir()] == [".png"]  # kept by content
    dated = admin.post(T2I, json={"text": "red", "filter": {"year": {"gte": 2020}}}).json()
    assert [h["id"] for h in dated["hits"]] == ["purple"]

    texts = {"texts": [{"id": "note-1", "text": "a magenta square", "meta": {"style": "note"}}]}
    noted = admin.post("/admin/items", json=texts, headers=KEY).json()
    assert noted["added"] == {"image": 0, "text": 1} and noted["gallery"]["texts"] == 17
    hit = admin.post(T2T, json={"text": "a magenta square", "filter": {"style": "note"}}).json()
    assert hit["hits"][0]["id"] == "note-1" and "url" not in hit["hits"][0]  # no image

    again = _add_image(admin, _png((255, 128, 0)), "purple", PURPLE).json()
    assert again["skipped_existing"]["image"] == 1
    assert again["index_version"] == noted["index_version"]  # nothing changed, nothing published
    orange = _png((255, 128, 0))
    replaced = _add_image(admin, orange, "purple", PURPLE, upsert="true").json()
    assert replaced["replaced"]["image"] == 1 and replaced["gallery"]["images"] == 9
    top = admin.post(I2I, json={"image": b64(orange)}).json()["hits"][0]
    assert top["id"] == "purple" and admin.get("/images/purple").content == orange

    gone = admin.post("/admin/delete", json={"ids": ["purple", "note-1", "red"]}, headers=KEY)
    assert gone.status_code == 200, gone.text
    # red's two captions go with it
    assert gone.json()["deleted"] == {"image": 2, "text": 3}
    assert gone.json()["gallery"] == {"images": 7, "texts": 14}
    ids = [h["id"] for h in admin.post(T2I, json={"text": "red", "k": 20}).json()["hits"]]
    assert len(ids) == 7 and {"red", "purple"}.isdisjoint(ids)
    texts_left = admin.post(T2T, json={"text": "red", "k": 20}).json()["hits"]
    assert not [h for h in texts_left if h["id"] in ("note-1", "red#0", "red#1")]
    assert_error(admin.get("/images/purple"), 404, "not_found")
    assert_error(admin.post(I2I, json={"id": "red"}), 404, "unknown_id")


def test_add_and_delete_by_side_in_json(admin):
    body = {
        "images": [{"id": "grey", "image": b64(_png((128, 128, 128))), "meta": {"year": 1999}}],
        "texts": [{"id": "t-grey", "text": "a white square"}],
    }
    added = admin.post("/admin/items", json=body, headers=KEY).json()
    assert added["added"] == {"image": 1, "text": 1}
    refused = admin.post("/admin/delete", json={"ids": ["grey"], "side": "text"}, headers=KEY)
    assert_error(refused, 404, "unknown_ids", "grey")
    deleted = admin.post("/admin/delete", json={"ids": ["t-grey"], "side": "text"}, headers=KEY)
    assert deleted.json()["deleted"] == {"image": 0, "text": 1}


def _bad_requests() -> list[tuple[dict, int, str, str]]:
    """(request kwargs, status, code, words): each must leave the served version as it was."""
    image = _png((1, 2, 3))
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise, format="PNG")
    truncated = noise.getvalue()[: len(noise.getvalue()) // 2]  # a whole header, half the pixels
    one = {"image": ("a.png", image, "image/png")}
    return [
        ({"json": {}}, 422, "empty", "nothing to add"),
        ({"json": {"texts": []}}, 422, "empty", "nothing to add"),
        ({"json": {"texts": [{"id": "x", "text": ""}]}}, 422, "invalid_input", "text"),
        ({"json": {"texts": [{"id": "", "text": "a"}]}}, 422, "invalid_input", "id"),
        (
            {"json": {"texts": [{"id": "x", "text": "a", "meta": [1]}]}},
            422,
            "invalid_input",
            "meta",
        ),
        ({"json": {"texts": [{"id": "x", "text": "a"}] * 2}}, 422, "duplicate_ids", "'x'"),
        ({"json": {"images": [{"id": "x", "image": "@@"}]}}, 400, "bad_content", "base64"),
        ({"json": {"colours": []}}, 422, "invalid_input", "colours"),
        ({"files": {"image": ("a.png", truncated, "image/png")}}, 400, "bad_content", "truncated"),
        ({"files": {"image": ("a.txt", b"text", "text/plain")}}, 415, "not_an_image", "'a'"),
        ({"files": one, "data": {"ids": '["a", "b"]'}}, 422, "invalid_input", "2 ids for 1"),
        ({"files": one, "data": {"ids": "a"}}, 422, "invalid_input", "not valid JSON"),
        ({"files": one, "data": {"meta": "[1]"}}, 422, "invalid_input", "meta"),
        ({"files": one, "data": {"upsert": "yes"}}, 422, "invalid_input", "upsert"),
        ({"files": one, "data": {"text": "a"}}, 422, "invalid_input", "text"),
        (
            {"content": b"x", "headers": {"Content-Type": "text/plain"}},
            415,
            "wrong_content_type",
            "",
        ),
    ]


def test_bad_changes_leave_the_served_version(admin, root, assets):
    gallery = assets["gallery"]
    store = IndexStore(root)
    before = (store.current(), store.versions())
    for kwargs, status, code, words in _bad_requests():
        headers = {**KEY, **kwargs.pop("headers", {})}
        response = admin.post("/admin/items", headers=headers, **kwargs)
        assert_error(response, status, code, words)
    deletes = [
        ({"ids": ["red", "purple", "mauve"]}, 404, "unknown_ids", "2 ids are not in the index"),
        ({"ids": ["red#0"], "side": "image"}, 404, "unknown_ids", "not in the index"),
        ({"ids": []}, 422, "invalid_input", "ids"),
        ({"ids": ["red"], "side": "audio"}, 422, "invalid_input", "side"),
        ({"ids": [row["id"] for row in gallery]}, 422, "invalid_change", "leave the index empty"),
    ]
    for body, status, code, words in deletes:
        assert_error(admin.post("/admin/delete", json=body, headers=KEY), status, code, words)
    assert (store.current(), store.versions()) == before
    assert admin.get("/info").json()["index"]["version"] == before[0]
    assert not (root / "files").exists()  # nothing stored for refused uploads
    assert admin.post(T2I, json={"text": "red"}).json()["hits"][0]["id"] == "red"


def test_admin_items_need_the_admin_key(client, settings_for, open_client):
    texts = {"texts": [{"id": "x", "text": "a"}]}
    assert_error(client.post("/admin/items", json=texts), 403, "forbidden")
    with open_client(settings_for(admin_key="adm1n", api_key="k"), ready=False) as keyed:
        response = keyed.post("/admin/items", json=texts, headers={"X-API-Key": "k"})
        assert_error(response, 401, "unauthorized")
        response = keyed.post("/admin/delete", json={"ids": ["red"]})
        assert_error(response, 401, "unauthorized")


def test_changes_under_traffic_fail_no_request(root, settings_for, serve):
    """Four kinds of search run while images and texts are added, replaced and deleted."""
    settings = settings_for(index=root, admin_key="adm1n", batch_wait_ms=1, watch_interval_s=0.05)
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = []
    image = png((0, 0, 255))
    searches = [
        lambda http: http.post(T2I, json={"text": "a red square", "k": 3}),
        lambda http: http.post(I2T, files={"image": ("b.png", image, "image/png")}),
        lambda http: http.post(I2I, json={"id": "green", "k": 3}),
        lambda http: http.post(T2T, json={"text": "blue", "filter": {"style": "word"}}),
    ]

    def traffic(url: str, search) -> None:
        log: list[tuple[int, str]] = []
        seen.append(log)
        with httpx.Client(base_url=url, timeout=20) as http:
            while not stop.is_set():
                response = search(http)
                ok = response.status_code == 200
                log.append((response.status_code, response.json()["index_version"] if ok else ""))

    with serve(create_app(settings)) as server:
        threads = [threading.Thread(target=traffic, args=(server.url, s)) for s in searches]
        for thread in threads:
            thread.start()
        versions = []
        with httpx.Client(base_url=server.url, headers=KEY, timeout=60) as http:
            for n in range(3):
                time.sleep(0.15)
                data = _png((40 * n, 200, 90))
                files = {"image": (f"new-{n}.png", data, "image/png")}
                response = http.post("/admin/items", files=files, data={"upsert": "true"})
                versions.append(response.json()["index_version"])
                texts = {"texts": [{"id": f"t{n}", "text": "a red square"}], "upsert": True}
                versions.append(http.post("/admin/items", json=texts).json()["index_version"])
                response = http.post("/admin/delete", json={"ids": [f"new-{n}", f"t{n}"]})
                versions.append(response.json()["index_version"])
        time.sleep(0.15)
        stop.set()
        for thread in threads:
            thread.join()

    requests = [entry for log in seen for entry in log]
    assert len(requests) > 40
    assert {status for status, _ in requests} == {200}
    assert len(set(versions)) == 9 and versions == sorted(versions)
    assert len({version for _, version in requests}) > 2  # the traffic followed the changes
    for log in seen:  # per client, versions only move forward
        answered = [v for _, v in log]
        assert answered == sorted(answered)
