"""The server and the load generator of bench/service_load.py: `cots serve` in a subprocess,
its /metrics per stage, and keep-alive connections posting queries under a concurrency."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.service_assets import Queries

STAGES: tuple[tuple[str, str], ...] = (("decode", "image"), ("encode", "text"), ("search", "text"))
STAGES += (("encode", "image"), ("search", "image"))


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
    ms = np.asarray(latencies or [float("nan")]) * 1000  # nan: every request failed
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


def measure(port: int, args: argparse.Namespace, queries: Queries) -> dict[str, list]:
    """One load run per endpoint and concurrency of `args.concurrency`, each with the server's
    stage breakdown over the run."""
    url = f"http://127.0.0.1:{port}"
    endpoints: dict[str, list] = {}
    for endpoint in ("/search/text-to-image", "/search/image-to-text"):
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            before = scrape(url)
            result = asyncio.run(
                load(port, endpoint, concurrency, args.requests, args.max_seconds, args.k, queries)
            )
            result["server"] = stage_breakdown(before, scrape(url), endpoint)
            endpoints.setdefault(endpoint, []).append(result)
            print(f"{endpoint} c={concurrency}: {json.dumps(result)}", flush=True)
    return endpoints
