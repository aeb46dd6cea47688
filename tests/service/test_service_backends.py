"""The service over either index backend (FAISS files, a real Milvus server): the same
answers, swaps under traffic without one failed request, live changes, and a bad backend
refused at start with one line."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from test_api import I2I, I2T, T2I, T2T, png

from index_builder.backends import BackendConfig, open_store
from index_builder.cli import main as cots
from service.app import create_app
from service.engine import Engine
from service.metrics import Metrics

KEY = {"X-API-Key": "adm1n"}


@dataclass
class Served:
    """An index of the colour gallery in one backend, the settings that serve it, and a
    `build(bundle=None)` publishing one more version there."""

    backend: str
    root: Path
    overrides: dict
    publish: Callable[..., str]

    @property
    def store(self):
        uri = self.overrides.get("milvus_uri")
        return open_store(self.root, BackendConfig(self.backend, milvus_uri=uri))

    def build(self, bundle=None) -> str:
        return self.publish(self.root, bundle, store=self.store)


@pytest.fixture
def serve_from(request, tmp_path, build):
    """`serve_from(backend, name)`: a Served index of the colour gallery in that backend (for
    Milvus, the session's server, emptied before the test)."""

    def make(backend: str, name: str = "index") -> Served:
        if backend == "faiss":
            root = tmp_path / name
            build(root)
            return Served(backend, root, {"index": root}, build)
        uri = request.getfixturevalue("milvus_uri")
        root = tmp_path / name / "work"
        served = Served(
            backend, root, {"index": root, "backend": "milvus", "milvus_uri": uri}, build
        )
        served.build()
        return served

    return make


@pytest.fixture(params=["faiss", "milvus"])
def served(request, serve_from) -> Served:
    return serve_from(request.param)


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_swap_under_traffic_fails_no_request(served, assets, settings_for, serve):
    settings = settings_for(**served.overrides, watch_interval_s=0.05, batch_wait_ms=1)
    first = served.store.current()
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = []

    def traffic(url: str, use_image: bool) -> None:
        log: list[tuple[int, str]] = []
        seen.append(log)
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                if use_image:
                    files = {"image": ("r.png", png((255, 0, 0)), "image/png")}
                    response = http.post(I2T, files=files)
                else:
                    response = http.post(
                        T2I, json={"text": "a red square", "filter": {"pure": True}}
                    )
                ok = response.status_code == 200
                log.append((response.status_code, response.json()["index_version"] if ok else ""))

    with serve(create_app(settings)) as server:
        threads = [threading.Thread(target=traffic, args=(server.url, i % 2)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        second = served.build()  # moves CURRENT / the alias under traffic
        _wait_for(lambda: any(log and log[-1][1] == second for log in seen))
        mismatched = served.build(assets["other"])  # built with another bundle
        _wait_for(lambda: 'cots_index_swaps_total{result="rejected"} 1.0' in _metrics(server.url))
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
        info = httpx.get(f"{server.url}/info").json()

    requests = [entry for log in seen for entry in log]
    assert len(requests) > 40 and {status for status, _ in requests} == {200}
    assert {version for _, version in requests} == {first, second}
    assert mismatched not in {v for _, v in requests}
    assert info["index"]["version"] == second and info["index"]["backend"] == served.backend


def test_both_backends_answer_alike(serve_from, settings_for, open_client):
    requests = [  # every query returns all the items it allows: equal scores tie
        ("post", T2I, {"json": {"text": "a red square", "k": 8}}),
        ("post", T2I, {"json": {"text": "yellow", "filter": {"channels": "g", "pure": False}}}),
        ("post", T2T, {"json": {"text": "a blue square", "filter": {"style": {"in": ["word"]}}}}),
        ("post", I2I, {"json": {"id": "red", "k": 4, "filter": {"brightness": {"gte": 2}}}}),
        ("post", I2T, {"files": {"image": ("c.png", png((0, 255, 255)), "image/png")},
                       "data": {"k": "16"}}),
        ("post", T2I, {"json": {"text": "red", "filter": {"colour": "red"}}}),  # unknown field
        ("post", T2T, {"json": {"id": "no-such-text"}}),
        ("get", "/images/green", {}),
    ]  # fmt: skip
    answers = []
    for backend in ("faiss", "milvus"):
        served = serve_from(backend, backend)
        with open_client(settings_for(**served.overrides)) as client:
            answers.append([_comparable(getattr(client, m)(url, **kw)) for m, url, kw in requests])
    assert answers[0] == answers[1]
    assert [status for status, _ in answers[0]] == [200] * 5 + [422, 404, 200]


def _comparable(response: httpx.Response) -> tuple[int, object]:
    """Status and body, without what may differ: timings, version names, the order (and so
    the ranks) of equal scores, float noise."""
    if not response.headers["content-type"].startswith("application/json"):
        return response.status_code, response.content
    body = response.json()
    body.pop("index_version", None)
    body.pop("took_ms", None)
    for result in [body, *body.get("results", [])]:
        if "hits" in result:
            hits = [{**h, "score": round(h["score"], 4), "rank": 0} for h in result["hits"]]
            result["hits"] = sorted(hits, key=lambda h: (-h["score"], h["id"]))
    return response.status_code, body


def test_admin_changes_on_milvus(serve_from, settings_for, open_client):
    served = serve_from("milvus")
    first = served.store.current()
    with open_client(settings_for(**served.overrides, admin_key="adm1n")) as client:
        files = {"image": ("p.png", png((128, 0, 128)), "image/png")}
        data = {"ids": '["purple"]', "meta": '{"year": 2024}'}
        added = client.post("/admin/items", files=files, data=data, headers=KEY).json()
        assert added["added"] == {"image": 1, "text": 0} and added["previous_version"] == first
        assert added["index_version"] == served.store.current() == first  # changed in place
        assert 'cots_gallery_items{side="image"} 9.0' in client.get("/metrics").text
        found = client.post(T2I, json={"text": "red", "filter": {"year": {"gte": 2020}}}).json()
        assert [h["id"] for h in found["hits"]] == ["purple"]
        assert client.get("/images/purple").status_code == 200
        gone = client.post("/admin/delete", json={"ids": ["red", "purple"]}, headers=KEY).json()
        assert gone["deleted"] == {"image": 2, "text": 2} and gone["gallery"]["images"] == 7
        missing = client.post("/admin/delete", json={"ids": ["nope"]}, headers=KEY)
        assert missing.status_code == 404 and served.store.current() == gone["index_version"]
        hits = client.post(T2I, json={"text": "a red square", "k": 10}).json()["hits"]
        assert "red" not in [h["id"] for h in hits] and len(hits) == 7


def test_uploads_no_version_names_are_collected_on_either_backend(
    served, settings_for, open_client
):
    """An upload deleted again leaves <root>/files/ once no kept version names it (after the
    grace period); Milvus kept it for good (bench/attack.py)."""
    files = served.root / "files"
    with open_client(settings_for(**served.overrides, admin_key="adm1n")) as client:
        upload = {"image": ("p.png", png((128, 0, 128)), "image/png")}
        added = client.post("/admin/items", files=upload, data={"ids": '["p"]'}, headers=KEY)
        assert added.status_code == 200, added.text
        assert len(list(files.iterdir())) == 1
        assert client.post("/admin/delete", json={"ids": ["p"]}, headers=KEY).status_code == 200
        for i in range(4):  # past the kept versions, so that none names the upload
            if i == 3:
                hour_ago = time.time() - 7200
                for path in files.iterdir():
                    os.utime(path, (hour_ago, hour_ago))
            text = {"texts": [{"id": f"n{i}", "text": "red"}]}
            assert client.post("/admin/items", json=text, headers=KEY).status_code == 200
    assert list(files.iterdir()) == []


def test_a_bad_milvus_backend_is_refused_at_start(
    tmp_path, assets, serve_from, settings_for, capsys, monkeypatch
):
    for name in ("BUNDLE", "INDEX", "BACKEND", "MILVUS_URI"):  # `cots serve` sets them
        monkeypatch.setenv(f"COTS_{name}", "")  # recorded, so restored (or removed) after
        monkeypatch.delenv(f"COTS_{name}")
    served = serve_from("milvus")
    settings = settings_for(**served.overrides, bundle=assets["other"].path)
    with pytest.raises(ValueError, match="was built with bundle"):
        Engine(settings, Metrics())  # what the app's start-up does first
    bundle = str(assets["bundle"].path)
    for uri, words in [
        ("http://127.0.0.1:1", "cannot reach Milvus at http://127.0.0.1:1"),
        (str(tmp_path / "empty.db"), "the alias 'cots' does not exist"),  # milvus-lite
        ("ftp://nowhere", "bad Milvus URI 'ftp://nowhere'"),
    ]:
        args = ["--backend", "milvus", "--milvus-uri", uri]
        assert cots(["serve", "--bundle", bundle, "--index", str(served.root), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    monkeypatch.delenv("COTS_MILVUS_URI")
    assert cots(["serve", "--bundle", bundle, "--index", str(tmp_path), "--backend", "milvus"]) == 2
    assert "needs a URI" in capsys.readouterr().err


def test_a_failing_milvus_is_503_not_500(serve_from, settings_for, open_client):
    served = serve_from("milvus")
    with open_client(settings_for(**served.overrides)) as client:
        assert client.post(T2I, json={"text": "red"}).status_code == 200
        store = served.store
        store.client.drop_collection(store.collection_of(store.current()))  # gone under it
        for response in (
            client.post(T2I, json={"text": "red", "filter": {"pure": True}}),
            client.post(I2I, json={"id": "red"}),
            client.get("/images/red"),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "backend_unavailable"
            assert response.json()["detail"].startswith("the index backend failed: Milvus at")


def test_milvus_failing_after_the_search_is_503_with_json(serve_from, settings_for, open_client,
                                                          monkeypatch):  # fmt: skip
    """A Milvus that goes down mid-request (its search answered, the lookups after it not:
    a caption's image, a change's ids) is a 503 with a JSON code, never a 500."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    served = serve_from("milvus")
    with open_client(settings_for(**served.overrides, admin_key="adm1n")) as client:
        image = {"image": ("r.png", png((255, 0, 0)), "image/png")}
        assert client.post(I2T, files=image).json()["hits"][0]["image_id"]

        def down(*args, **kwargs):
            raise MilvusException(65535, "empty grpc client: failed to connect 127.0.0.1:42100")

        for method in ("query", "get", "delete", "insert", "upsert"):
            monkeypatch.setattr(MilvusClient, method, down)
        for response in (
            client.post(I2T, files=image),  # the search answers; the caption's image lookup fails
            client.post("/admin/delete", json={"ids": ["red"]}, headers=KEY),
            client.post("/admin/items", json={"texts": [{"id": "n", "text": "x"}]}, headers=KEY),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "backend_unavailable", response.text
    monkeypatch.undo()
    assert served.store.open().row_of("image", "red") is not None  # nothing was changed


def test_a_milvus_server_stopped_under_the_service_is_503_with_json(
    tmp_path, build, settings_for, open_client
):
    """A real server (its own, not the session's) stopped while the service serves from it:
    every search and change answers 503 with a JSON code, within the client's timeout."""
    from index_builder.backends.milvus import server

    data = tmp_path / "own-server"
    state = server.start(data, *server.free_ports(2), timeout=180)
    try:
        root = tmp_path / "work"
        build(root, store=open_store(root, BackendConfig("milvus", milvus_uri=state.uri)))
        settings = settings_for(index=root, backend="milvus", milvus_uri=state.uri,
                                admin_key="adm1n")  # fmt: skip
        with open_client(settings) as client:
            assert client.post(T2I, json={"text": "red"}).status_code == 200
            server.stop(data)
            for request in (
                lambda: client.post(T2I, json={"text": "red", "filter": {"pure": True}}),
                lambda: client.post(I2T, files={"image": ("r.png", png((255, 0, 0)), "image/png")}),
                lambda: client.post("/admin/delete", json={"ids": ["red"]}, headers=KEY),
            ):
                started = time.monotonic()
                response = request()
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "backend_unavailable", response.text
                assert time.monotonic() - started < 60
    finally:
        server.stop(data)
