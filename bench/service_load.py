"""Load test of the search service: latency and throughput per endpoint, stages, floor, overhead.

    python -m bench.service_load --bundle DIR --index ROOT        # a real bundle and index
    python -m bench.service_load --demo-images 2000               # a synthetic torch-free pair
    python -m bench.service_load --bundle DIR --synthetic-gallery 1000000 \
        --synthetic-factory 'IVF{nlist},Flat'       # real towers, a million-item index

The server runs in a subprocess (`cots serve` on 127.0.0.1); this process is the load
generator (httpx, asyncio, bounded by a request count and a time limit per run). For each
endpoint and concurrency it reports client-side p50/p90/p99 latency and throughput, and from
the server's /metrics the mean time per stage (decode, encode, search) and micro-batch size.
The floor is one tower pass plus one index search measured in-process (no HTTP, no batching);
HTTP overhead = p50 at concurrency 1 minus the floor's p50.

--realistic-gallery N --real ROOTS... publishes N items per side sampled from
bench/realistic_gallery.py's model of the real embeddings under ROOTS; the queries are the
held-out real captions (text-to-image) and images (image-to-text), and each run also reports
the recall@10 of the hits served over HTTP against exact search of the same gallery.

--synthetic-gallery N publishes, through index_builder's own publish path and with the
bundle's id, a temporary index version of N clustered random unit vectors per side (each
caption vector a noisy copy of its image's, so recall tuning is meaningful) with synthetic
rows: the bundle's real towers encode the queries, FAISS searches an N-item index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.realistic_gallery import add_model_args, generated

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red square", "a photo of a blue square", "green", "the yellow colour", "black"]
STAGES = (("decode", "image"), ("encode", "text"), ("search", "text"))
STAGES += (("encode", "image"), ("search", "image"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="bundle directory (omit with --demo-images)")
    parser.add_argument(
        "--index", type=Path, help="index root (omit with --demo-images or --synthetic-gallery)"
    )
    parser.add_argument(
        "--synthetic-gallery",
        type=int,
        metavar="N",
        help="with --bundle and no --index: index N random unit vectors per side (images, "
        "captions) with synthetic rows in a temporary index root",
    )
    parser.add_argument(
        "--realistic-gallery",
        type=int,
        metavar="N",
        help="with --bundle, --real and no --index: index N items per side sampled from the "
        "model of the real embeddings (bench/realistic_gallery.py); held-out real queries",
    )
    add_model_args(parser, required=False)
    parser.add_argument(
        "--synthetic-factory",
        help="FAISS factory string for a synthetic or realistic gallery, {nlist} filled in for N "
        "(default: index_builder's automatic choice, HNSW32 from 10k to 1M items; "
        "IVF{nlist},Flat builds far faster at 1M)",
    )
    parser.add_argument(
        "--demo-images",
        type=int,
        default=1000,
        help="without --bundle/--index: build the test suite's colour towers and a synthetic "
        "gallery of this many images in a temporary directory",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the realistic gallery's index here and reuse it on the next run with the "
        "same gallery, factory and bundle (default: a temporary directory)",
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per run")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time limit per run")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client concurrency")
    parser.add_argument("--k", type=int, default=10, help="k per query")
    parser.add_argument("--server-threads", type=int, default=1, help="COTS_INTRA_THREADS")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="COTS_BATCH_WAIT_MS")
    parser.add_argument("--floor-reps", type=int, default=200, help="in-process floor repetitions")
    parser.add_argument(
        "--ready-seconds",
        type=float,
        default=120.0,
        help="how long the server may take to load the index and become ready",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/service_load.json", help="JSON results"
    )
    return parser.parse_args(argv)


# -- assets ------------------------------------------------------------------------------------


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


def synthetic_assets(work: Path, bundle_dir: Path, n: int, factory: str | None) -> Path:
    """An index root whose current version holds n synthetic items, built for the bundle."""
    from index_builder.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    check_factory(factory, n, bundle.embed_dim)
    images, captions = synthetic_vectors(n, bundle.embed_dim)
    return publish_vectors(work, bundle, images, captions, factory, f"synthetic-{n}")


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
) -> Path:
    """An index root whose current version holds the given image and caption vectors with
    synthetic rows (item i: id syn<i>, one caption), published with the bundle's id."""
    from index_builder.backends.base import IndexOptions, ivf_lists
    from index_builder.backends.faiss.store import IndexStore

    n = len(images)
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
    IndexStore(work / "index").publish(
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


def reusable(index: Path, name: str, bundle_id: str) -> bool:
    """Whether `index` (a kept --work directory's) already serves this gallery for this bundle."""
    from index_builder.backends.faiss.store import IndexStore

    try:
        info = IndexStore(index).read_info()
    except FileNotFoundError:
        return False
    return info["dataset"].get("name") == name and info["bundle_id"] == bundle_id


def realistic_assets(work: Path, args: argparse.Namespace) -> tuple[Path, bool, Queries]:
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
    reused = reusable(index, name, bundle.bundle_id)
    if reused:
        print(f"reusing the index under {index}", flush=True)
    else:
        publish_vectors(work, bundle, images, captions, args.synthetic_factory, name)
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


# -- in-process floor ----------------------------------------------------------------------------


def floor(
    bundle_dir: Path, index_root: Path, queries: Queries, k: int, reps: int, threads: int
) -> dict[str, Any]:
    """One tower pass plus one index search per query, no HTTP and no batching, on `threads`
    ONNX Runtime and FAISS threads."""
    import faiss

    from index_builder.backends.faiss.store import IndexStore
    from index_builder.bundle import Bundle
    from index_builder.encoders import ImageEncoder, TextEncoder
    from index_builder.preprocess import load_image, preprocess_images

    bundle = Bundle.load(bundle_dir)
    index = IndexStore(index_root).open(bundle=bundle)
    text, image = TextEncoder(bundle, threads=threads), ImageEncoder(bundle, threads=threads)
    faiss.omp_set_num_threads(threads)

    def t2i(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        vector = text.encode([queries.texts[i % len(queries.texts)]])
        t1 = time.perf_counter()
        index.search("image", vector, k)
        return {"encode": t1 - t0, "search": time.perf_counter() - t1}

    def i2t(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        data = queries.images[i % len(queries.images)]
        pixels = preprocess_images(
            [load_image(data, bundle.image_spec.background)], bundle.image_spec
        )
        t1 = time.perf_counter()
        vector = image.encode_pixels(pixels)
        t2 = time.perf_counter()
        index.search("text", vector, k)
        return {"decode": t1 - t0, "encode": t2 - t1, "search": time.perf_counter() - t2}

    result = {}
    for name, fn in (("text-to-image", t2i), ("image-to-text", i2t)):
        for i in range(5):
            fn(i)  # warm-up
        runs = [fn(i) for i in range(reps)]
        totals = np.asarray([sum(r.values()) for r in runs]) * 1000
        result[name] = {
            "p50_ms": round(float(np.percentile(totals, 50)), 3),
            "p99_ms": round(float(np.percentile(totals, 99)), 3),
            "stages_mean_ms": {
                s: round(float(np.mean([r[s] for r in runs])) * 1000, 3) for s in runs[0]
            },
        }
    result["gallery"] = {"images": len(index.images), "captions": len(index.texts)}
    sides = index.info["sides"]
    result["index"] = {
        "version": index.version,
        "factories": {side: sides[side]["factory"] for side in ("image", "text")},
        "search_params": {side: sides[side]["search_params"] for side in ("image", "text")},
        "recall_at_10": {side: sides[side]["recall_at_10"] for side in ("image", "text")},
        "build_seconds": {side: sides[side]["build_seconds"] for side in ("image", "text")},
    }
    dim = index.embed_dim
    result["raw_vectors_bytes"] = sum(4 * dim * len(index.rows(side)) for side in index.sides)
    return result


# -- server and load -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    bundle: Path, index: Path, port: int, args: argparse.Namespace, env: dict[str, str]
) -> subprocess.Popen:
    """`cots serve` in a subprocess with `args.server_threads` threads and the `COTS_*`
    settings in `env`, once it answers /ready (within `args.ready_seconds`)."""
    env = {
        **os.environ,
        "COTS_INTRA_THREADS": str(args.server_threads),
        "OMP_NUM_THREADS": str(args.server_threads),
        **env,
    }
    command = [sys.executable, "-m", "index_builder.cli", "serve", "--bundle", str(bundle)]
    command += ["--index", str(index), "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + args.ready_seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"the server did not become ready in {args.ready_seconds:g} s")


def memory(pid: int) -> dict[str, int]:
    """The server's resident memory (bytes): all of it, anonymous, and file pages mapped
    (memory-mapped vectors and rows the kernel can reclaim), and the peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def stage_breakdown(before: dict, after: dict, endpoint: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, modality in STAGES:
        count = _delta(after, before, "cots_stage_seconds_count", stage=stage, modality=modality)
        if count:
            total = _delta(after, before, "cots_stage_seconds_sum", stage=stage, modality=modality)
            out[f"{stage}_{modality}_mean_ms"] = round(total / count * 1000, 3)
            out[f"{stage}_{modality}_calls"] = int(count)
    for modality in ("text", "image"):
        calls = _delta(after, before, "cots_batch_size_count", modality=modality)
        if calls:
            queries = _delta(after, before, "cots_batch_size_sum", modality=modality)
            out[f"mean_batch_{modality}"] = round(queries / calls, 2)
    count = _delta(after, before, "cots_request_seconds_count", endpoint=endpoint)
    if count:
        total = _delta(after, before, "cots_request_seconds_sum", endpoint=endpoint)
        out["server_request_mean_ms"] = round(total / count * 1000, 3)
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection to the server on loopback, written on asyncio
    streams: the load generator shares the machine's two cores with the server, and this
    costs a fraction of an HTTP library's CPU per request (`client_cpu_ms_per_request`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """(status, body) of one POST; the response must carry a Content-Length."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def request_body(endpoint: str, queries: Queries, i: int, k: int) -> tuple[bytes, str]:
    """The body and content type of query i: a JSON text query or a multipart image upload."""
    if endpoint == "/search/text-to-image":
        text = queries.texts[i % len(queries.texts)]
        return json.dumps({"text": text, "k": k}).encode(), "application/json"
    boundary = "cotsbenchboundary"
    image = queries.images[i % len(queries.images)]
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return body + image + f"\r\n--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


async def load(
    port: int,
    endpoint: str,
    concurrency: int,
    requests: int,
    seconds: float,
    k: int,
    queries: Queries,
) -> dict:
    latencies: list[float] = []
    served: list[tuple[int, list[str]]] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.monotonic() + seconds
    bodies = [request_body(endpoint, queries, i, k) for i in range(min(requests, 1000))]

    async def worker(connection: Connection) -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            start = time.perf_counter()
            status, body = await connection.post(endpoint, *bodies[i % len(bodies)])
            if status == 200:
                latencies.append(time.perf_counter() - start)
                served.append((i % len(bodies), [hit["id"] for hit in json.loads(body)["hits"]]))
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    connections = [await Connection.open(port) for _ in range(concurrency)]
    try:
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(connection) for connection in connections))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        for connection in connections:
            connection.close()
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "recall_at_10": queries.recall(endpoint, served),
        # the load generator shares the machine's cores with the server
        "client_cpu_ms_per_request": round(1000 * cpu / max(1, len(latencies)), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    queries = Queries(QUERIES, [query_image()])
    with contextlib.ExitStack() as stack:
        tmp = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="cots-bench-"))
        if args.realistic_gallery:
            started = time.perf_counter()
            bundle = args.bundle
            index, reused, queries = realistic_assets(Path(tmp), args)
            built = "reused from --work" if reused else "published in"
            source = (
                f"realistic gallery: {args.realistic_gallery} items per side modelled on "
                f"{', '.join(str(p) for p in args.real)} (bench/realistic_gallery.py), factory "
                f"asked {args.synthetic_factory or 'automatic'}, {built} "
                f"{time.perf_counter() - started:.1f} s; held-out real queries"
            )
        elif args.synthetic_gallery:
            started = time.perf_counter()
            bundle = args.bundle
            index = synthetic_assets(
                Path(tmp), bundle, args.synthetic_gallery, args.synthetic_factory
            )
            source = (
                f"synthetic gallery: {args.synthetic_gallery} random unit vectors per side, "
                f"factory asked {args.synthetic_factory or 'automatic'}, published in "
                f"{time.perf_counter() - started:.1f} s"
            )
        elif args.bundle and args.index:
            bundle, index, source = args.bundle, args.index, "given"
        else:
            bundle, index = demo_assets(Path(tmp), args.demo_images)
            source = f"demo: colour towers (tests/service/conftest.py), {args.demo_images} images"
        reference = floor(bundle, index, queries, args.k, args.floor_reps, args.server_threads)
        port = free_port()
        settings = {"COTS_BATCH_WAIT_MS": str(args.batch_wait_ms), "COTS_WATCH_INTERVAL_S": "0"}
        server = start_server(bundle, index, port, args, settings)
        url = f"http://127.0.0.1:{port}"
        try:
            info = httpx.get(f"{url}/info").json()
            endpoints: dict[str, list] = {}
            for endpoint in ("/search/text-to-image", "/search/image-to-text"):
                for concurrency in [int(c) for c in args.concurrency.split(",")]:
                    before = scrape(url)
                    result = asyncio.run(
                        load(
                            port,
                            endpoint,
                            concurrency,
                            args.requests,
                            args.max_seconds,
                            args.k,
                            queries,
                        )
                    )
                    result["server"] = stage_breakdown(before, scrape(url), endpoint)
                    endpoints.setdefault(endpoint, []).append(result)
                    print(f"{endpoint} c={concurrency}: {json.dumps(result)}", flush=True)
            server_memory = memory(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=20)
    raw = reference.pop("raw_vectors_bytes")
    overhead = {}
    for endpoint, runs in endpoints.items():
        single = next((r for r in runs if r["concurrency"] == 1), None)
        if single:
            name = endpoint.rsplit("/", 1)[1]
            overhead[name] = round(single["p50_ms"] - reference[name]["p50_ms"], 3)
    return {
        "assets": source,
        "bundle_id": info["bundle"]["bundle_id"],
        "bundle": {key: info["bundle"][key] for key in ("embed_dim", "precision", "image_spec")},
        "index": reference.pop("index"),
        "gallery": reference.pop("gallery"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),  # other work sharing the CPUs
        },
        "settings": {
            "intra_threads": args.server_threads,
            "batch_wait_ms": args.batch_wait_ms,
            "k": args.k,
            "requests_per_run": args.requests,
            "max_seconds_per_run": args.max_seconds,
        },
        "floor_in_process": reference,
        "endpoints": endpoints,
        "http_overhead_p50_ms": overhead,
        "raw_vectors_bytes": raw,
        "server_memory_bytes": server_memory,
        "server_memory_over_raw_vectors": round(server_memory["VmRSS"] / raw, 3),
        "command": shlex.join(["python", "-m", "bench.service_load", *sys.argv[1:]]),
    }


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's goals against a run's figures (1M items per side on 2 cores), each with the
    stage that holds it when it is missed: the in-process floor's encode or search, or what
    HTTP, batching and the client add on top."""
    runs = {
        (endpoint.rsplit("/", 1)[1], run["concurrency"]): run
        for endpoint, endpoint_runs in result["endpoints"].items()
        for run in endpoint_runs
    }
    floor = result["floor_in_process"]
    rows = []

    def goal(name: str, measured: float | None, target: float, at_most: bool, stage: str) -> None:
        met = None if measured is None else (measured <= target if at_most else measured >= target)
        sign = "<=" if at_most else ">="
        rows.append(
            {
                "goal": f"{name} {sign} {target:g}",
                "measured": measured,
                "met": met,
                "held by": "" if met else stage,
            }
        )

    for name, p50, rps in (("text-to-image", 8, 300), ("image-to-text", 15, 120)):
        single, busy = runs.get((name, 1)), runs.get((name, 16))
        stages = floor[name]["stages_mean_ms"]
        slowest = max(stages, key=stages.get)
        if single:
            extra = single["p50_ms"] - floor[name]["p50_ms"]
            held = (
                f"floor {floor[name]['p50_ms']:.1f} ms (slowest stage {slowest} "
                f"{stages[slowest]:.1f} ms) + HTTP {extra:.1f} ms"
            )
            goal(f"{name} p50 at concurrency 1 (ms)", single["p50_ms"], p50, True, held)
            ratio = round(single["p50_ms"] / floor[name]["p50_ms"], 2)
            goal(f"{name} HTTP p50 / in-process floor", ratio, 1.3, True, "HTTP and batching")
            goal(f"{name} served recall@10", single["recall_at_10"], 0.95, False, "index search")
        if busy:
            server = busy["server"]
            cpu = {k: v for k, v in server.items() if k.endswith("_mean_ms") and "request" not in k}
            held = "per batch: " + ", ".join(f"{k[:-8]} {v:.1f} ms" for k, v in cpu.items())
            goal(f"{name} req/s at concurrency 16", busy["throughput_rps"], rps, False, held)
            if name == "text-to-image":
                goal(f"{name} p99 at concurrency 16 (ms)", busy["p99_ms"], 60, True, held)
    for side, seconds in result["index"]["build_seconds"].items():
        goal(f"{side} index build (s)", seconds, 120, True, "FAISS training and adding")
    goal(
        "service memory / raw vectors",
        result["server_memory_over_raw_vectors"],
        1.5,
        True,
        "index codes, rows and encoders",
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.realistic_gallery is not None:
        if not args.bundle or args.index or not args.real:
            raise SystemExit("--realistic-gallery needs --bundle and --real, and no --index")
    elif args.synthetic_gallery is not None:
        if not args.bundle or args.index:
            raise SystemExit("--synthetic-gallery needs --bundle and no --index")
        if args.synthetic_gallery < 1:
            raise SystemExit("--synthetic-gallery must be at least 1")
    elif bool(args.bundle) != bool(args.index):
        raise SystemExit("give both --bundle and --index, or neither (demo assets)")
    try:
        results = run(args)
    except ValueError as exc:  # a factory FAISS rejects, a bundle that does not load...
        raise SystemExit(f"service_load: error: {exc}") from None
    if args.realistic_gallery:
        results["goals"] = goals(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"floor: {json.dumps(results['floor_in_process'])}")
    print(f"HTTP overhead (p50, concurrency 1): {results['http_overhead_p50_ms']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
