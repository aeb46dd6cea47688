"""The galleries bench/service_load.py serves: the colour towers' demo gallery, a synthetic or
a realistic gallery published with a bundle's id, and the queries the load sends."""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.gallery_files import generated
from bench.service_backend import Backend

QUERIES = ["a red square", "a photo of a blue square", "green", "the yellow colour", "black"]


def demo_assets(work: Path, images: int) -> tuple[Path, Path]:
    """The colour towers of index_builder/synthetic.py over `images` random-colour squares."""
    from index_builder import synthetic as fixtures

    bundle = fixtures.make_bundle(work / "bundle")
    rng = np.random.default_rng(0)
    names = list(fixtures.COLOURS)
    anchors = np.asarray(list(fixtures.COLOURS.values()), np.float32)
    (work / "gallery").mkdir()
    rows = []
    for i in range(images):
        rgb = rng.integers(0, 256, 3)
        name = names[int(np.argmin(((anchors - rgb) ** 2).sum(1)))]
        path = work / "gallery" / f"{i:06d}.png"
        Image.new("RGB", (32, 32), tuple(int(c) for c in rgb)).save(path)
        rows.append(
            {"id": f"img{i:06d}", "image": str(path), "captions": [f"a {name} square", f"{name}"]}
        )
    fixtures.build_version(work / "index", bundle, rows)
    return bundle.path, work / "index"


def synthetic_vectors(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit "image" vectors and one unit "caption" vector near each image."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 200), dim)).astype(np.float32)
    images = np.empty((n, dim), np.float32)
    captions = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # chunks keep the temporaries small
        stop = min(n, start + 100_000)
        picked = centres[rng.integers(0, len(centres), stop - start)]
        images[start:stop] = picked + 0.6 * rng.standard_normal(picked.shape, dtype=np.float32)
        images[start:stop] /= np.linalg.norm(images[start:stop], axis=1, keepdims=True)
        captions[start:stop] = images[start:stop] + 0.5 * rng.standard_normal(
            picked.shape, dtype=np.float32
        )
        captions[start:stop] /= np.linalg.norm(captions[start:stop], axis=1, keepdims=True)
    return images, captions


def synthetic_assets(
    work: Path, bundle_dir: Path, n: int, factory: str | None, backend: Backend
) -> Path:
    """An index root whose current version holds n synthetic items, built for the bundle."""
    from index_builder.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    check_factory(factory, n, bundle.embed_dim)
    images, captions = synthetic_vectors(n, bundle.embed_dim)
    return publish_vectors(work, bundle, images, captions, factory, f"synthetic-{n}", backend)


def check_factory(factory: str | None, n: int, dim: int) -> None:
    """Fail on a factory FAISS rejects before any vectors are made."""
    from index_builder.backends.base import ivf_lists
    from index_builder.backends.faiss import faiss_index

    if factory:
        faiss_index.make_index(factory.format(nlist=ivf_lists(n)), dim)


def publish_vectors(
    work: Path,
    bundle: Any,
    images: np.ndarray,
    captions: np.ndarray,
    factory: str | None,
    name: str,
    backend: Backend,
) -> Path:
    """An index root whose current version holds the given image and caption vectors with
    synthetic rows (item i: id syn<i>, one caption), published with the bundle's id (the
    factory is FAISS's: Milvus chooses its index type itself)."""
    from index_builder.backends.base import IndexOptions, ivf_lists

    n = len(images)
    if backend.name != "faiss":
        factory = None
    if factory:
        factory = factory.format(nlist=ivf_lists(n))
    ids = [f"syn{i:07d}" for i in range(n)]
    texts = [f"synthetic caption {i}" for i in range(n)]
    rows = {
        "image": [
            {"id": id_, "image": f"synthetic/{id_}.png", "captions": [text], "meta": {}}
            for id_, text in zip(ids, texts, strict=True)
        ],
        "text": [
            {"id": f"{id_}#0", "image_id": id_, "text": text}
            for id_, text in zip(ids, texts, strict=True)
        ],
    }
    chunks = range(0, n, 100_000)
    backend.store(work / "index").publish(
        bundle_id=bundle.bundle_id,
        bundle_path=bundle.path,
        dim=bundle.embed_dim,
        shards={
            "image": [images[i : i + 100_000] for i in chunks],
            "text": [captions[i : i + 100_000] for i in chunks],
        },
        rows=rows,
        options=IndexOptions(factory=factory),
        dataset={"name": name, "path": "synthetic", "fingerprint": f"seed0-{n}"},
    )
    return work / "index"


@dataclass
class Queries:
    """What the load sends: caption texts and image files, and for a realistic gallery the
    exact top-10 item numbers of each (text-to-image: over the images; image-to-text: over
    the captions), to score the served hits."""

    texts: list[str]
    images: list[bytes]
    text_truth: np.ndarray | None = None
    image_truth: np.ndarray | None = None

    def recall(self, endpoint: str, served: list[tuple[int, list[str]]]) -> float | None:
        """Recall@10 of the served hits (query number, hit ids) against exact search."""
        truth = self.text_truth if endpoint.endswith("text-to-image") else self.image_truth
        if truth is None or not served:
            return None
        hits = [
            len(
                {int(h.removeprefix("syn").split("#")[0]) for h in ids} & set(truth[i % len(truth)])
            )
            for i, ids in served
        ]
        return round(sum(hits) / (len(served) * truth.shape[1]), 4)


def reusable(index: Path, name: str, bundle_id: str, backend: Backend) -> bool:
    """Whether `index` (a kept --work directory's) already serves this gallery for this bundle."""
    try:
        info = backend.store(index).read_info()
    except FileNotFoundError:
        return False
    return info["dataset"].get("name") == name and info["bundle_id"] == bundle_id


def realistic_assets(
    work: Path, args: argparse.Namespace, backend: Backend
) -> tuple[Path, bool, Queries]:
    """An index of a realistic gallery (bench/realistic_gallery.py) and held-out real queries:
    up to 1000 captions and 200 images, with their exact top 10; and whether the index was
    reused from an earlier run's --work."""
    from index_builder.backends.recall import exact_knn
    from index_builder.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    check_factory(args.synthetic_factory, args.realistic_gallery, bundle.embed_dim)
    model_args = argparse.Namespace(
        real=args.real, clusters=args.clusters, rank=args.rank, size=args.realistic_gallery
    )
    images, captions, held_out = generated(model_args)
    name = f"realistic-{len(images)}-{args.synthetic_factory or 'automatic'}"
    index = work / "index"
    reused = reusable(index, name, bundle.bundle_id, backend)
    if reused:
        print(f"reusing the index under {index}", flush=True)
    else:
        publish_vectors(work, bundle, images, captions, args.synthetic_factory, name, backend)
    rng = np.random.default_rng(0)
    texts = rng.permutation(len(held_out.texts))[:1000]
    files = rng.permutation(len(held_out.image_files))[:200]
    return (
        index,
        reused,
        Queries(
            texts=[held_out.texts[i] for i in texts],
            images=[Path(held_out.image_files[i]).read_bytes() for i in files],
            text_truth=exact_knn(held_out.captions[texts], [images], 10),
            image_truth=exact_knn(held_out.images[files], [captions], 10),
        ),
    )


def query_image() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (224, 224, 3), np.uint8)).save(
        out, "PNG"
    )
    return out.getvalue()


