"""A real tiny bundle and index (no torch): colour-aware ONNX towers over solid-colour images.

The image tower averages the normalised pixels per channel (so a red square embeds near
(1, -1, -1)); the text tower sums word embeddings where colour words sit at the same points.
"a red square" therefore retrieves the red image, and a red image retrieves red captions, so
the tests check ranking, not just shapes.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from index_builder.backends.base import IndexOptions
from index_builder.backends.faiss.store import IndexStore
from index_builder.bundle import Bundle
from index_builder.encoders import ImageEncoder, TextEncoder
from index_builder.preprocess import ImageSpec, TextSpec

# The tiny-bundle builder of tests/index_builder (a plain module there, not a package). Found
# through __file__, so this also works when a bench script loads this file directly.
_SHARED = str(Path(__file__).resolve().parents[1] / "index_builder")
if _SHARED not in sys.path:
    sys.path.append(_SHARED)
from tiny_bundles import save_bundle, text_graph  # noqa: E402

DIM = 8
SIZE = 8
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
FILLER = ("a", "an", "the", "of", "square", "photo", "colour")


def make_bundle(out: Path, bias: float = 0.1) -> Bundle:
    """image: per-channel pixel means -> 3 of DIM axes (+ bias) -> L2; text: colour words there."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((3, DIM), np.float32)
    weight[:, :3] = np.eye(3)
    offset = np.zeros(DIM, np.float32)
    offset[3] = bias  # keeps every embedding away from zero
    table = np.zeros((2 + len(COLOURS) + len(FILLER), DIM), np.float32)
    table[:, 3] = bias
    for i, rgb in enumerate(COLOURS.values()):
        table[2 + i, :3] = np.asarray(rgb) / 127.5 - 1  # the pixel values after (x-0.5)/0.5
    image = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[2, 3], keepdims=0),  # (B, 3)
            helper.make_node("MatMul", ["mean", "W"], ["proj"]),
            helper.make_node("Add", ["proj", "b"], ["shifted"]),
            helper.make_node("LpNormalization", ["shifted"], ["embedding"], axis=1, p=2),
        ],
        "image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(offset, "b"),
        ],
    )
    return save_bundle(
        out,
        image,
        text_graph(table),
        ImageSpec(size=SIZE, resize=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
        TextSpec(context_length=16),
        source="synthetic colour towers",
        words=[*COLOURS, *FILLER],
        lowercase=True,
    )


def colour_meta(rgb: tuple[int, int, int]) -> dict:
    """Metadata to filter on: the lit channels (a list), how many (a number), pure or mixed."""
    channels = [c for c, value in zip("rgb", rgb, strict=True) if value]
    return {"channels": channels, "brightness": len(channels), "pure": len(channels) == 1}


def make_gallery(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        path = out / f"{name}.png"
        Image.new("RGB", (32, 24), rgb).save(path)
        rows.append(
            {
                "id": name,
                "image": str(path),
                "captions": [f"a {name} square", name],
                "meta": colour_meta(rgb),
            }
        )
    return rows


def caption_rows(gallery: list[dict]) -> list[dict]:
    """The text side: each caption, with the image it describes and its style as metadata."""
    return [
        {
            "id": f"{row['id']}#{n}",
            "image_id": row["id"],
            "text": caption,
            "meta": {"style": "sentence" if " " in caption else "word"},
        }
        for row in gallery
        for n, caption in enumerate(row["captions"])
    ]


def build_version(
    root: Path, bundle: Bundle, gallery: list[dict], sides=("image", "text"), store=None
) -> str:
    """Embed the gallery with the bundle and publish a version through index_builder (only
    `sides`: an uncaptioned photo folder has no text side) under root, or into `store` (any
    backend's)."""
    texts = caption_rows(gallery)
    shards = {}
    if "image" in sides:
        shards["image"] = [
            ImageEncoder(bundle, threads=1).encode_paths([row["image"] for row in gallery])
        ]
    if "text" in sides:
        shards["text"] = [TextEncoder(bundle, threads=1).encode([row["text"] for row in texts])]
    store = store or IndexStore(root)
    exact = "Flat" if isinstance(store, IndexStore) else None  # Milvus: exact below 10k
    return store.publish(
        bundle_id=bundle.bundle_id,
        dim=bundle.embed_dim,
        shards=shards,
        rows={
            "image": gallery if "image" in sides else [],
            "text": texts if "text" in sides else [],
        },
        options=IndexOptions(factory=exact, use_gpu=False, queries=16),
        dataset={"name": "colours", "path": "synthetic", "fingerprint": "test"},
        bundle_path=bundle.path,
    )


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
