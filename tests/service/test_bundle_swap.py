"""Following a new bundle (COTS_FOLLOW_BUNDLE): a version built with another bundle swaps in
with that bundle under live traffic; a missing, replaced or corrupt recorded bundle is refused
and the old triple keeps serving; a micro-batch never mixes two bundles in one encoder call."""

from __future__ import annotations

import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from index_builder.backends.faiss.store import IndexStore
from index_builder.bundle import Bundle
from index_builder.cli import main as cots
from service.app import create_app
from service.engine import Engine, Job


def _png(rgb) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 12), rgb).save(out, format="PNG")
    return out.getvalue()


def _wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def _copy_bundle(source: Bundle, out) -> Bundle:
    shutil.copytree(source.path, out)
    return Bundle.load(out)


def test_a_new_bundle_swaps_in_under_traffic(root, assets, settings_for, serve, build):
    settings = settings_for(index=root, watch_interval_s=0.05, batch_wait_ms=1, follow_bundle=True)
    old, new = assets["bundle"].bundle_id, assets["other"].bundle_id
    first = IndexStore(root).current()
    stop = threading.Event()
    seen: list[list[tuple[int, str, str, tuple]]] = []
    image = _png((255, 0, 0))

    def traffic(url: str, use_image: bool) -> None:
        log: list[tuple[int, str, str, tuple]] = []
        seen.append(log)
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                if use_image:
                    files = {"image": ("r.png", image, "image/png")}
                    response = http.post("/search/image-to-text", files=files)
                else:
                    response = http.post("/search/text-to-image", json={"text": "a red square"})
                body = response.json()
                if response.status_code != 200:
                    log.append((response.status_code, "", "", ()))
                    continue
                top = body["hits"][0]
                assert top["id"] == "red" or top["id"].startswith("red#")
                scores = tuple(round(hit["score"], 5) for hit in body["hits"])
                log.append((200, body["bundle_id"], body["index_version"], scores))

    with serve(create_app(settings)) as server:
        threads = [
            threading.Thread(target=traffic, args=(server.url, i % 2 == 1)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        second = build(root, assets["other"])  # CURRENT moves
        _wait_for(lambda: all(log and log[-1][1] == new for log in seen))
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
        info = httpx.get(f"{server.url}/info").json()
        metrics = httpx.get(f"{server.url}/metrics").text

    requests = [entry for log in seen for entry in log]
    assert len(requests) > 40
    assert {status for status, *_ in requests} == {200}
    # The bundle and the index travel together: every answer names a matching pair.
    assert {(bundle, version) for _, bundle, version, _ in requests} == {
        (old, first),
        (new, second),
    }
    for log in seen:  # per client, once the new bundle answers the old one never does again
        order = [0 if bundle == old else 1 for _, bundle, _, _ in log]
        assert order == sorted(order) and order[0] == 0 and order[-1] == 1
    # One score list per (client, bundle): a query encoded with one bundle's tower and
    # searched in the other's index would score differently (the towers differ in bias).
    for log in seen:
        by_bundle: dict[str, set[tuple]] = {}
        for _, bundle, _, scores in log:
            by_bundle.setdefault(bundle, set()).add(scores)
        assert all(len(scores) == 1 for scores in by_bundle.values()), by_bundle
        assert by_bundle[old] != by_bundle[new]
    assert info["bundle"]["bundle_id"] == new and info["index"]["version"] == second
    assert 'cots_index_swaps_total{result="swapped"} 1.0' in metrics


def test_one_micro_batch_calls_each_bundle_encoder_with_its_own_queries(
    root, assets, settings_for, open_client, build, monkeypatch
):
    settings = settings_for(index=root, admin_key="k", follow_bundle=True)
    with open_client(settings) as client:
        engine: Engine = client.app.state.engine
        old = engine.searcher
        build(root, assets["other"])
        assert client.post("/admin/reload", headers={"X-API-Key": "k"}).json()["swapped"]
        new = engine.searcher
        assert new.encoders is not old.encoders and new.bundle.bundle_id != old.bundle.bundle_id
        calls: list[tuple[str, list[str]]] = []
        for name, gallery in (("old", old), ("new", new)):
            encode = gallery.encoders.text.encode

            def spy(texts, name=name, encode=encode):
                calls.append((name, list(texts)))
                return encode(texts)

            monkeypatch.setattr(gallery.encoders.text, "encode", spy)
        texts = ["red", "a blue square", "green", "yellow"]
        galleries = [old, new, old, new]
        jobs = [
            Job(text, gallery, "image", 3) for text, gallery in zip(texts, galleries, strict=True)
        ]
        mixed = engine._run_batch("text", jobs)
        assert calls == [("old", ["red", "green"]), ("new", ["a blue square", "yellow"])]
        for text, gallery, hits in zip(texts, galleries, mixed, strict=True):
            (alone,) = engine._run_batch("text", [Job(text, gallery, "image", 3)])
            assert hits == alone
            vector = gallery.encoders.text.encode([text])
            scores, rows = gallery.index.search("image", vector, 3)
            assert [h.item["id"] for h in hits] == [gallery.index.images[r]["id"] for r in rows[0]]
            np.testing.assert_allclose([h.score for h in hits], scores[0], atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "replaced", "corrupt", "unrecorded"])
def test_a_bad_recorded_bundle_is_refused_and_the_old_one_serves(
    damage, root, assets, settings_for, open_client, build, tmp_path
):
    copy = _copy_bundle(assets["other"], tmp_path / "v2")
    version = build(root, copy)
    info_path = root / "versions" / version / "index.json"
    if damage == "missing":
        shutil.rmtree(copy.path)
    elif damage == "replaced":  # another valid bundle now sits at the recorded path
        shutil.rmtree(copy.path)
        shutil.copytree(assets["bundle"].path, copy.path)
    elif damage == "corrupt":
        (copy.path / "tokenizer.json").write_text("{}")
    else:  # an index.json from before bundle_path was recorded
        info_path.write_text(info_path.read_text().replace('"bundle_path"', '"old_key"'))
    expected = {
        "missing": "no bundle at",
        "replaced": "replaced since the build",
        "corrupt": "does not match the sha256",
        "unrecorded": "records no bundle_path",
    }[damage]
    store = IndexStore(root)
    first = store.versions()[0]
    store.switch(first)  # start on the good version, then point CURRENT at the bad one
    settings = settings_for(index=root, admin_key="k", follow_bundle=True, watch_interval_s=0.05)
    with open_client(settings) as client:
        store.switch(version)
        metric = 'cots_index_swaps_total{result="rejected"} 1.0'
        _wait_for(lambda: metric in client.get("/metrics").text)
        key = {"X-API-Key": "k"}
        refused = client.post("/admin/reload", json={"version": version}, headers=key)
        assert refused.status_code == 409 and refused.json()["code"] == "swap_rejected"
        assert expected in refused.json()["detail"]
        search = client.post("/search/text-to-image", json={"text": "red"}).json()
        assert search["bundle_id"] == assets["bundle"].bundle_id
        assert search["index_version"] == first and search["hits"][0]["id"] == "red"
        assert client.get("/info").json()["bundle"]["bundle_id"] == assets["bundle"].bundle_id


def test_a_restarted_service_starts_on_the_bundle_the_index_records(
    root, assets, settings_for, open_client, build
):
    version = build(root, assets["other"])
    settings = settings_for(index=root)
    with pytest.raises(ValueError, match="was built with bundle"), open_client(settings):
        pass
    with open_client(settings_for(index=root, follow_bundle=True)) as client:
        body = client.post("/search/text-to-image", json={"text": "a blue square"}).json()
    assert body["bundle_id"] == assets["other"].bundle_id and body["index_version"] == version
    assert body["hits"][0]["id"] == "blue"


def test_serve_follow_bundle_flag(root, assets, build, monkeypatch, capsys):
    import uvicorn

    build(root, assets["other"])
    started: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    for name in ("COTS_BUNDLE", "COTS_INDEX"):  # `cots serve` exports its flags; undo that
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("COTS_FOLLOW_BUNDLE", "false")
    argv = ["serve", "--bundle", str(assets["bundle"].path), "--index", str(root)]
    assert cots(argv) == 2  # the environment says do not follow: refused before starting
    assert "was built with bundle" in capsys.readouterr().err and not started
    assert cots([*argv, "--follow-bundle"]) == 0  # the flag wins over the environment
    assert started == ["service.app:create_app"]