def assets(
    args: argparse.Namespace, tmp: Path, backend: Backend
) -> tuple[Path, Path, Queries, str]:
    """The bundle, the index root and the queries a run serves, and a line saying where the
    gallery comes from (Milvus: a synthetic or realistic gallery, or a given index)."""
    queries = Queries(QUERIES, [query_image()])
    started = time.perf_counter()
    if args.realistic_gallery:
        index, reused, queries = realistic_assets(tmp, args, backend)
        built = "reused from --work" if reused else "published in"
        source = (
            f"realistic gallery: {args.realistic_gallery} items per side modelled on "
            f"{', '.join(str(p) for p in args.real)} (bench/realistic_gallery.py), factory "
            f"asked {args.synthetic_factory or 'automatic'}, {built} "
            f"{time.perf_counter() - started:.1f} s; held-out real queries"
        )
        return args.bundle, index, queries, source
    if args.synthetic_gallery:
        index = synthetic_assets(
            tmp, args.bundle, args.synthetic_gallery, args.synthetic_factory, backend
        )
        source = (
            f"synthetic gallery: {args.synthetic_gallery} random unit vectors per side, "
            f"factory asked {args.synthetic_factory or 'automatic'}, published in "
            f"{time.perf_counter() - started:.1f} s"
        )
        return args.bundle, index, queries, source
    if args.bundle and args.index:
        return args.bundle, args.index, queries, "given"
    if backend.name != "faiss":
        raise SystemExit("--backend milvus serves a --synthetic-gallery, --realistic-gallery "
                         "or given --index, not the demo")  # fmt: skip
    bundle, index = demo_assets(tmp, args.demo_images)
    source = f"demo: colour towers (tests/service/conftest.py), {args.demo_images} images"
    return bundle, index, queries, source
