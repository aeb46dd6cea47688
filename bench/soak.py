"""Bounded loopback soak of the search service: a fixed mix of requests for N minutes.

    python -m bench.soak --minutes 3                          # the test suite's colour towers
    python -m bench.soak --bundle DIR --index ROOT --minutes 10   # a real bundle and index

The server runs in a subprocess (`cots serve` on 127.0.0.1, with an API key); this process
sends, from `--concurrency` clients, a weighted mix: text-to-image (single, batch, a deep page),
image-to-text (multipart, base64, a deep page), /info, /ready, thumbnails, and bad inputs that
must be refused (a thin image, malformed and deeply nested JSON, a bad k, no key). Every kind
has the status it must get; anything else (a 5xx, a transport error, another status) is an
error. Reported per minute: requests, errors, throughput, p50/p99 latency and the server's
resident memory; and the RSS at start (ready, before any request) and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.figure import Figure, Plot, pyplot, save
from bench.service_assets import demo_assets
from bench.service_client import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
TEXTS = ["a red square", "a photo of a blue square", "green", "the yellow colour", "black"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="bundle directory (omit for demo assets)")
    parser.add_argument("--index", type=Path, help="index root (omit for demo assets)")
    parser.add_argument(
        "--demo-images",
        type=int,
        default=2000,
        help="without --bundle/--index: the colour towers over this many synthetic images",
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to send requests")
    parser.add_argument("--bin-seconds", type=float, default=60.0, help="width of a report row")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--server-threads", type=int, default=1, help="COTS_INTRA_THREADS")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument(
        "--ready-seconds", type=float, default=120.0, help="how long the server may take to load"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/soak.json", help="JSON results"
    )
    return parser.parse_args(argv)


# -- the request mix -----------------------------------------------------------------------------


def _png(size: tuple[int, int], rgb: tuple[int, int, int] = (0, 0, 0), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, rgb if mode == "RGB" else 0).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Kind:
    """One kind of request: how often it is sent, what it sends, the status it must get."""

    name: str
    weight: float
    expected: int
    method: str
    path: str
    request: dict[str, Any]
    keyed: bool = True


def request_mix(image_ids: list[str]) -> list[Kind]:
    rng = np.random.default_rng(0)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = _png((64, 48), colour)  # type: ignore[arg-type]
    return good_requests(image_ids, image) + bad_requests(image)


def good_requests(image_ids: list[str], image: bytes) -> list[Kind]:
    """The searches and reads of the mix, each answered 200."""
    upload = {"image": ("q.png", image, "image/png")}
    return [
        Kind("t2i", 30, 200, "POST", "/search/text-to-image", {"json": {"text": TEXTS[0]}}),
        Kind("t2i_batch", 8, 200, "POST", "/search/text-to-image", {"json": {"texts": TEXTS}}),
        Kind(
            "t2i_deep_page",
            4,
            200,
            "POST",
            "/search/text-to-image",
            {"json": {"text": TEXTS[1], "k": 100, "offset": 900}},
        ),
        Kind("i2t_multipart", 20, 200, "POST", "/search/image-to-text", {"files": upload}),
        Kind(
            "i2t_base64",
            8,
            200,
            "POST",
            "/search/image-to-text",
            {"json": {"image": base64.b64encode(image).decode(), "k": 20}},
        ),
        Kind(
            "i2t_deep_page",
            3,
            200,
            "POST",
            "/search/image-to-text",
            {"files": upload, "data": {"k": "100", "offset": "900"}},
        ),
        Kind("info", 4, 200, "GET", "/info", {}),
        Kind("ready", 3, 200, "GET", "/ready", {}, keyed=False),
        Kind("thumbnail", 5, 200, "GET", f"/images/{image_ids[0]}", {"params": {"size": 64}}),
    ]


def bad_requests(image: bytes) -> list[Kind]:
    """The bad requests of the mix, each with the 4xx it must get."""
    thin = _png((1, 4000), mode="L")
    deep = b"[" * 50_000 + b"]" * 50_000
    as_json = {"Content-Type": "application/json"}
    upload = {"image": ("q.png", image, "image/png")}
    return [
        Kind(
            "bad_thin_image",
            3,
            422,
            "POST",
            "/search/image-to-text",
            {"files": {"image": ("t.png", thin, "image/png")}},
        ),
        Kind(
            "bad_json",
            3,
            400,
            "POST",
            "/search/text-to-image",
            {"content": b'{"text": "red"', "headers": as_json},
        ),
        Kind(
            "bad_nesting",
            2,
            400,
            "POST",
            "/search/image-to-text",
            {"content": deep, "headers": as_json},
        ),
        Kind(
            "bad_k",
            3,
            422,
            "POST",
            "/search/image-to-text",
            {"files": upload, "data": {"k": "--5"}},
        ),
        Kind("no_key", 4, 401, "POST", "/search/text-to-image", {"json": {"text": "red"}}, False),
    ]


# -- the server -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- the load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the soak began, when the request was sent
    seconds: float
    kind: str
    outcome: str  # the status, or the transport error's name
    ok: bool


async def soak(
    url: str, kinds: list[Kind], seconds: float, concurrency: int, seed: int, pid: int
) -> tuple[list[Sample], list[tuple[float, float]]]:
    """Send the mix for `seconds`; returns the samples and (time, RSS MB) every second."""
    samples: list[Sample] = []
    memory: list[tuple[float, float]] = []
    began = time.monotonic()
    rng = random.Random(seed)
    weights = [kind.weight for kind in kinds]

    async def client(http: httpx.AsyncClient) -> None:
        while (now := time.monotonic() - began) < seconds:
            kind = rng.choices(kinds, weights)[0]
            headers = {"X-API-Key": KEY} if kind.keyed else {}
            request = {**kind.request, "headers": {**headers, **kind.request.get("headers", {})}}
            start = time.perf_counter()
            try:
                response = await http.request(kind.method, kind.path, **request)
                outcome, ok = str(response.status_code), response.status_code == kind.expected
            except httpx.HTTPError as exc:
                outcome, ok = type(exc).__name__, False
            samples.append(Sample(now, time.perf_counter() - start, kind.name, outcome, ok))

    async def watch_memory() -> None:
        while (now := time.monotonic() - began) < seconds:
            memory.append((now, rss_mb(pid)))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await asyncio.gather(watch_memory(), *(client(http) for _ in range(concurrency)))
    return samples, memory


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if values else None


def summarise(
    samples: list[Sample], memory: list[tuple[float, float]], seconds: float, bin_s: float
) -> list[dict[str, Any]]:
    """One row per `bin_s` seconds: requests, errors, throughput, p50/p99 and RSS."""
    rows = []
    for start in np.arange(0.0, seconds, bin_s):
        end = min(seconds, start + bin_s)
        mine = [s for s in samples if start <= s.at < end]
        rss = [mb for at, mb in memory if start <= at < end]
        errors = Counter(f"{s.kind}:{s.outcome}" for s in mine if not s.ok)
        latencies = [s.seconds for s in mine]
        rows.append(
            {
                "minute": round(end / 60, 2),  # the row covers up to this minute
                "requests": len(mine),
                "errors": sum(errors.values()),
                "throughput_rps": round(len(mine) / (end - start), 1),
                "p50_ms": _ms(latencies, 50),
                "p99_ms": _ms(latencies, 99),
                "rss_max_mb": max(rss) if rss else None,
                "unexpected": dict(errors),
            }
        )
    return rows


def per_kind(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in dict.fromkeys(s.kind for s in samples):
        mine = [s for s in samples if s.kind == name]
        out[name] = {
            "requests": len(mine),
            "errors": sum(not s.ok for s in mine),
            "p50_ms": _ms([s.seconds for s in mine], 50),
            "p99_ms": _ms([s.seconds for s in mine], 99),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="cots-soak-") as tmp:
        if args.bundle and args.index:
            bundle, index, source = args.bundle, args.index, "given"
        else:
            bundle, index = demo_assets(Path(tmp), args.demo_images)
            source = f"demo: colour towers (tests/service/conftest.py), {args.demo_images} images"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(bundle, index, port, args, {"COTS_API_KEY": KEY})
        try:
            rss_start = rss_mb(server.pid)
            info = httpx.get(f"{url}/info", headers={"X-API-Key": KEY}).json()
            probe = httpx.post(
                f"{url}/search/text-to-image", json={"text": TEXTS[0]}, headers={"X-API-Key": KEY}
            ).json()
            kinds = request_mix([hit["id"] for hit in probe["hits"]])
            samples, memory = asyncio.run(
                soak(url, kinds, seconds, args.concurrency, args.seed, server.pid)
            )
            rss_end = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=20)
    minutes = summarise(samples, memory, seconds, args.bin_seconds)
    return {
        "assets": source,
        "gallery": info["gallery"],
        "index": {key: info["index"].get(key) for key in ("version", "sides")},
        "requests": len(samples),
        "errors": sum(not s.ok for s in samples),
        "seconds": seconds,
        "concurrency": args.concurrency,
        "intra_threads": args.server_threads,
        "bin_seconds": args.bin_seconds,
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "minutes": minutes,
        "kinds": per_kind(samples),
        "mix": {kind.name: {"weight": kind.weight, "expected": kind.expected} for kind in kinds},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "command": shlex.join(["python", "-m", "bench.soak", *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bool(args.bundle) != bool(args.index):
        raise SystemExit("give both --bundle and --index, or neither (demo assets)")
    if args.minutes <= 0 or args.bin_seconds <= 0 or args.concurrency < 1:
        raise SystemExit("--minutes and --bin-seconds must be positive, --concurrency at least 1")
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for row in results["minutes"]:
        print(json.dumps({k: v for k, v in row.items() if k != "unexpected"}))
    print(
        f"{results['requests']} requests, {results['errors']} errors; server RSS "
        f"{results['rss_start_mb']} MB at start, {results['rss_end_mb']} MB at the end"
    )
    print(f"wrote {args.out}")
    return 1 if results["errors"] else 0


def plot_soak(data: Any, out: Path) -> Path | None:
    rows = data.get("minutes", []) if isinstance(data, dict) else []
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("p99_ms"), int | float)]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    minutes = [r["minute"] for r in rows]
    for key in ("p50_ms", "p99_ms"):
        ax.plot(minutes, [r[key] for r in rows], "o-", label=key.replace("_ms", ""))
    ax.set_xlabel("minute")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left")
    rss = [r.get("rss_max_mb") for r in rows]
    if all(isinstance(v, int | float) for v in rss):
        twin = ax.twinx()
        twin.plot(minutes, rss, "k--", label="server RSS")
        twin.set_ylabel("server RSS (MB)")
        twin.set_ylim(0, max(rss) * 1.2)
        twin.legend(loc="upper right")
    return save(fig, out)


FIGURE = Figure(
    "Service soak",
    "soak*.json",
    "python -m bench.soak --minutes 3",
    (Plot("soak", plot_soak, "soak: p50/p99 latency and server RSS per minute"),),
)


if __name__ == "__main__":
    sys.exit(main())
