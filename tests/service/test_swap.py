"""Start-up, readiness and hot swaps: under live traffic not one request fails while CURRENT
moves; a mismatched index is refused at start and at swap time; requests in flight finish on
the version they started with."""

from __future__ import annotations

import gc
import io
import re
import threading
import time

import httpx
import pytest
from PIL import Image

from index_builder.backends.faiss.store import IndexStore
from index_builder.cli import main as cots
from service.app import create_app
from service.engine import Engine


def _png(rgb) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 12), rgb).save(out, format="PNG")
    return out.getvalue()


def test_swap_under_traffic_fails_no_request(root, assets, settings_for, serve, build):
    settings = settings_for(index=root, watch_interval_s=0.05, batch_wait_ms=1)
    first = IndexStore(root).current()
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = []
    image = _png((255, 0, 0))

    def traffic(url: str, use_image: bool) -> None:
        log: list[tuple[int, str]] = []
        seen.append(log)
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                if use_image:
                    response = http.post(
                        "/search/image-to-text", files={"image": ("r.png", image, "image/png")}
                    )
                else:
                    response = http.post("/search/text-to-image", json={"text": "a red square"})
                ok = response.status_code == 200
                log.append((response.status_code, response.json()["index_version"] if ok else ""))

    with serve(create_app(settings)) as server:
        threads = [
            threading.Thread(target=traffic, args=(server.url, i % 2 == 1)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        second = build(root)  # moves CURRENT under traffic
        _wait_for(lambda: any(log and log[-1][1] == second for log in seen))
        mismatched = build(root, assets["other"])  # built with another bundle
        _wait_for(lambda: 'cots_index_swaps_total{result="rejected"} 1.0' in _metrics(server))
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
        info = httpx.get(f"{server.url}/info").json()
        metrics = _metrics(server)

    requests = [entry for log in seen for entry in log]
    assert len(requests) > 40
    assert {status for status, _ in requests} == {200}
    assert {version for _, version in requests} == {first, second}
    for log in seen:  # per client, once the new version answers the old one never does again
        versions = [v for _, v in log]
        assert versions == sorted(versions)
    assert mismatched not in {v for _, v in requests}
    assert info["index"]["version"] == second  # the refused version never replaced it
    assert 'cots_index_swaps_total{result="swapped"} 1.0' in metrics


def test_in_flight_requests_finish_on_the_old_version(
    root, settings_for, serve, build, monkeypatch
):
    settings = settings_for(index=root, admin_key="adm1n", batch_wait_ms=0)
    app = create_app(settings)
    with serve(app) as server:
        engine: Engine = app.state.engine
        entered, release = threading.Event(), threading.Event()
        real = engine.searcher.encoders.text
        encode = real.encode

        def held(texts):
            entered.set()
            release.wait(10)
            return encode(texts)

        monkeypatch.setattr(real, "encode", held)
        result: dict = {}

        def slow_request() -> None:
            result["body"] = httpx.post(
                f"{server.url}/search/text-to-image", json={"text": "red"}, timeout=20
            ).json()

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert entered.wait(10)
        old = engine.searcher.version
        new = build(root)
        reload = httpx.post(f"{server.url}/admin/reload", headers={"X-API-Key": "adm1n"})
        assert reload.json() == {"previous_version": old, "index_version": new, "swapped": True}
        monkeypatch.setattr(real, "encode", encode)
        release.set()
        thread.join()
        after = httpx.post(f"{server.url}/search/text-to-image", json={"text": "red"}).json()
    assert result["body"]["index_version"] == old
    assert result["body"]["hits"][0]["id"] == "red"
    assert after["index_version"] == new


def test_admin_reload_explicit_versions_and_refusals(
    root, assets, settings_for, open_client, build
):
    store = IndexStore(root)
    first = store.current()
    second = build(root)
    store.switch(first)
    with open_client(settings_for(index=root, admin_key="k")) as client:
        key = {"Authorization": "Bearer k"}
        body = client.post("/admin/reload", json={"version": second}, headers=key).json()
        assert body == {"previous_version": first, "index_version": second, "swapped": True}
        assert (
            client.post("/admin/reload", json={"version": second}, headers=key).json()["swapped"]
            is False
        )
        missing = {"version": "v999999-20990101T000000Z"}
        missing = client.post("/admin/reload", json=missing, headers=key)
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        malformed = client.post("/admin/reload", json={"version": "v999999-x"}, headers=key)
        assert malformed.status_code == 422 and malformed.json()["code"] == "invalid_input"
        bad = build(root, assets["other"])
        refused = client.post("/admin/reload", json={"version": bad}, headers=key)
        assert refused.status_code == 409 and refused.json()["code"] == "swap_rejected"
        assert "built with bundle" in refused.json()["detail"]
        assert client.get("/info").json()["index"]["version"] == second
        search = client.post("/search/text-to-image", json={"text": "green"})
        assert search.status_code == 200 and search.json()["index_version"] == second


def test_ready_is_503_until_loaded(settings_for, open_client, monkeypatch):
    gate = threading.Event()
    original = Engine._open_encoders

    def held(self, bundle):
        gate.wait(10)
        return original(self, bundle)

    monkeypatch.setattr(Engine, "_open_encoders", held)
    with open_client(settings_for(), ready=False) as client:
        assert client.get("/health").status_code == 200
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["code"] == "not_ready"
        search = client.post("/search/text-to-image", json={"text": "red"})
        assert search.status_code == 503 and search.json()["code"] == "not_ready"
        assert client.get("/info").json()["ready"] is False
        gate.set()
        _wait_for(lambda: client.get("/ready").status_code == 200)
        assert client.post("/search/text-to-image", json={"text": "red"}).status_code == 200


def _truncate(root, version: str, name: str = "text.faiss") -> bytes:
    path = root / "versions" / version / name
    data = path.read_bytes()
    path.write_bytes(data[:100])
    return data


def test_a_failed_first_load_recovers_when_current_moves(root, settings_for, open_client, build):
    first = IndexStore(root).current()
    _truncate(root, first)
    settings = settings_for(index=root, watch_interval_s=0.05, load_retry_max_s=3600)
    with open_client(settings, ready=False) as client:
        _wait_for(lambda: client.app.state.engine.load_error is not None)
        assert client.get("/ready").status_code == 503
        second = build(root)  # a good version appears: no restart needed
        _wait_for(lambda: client.get("/ready").status_code == 200, timeout=10)
        body = client.post("/search/text-to-image", json={"text": "a red square"}).json()
        assert body["index_version"] == second and body["hits"][0]["id"] == "red"
        assert client.get("/info").json()["index"]["version"] == second


def test_a_failed_first_load_is_retried_with_back_off(root, settings_for, open_client, caplog):
    first = IndexStore(root).current()
    good = _truncate(root, first)
    settings = settings_for(index=root, watch_interval_s=0.05, load_retry_max_s=0.2)
    with open_client(settings, ready=False) as client:
        _wait_for(lambda: caplog.text.count("still no index to serve") >= 3)  # 0.05 + 0.1 + 0.2 s
        assert client.get("/ready").json()["code"] == "load_failed"
        (root / "versions" / first / "text.faiss").write_bytes(good)  # repaired in place
        _wait_for(lambda: client.get("/ready").status_code == 200, timeout=10)
        body = client.post("/search/image-to-text", files={"image": ("r.png", _png((255, 0, 0)))})
        assert body.status_code == 200 and body.json()["index_version"] == first
    delays = re.findall(r"retry in ([0-9.e-]+) s", caplog.text)
    assert [float(d) for d in delays[:4]] == [0.05, 0.1, 0.2, 0.2]  # doubling, then capped


def test_a_rollback_under_traffic_moves_current_and_sticks(root, settings_for, serve, build):
    settings = settings_for(index=root, watch_interval_s=0.05, batch_wait_ms=1, admin_key="k")
    store = IndexStore(root)
    first = store.current()
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = []

    def traffic(url: str, use_image: bool) -> None:
        log: list[tuple[int, str]] = []
        seen.append(log)
        image = _png((255, 0, 0))
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                if use_image:
                    files = {"image": ("r.png", image, "image/png")}
                    response = http.post("/search/image-to-text", files=files)
                else:
                    response = http.post("/search/text-to-image", json={"text": "a red square"})
                ok = response.status_code == 200
                log.append((response.status_code, response.json()["index_version"] if ok else ""))

    with serve(create_app(settings)) as server:
        threads = [
            threading.Thread(target=traffic, args=(server.url, i % 2 == 1)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        second = build(root)
        _wait_for(lambda: all(log and log[-1][1] == second for log in seen))
        rollback = httpx.post(
            f"{server.url}/admin/reload", json={"version": first}, headers={"X-API-Key": "k"}
        )
        assert rollback.json() == {
            "previous_version": second,
            "index_version": first,
            "swapped": True,
        }
        assert store.current() == first  # CURRENT moved with it, through the atomic switch
        time.sleep(0.5)  # ten watcher polls: it agrees, so it does not swap back
        info = httpx.get(f"{server.url}/info").json()
        stop.set()
        for thread in threads:
            thread.join()
    assert info["index"]["version"] == first
    requests = [entry for log in seen for entry in log]
    assert len(requests) > 40 and {status for status, _ in requests} == {200}
    for log in seen:  # per client: first, then second, then first again, never back and forth
        phases = [v for i, (_, v) in enumerate(log) if i == 0 or v != log[i - 1][1]]
        assert phases in ([first, second, first], [second, first]), phases


def test_a_rollback_on_a_read_only_root_is_refused(
    root, settings_for, open_client, build, monkeypatch
):
    store = IndexStore(root)
    first = store.current()
    second = build(root)
    settings = settings_for(index=root, admin_key="k")
    with open_client(settings) as client:

        def read_only(self, version):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(IndexStore, "switch", read_only)
        refused = client.post("/admin/reload", json={"version": first}, headers={"X-API-Key": "k"})
        assert refused.status_code == 409 and refused.json()["code"] == "current_not_writable"
        assert client.get("/info").json()["index"]["version"] == second
    assert store.current() == second


def test_a_served_version_is_frozen_out_of_the_collector(settings_for, open_client):
    """What a load leaves alive is moved out of the collector's generations, so that no full
    collection walks it during requests; the collector itself stays on."""
    with open_client(settings_for()) as c:
        gallery = c.app.state.engine.searcher
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert gc.is_tracked(gallery) and not any(obj is gallery for obj in gc.get_objects())


def test_refuses_to_start_on_a_mismatched_bundle(assets, settings_for, open_client, capsys):
    settings = settings_for(bundle=assets["other"].path)
    with pytest.raises(ValueError, match="was built with bundle"), open_client(settings):
        pass
    code = cots(["serve", "--bundle", str(assets["other"].path), "--index", str(assets["index"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.match(r"cots serve: error: index version v\d+-\S+ was built with bundle", err)


def test_serve_names_missing_settings(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("COTS_BUNDLE", raising=False)
    monkeypatch.delenv("COTS_INDEX", raising=False)
    assert cots(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--bundle (or COTS_BUNDLE) is required" in err and "--index" in err
    assert cots(["serve", "--bundle", str(tmp_path), "--index", str(tmp_path)]) == 2
    assert "no bundle at" in capsys.readouterr().err


def test_settings_from_environment(monkeypatch, tmp_path):
    from service.settings import Settings

    monkeypatch.setenv("COTS_BUNDLE", str(tmp_path / "b"))
    monkeypatch.setenv("COTS_INDEX", str(tmp_path / "i"))
    monkeypatch.setenv("COTS_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("COTS_MAX_K", "7")
    monkeypatch.setenv("COTS_API_KEY", "s")
    settings = Settings()  # type: ignore[call-arg]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.max_k == 7 and settings.api_key is not None
    assert "s" not in repr(settings.api_key)
    monkeypatch.setenv("COTS_MAX_K", "0")
    with pytest.raises(ValueError, match="max_k"):
        Settings()  # type: ignore[call-arg]


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def _wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)
