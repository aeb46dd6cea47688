"""A real tiny bundle and index (no torch): the colour towers of index_builder/synthetic.py
over solid-colour images, so the tests check ranking, not just shapes."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from index_builder.bundle import Bundle
from index_builder.synthetic import (  # noqa: F401 (the tests import these from here)
    COLOURS,
    build_version,
    caption_rows,
    colour_meta,
    make_bundle,
    make_gallery,
)

# The tiny video builders of tests/index_builder (a plain module there, not a package). Found
# through __file__, so this also works when a bench script loads this file directly.
_SHARED = str(Path(__file__).resolve().parents[1] / "index_builder")
if _SHARED not in sys.path:
    sys.path.append(_SHARED)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """bundle A, bundle B (different id), the gallery rows and an index root built with A."""
    base = tmp_path_factory.mktemp("service-assets")
    bundle = make_bundle(base / "bundle")
    other = make_bundle(base / "other-bundle", bias=0.2)
    gallery = make_gallery(base / "gallery")
    build_version(base / "index", bundle, gallery)
    build_version(base / "photos", bundle, gallery, sides=("image",))
    return {
        "base": base,
        "bundle": bundle,
        "other": other,
        "gallery": gallery,
        "index": base / "index",
        "photos": base / "photos",  # the image side only: uncaptioned photos
    }


def wait_ready(client, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError("the service did not become ready")


class LiveServer:
    """uvicorn in a thread on a free loopback port (real sockets, real concurrency)."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=self.url) as client:
            wait_ready(client)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def live_server(app) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="session")
def live(assets) -> Iterator[LiveServer]:
    """One shared live server over the session's index (tests must not move its CURRENT)."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle=assets["bundle"].path, index=assets["index"], watch_interval_s=0)
    with live_server(create_app(settings)) as server:
        yield server


API_KEY, ADMIN_KEY = "fuzz-api-key", "fuzz-admin-key"


@pytest.fixture(scope="session")
def keyed_live(assets, tmp_path_factory) -> Iterator[LiveServer]:
    """A live server with an API key and an admin key (API_KEY, ADMIN_KEY) over a private
    copy of the index root, which /admin/reload may move."""
    from service.app import create_app
    from service.settings import Settings

    root = tmp_path_factory.mktemp("keyed") / "index"
    shutil.copytree(assets["index"], root)
    settings = Settings(
        bundle=assets["bundle"].path,
        index=root,
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        watch_interval_s=0.05,
    )
    with live_server(create_app(settings)) as server:
        yield server


@pytest.fixture
def serve():
    """`with serve(app) as server:` runs an app on a live port (server.url)."""
    return live_server


@pytest.fixture(scope="session")
def settings_for(assets):
    """Settings over the session's bundle and index, with overrides."""
    from service.settings import Settings

    def make(**overrides) -> Settings:
        values = {"bundle": assets["bundle"].path, "index": assets["index"], "watch_interval_s": 0}
        return Settings(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def client(settings_for) -> Iterator:
    """A TestClient (lifespan run, index loaded) over the session's bundle and index."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings_for())) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="session")
def open_client():
    """`with open_client(settings) as c:` a TestClient over a fresh app, ready unless told."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    @contextlib.contextmanager
    def opener(settings, ready: bool = True) -> Iterator:
        with TestClient(create_app(settings)) as test_client:
            if ready:
                wait_ready(test_client)
            yield test_client

    return opener


@pytest.fixture
def root(tmp_path, assets):
    """A private copy of the session index root (for tests that move its CURRENT)."""
    target = tmp_path / "index"
    shutil.copytree(assets["index"], target)
    return target


@pytest.fixture(scope="session")
def build(assets):
    """`build(root, bundle=None, store=None)` publishes a new version of the colour gallery
    under root, or into `store` (any backend's)."""

    def make(root: Path, bundle: Bundle | None = None, store=None) -> str:
        return build_version(root, bundle or assets["bundle"], assets["gallery"], store=store)

    return make


# -- videos: the colour towers over clips (meanP pooling graph), a mixed gallery ---------------

VIDEO_COLOURS = {"red": [(255, 0, 0)], "blue": [(0, 0, 255)], "green": [(0, 255, 0)]}


@pytest.fixture(scope="session")
def video_assets(assets) -> dict:
    """A video bundle (the colour towers + meanP) and an index of three one-colour clips, a
    red-then-blue clip and a photo, with the colour words as the text side."""
    from tiny_videos import colour_clip, video_bundle

    from index_builder.build import Sources, index_sources

    base = assets["base"] / "video"
    bundle = video_bundle(base / "bundle", assets["bundle"], frames=4)
    folder = base / "clips"
    folder.mkdir(parents=True)
    for name, colours in {**VIDEO_COLOURS, "redblue": [(255, 0, 0), (0, 0, 255)]}.items():
        (folder / f"{name}.mp4").write_bytes(colour_clip(colours, size=32, per=4))
        (folder / f"{name}.txt").write_text(f"a {name} clip\n")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "photo.png")
    texts = base / "texts.txt"
    texts.write_text("red\nblue\ngreen\nyellow\n")
    index_sources(base / "index", bundle, Sources(images=str(folder), texts=str(texts)))
    return {"bundle": bundle, "index": base / "index", "clips": folder}


@pytest.fixture(scope="session")
def video_client(video_assets) -> Iterator:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        bundle=video_assets["bundle"].path, index=video_assets["index"], watch_interval_s=0
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="session")
def video_live(video_assets) -> Iterator[LiveServer]:
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        bundle=video_assets["bundle"].path, index=video_assets["index"], watch_interval_s=0
    )
    with live_server(create_app(settings)) as server:
        yield server
