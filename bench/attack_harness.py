"""The harness of bench/attack.py: the server in a subprocess over the colour towers (FAISS or
milvus-lite), and running one case while a probe asks /health."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from index_builder import synthetic
from index_builder.backends import BackendConfig, open_store
from index_builder.bundle import Bundle

ADMIN = {"X-API-Key": "attack-admin"}
T2I = "/search/text-to-image"
# Answers about the server's state that docs/deploy.md documents (not a failure to handle input).
STATE_CODES = {"index_corrupt", "busy", "not_ready", "load_failed", "insufficient_storage"}


# -- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    """`cots serve` in a subprocess; `start` (again after a kill) waits for /ready."""

    bundle: Path
    root: Path
    env: dict[str, str]
    ready_seconds: float
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        command = [sys.executable, "-m", "index_builder.cli", "serve", "--bundle", str(self.bundle)]
        command += ["--index", str(self.root), "--port", str(self.port), "--log-level", "error"]
        self.process = subprocess.Popen(command, env={**os.environ, **self.env})
        deadline = time.monotonic() + self.ready_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            if ready_status(self.url, 1.0) == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready in {self.ready_seconds:g} s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def ready_status(url: str, timeout: float) -> int | None:
    try:
        return httpx.get(f"{url}/ready", timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def publish_milvus(root: Path, bundle: Path, gallery: list[dict[str, Any]], uri: str) -> None:
    store = open_store(root, BackendConfig("milvus", milvus_uri=uri))
    synthetic.build_version(root, Bundle.load(bundle), gallery, store=store)


def build_assets(work: Path, backend: str) -> tuple[Path, Path, dict[str, str]]:
    """The colour towers and their gallery published under an index root (FAISS) or into a
    milvus-lite file; returns the bundle, the root and the server's environment."""
    bundle = synthetic.make_bundle(work / "bundle")
    gallery = synthetic.make_gallery(work / "gallery")
    root = work / "index"
    env = {
        "COTS_ADMIN_KEY": ADMIN["X-API-Key"],
        "COTS_WATCH_INTERVAL_S": "0.2",
        "COTS_BACKEND": backend,
    }
    if backend == "milvus":
        env["COTS_MILVUS_URI"] = str(work / "milvus.db")
        # milvus-lite serves one process, and its lock lives as long as the process that
        # opened the file: publish from a child process, which exits before the server starts.
        child = multiprocessing.get_context("spawn").Process(
            target=publish_milvus, args=(root, bundle.path, gallery, env["COTS_MILVUS_URI"])
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"publishing into milvus-lite failed (exit {child.exitcode})")
    else:
        synthetic.build_version(root, bundle, gallery)
    return bundle.path, root, env


# -- a case -------------------------------------------------------------------------------------


def png(size: tuple[int, int], rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Sent:
    status: int | str  # the status, or the transport error's name
    code: str | None
    nbytes: int
    seconds: float


def send(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Sent:
    start = time.perf_counter()
    try:
        response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        return Sent(type(exc).__name__, None, 0, time.perf_counter() - start)
    code = None
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            body = response.json()
            code = body.get("code") if isinstance(body, dict) else None
        except ValueError:
            pass
    return Sent(response.status_code, code, len(response.content), time.perf_counter() - start)


class HealthProbe:
    """GET /health every 20 ms from its own thread and connection, while a case runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = http.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.failures += 1
                self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 2  # at least one answer, however short the case
        while not self.latencies and not self.failures and time.monotonic() < deadline:
            time.sleep(0.005)
        self._stop.set()
        self._thread.join()


@dataclass
class Context:
    """What a case may use: the server, its backend and index root, a client, the assets."""

    server: Server
    backend: str
    http: httpx.Client
    large: bytes
    notes: dict[str, Any] = field(default_factory=dict)


Case = Callable[[Context], list[Sent]]


def after_checks(server: Server) -> dict[str, Any]:
    """Whether /ready is 200 within 5 s, and whether a text search answers 200 then."""
    start = time.monotonic()
    ready = None
    while time.monotonic() - start < 5.0:
        ready = ready_status(server.url, 1.0)
        if ready == 200:
            break
        time.sleep(0.05)
    ready_s = round(time.monotonic() - start, 2)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        search = send(http, "POST", T2I, json={"text": "red"}).status
    return {"ready_200_in_5s": ready == 200, "ready_s": ready_s, "search_after": search}


def run_case(name: str, case: Case, ctx: Context) -> dict[str, Any]:
    with HealthProbe(ctx.server.url) as probe:
        start = time.perf_counter()
        sent = case(ctx)
        seconds = time.perf_counter() - start
    after = after_checks(ctx.server)
    fives = [s for s in sent if isinstance(s.status, int) and s.status >= 500]
    state = [s for s in fives if s.code in STATE_CODES]
    health = np.asarray(probe.latencies) * 1000
    row = {
        "case": name,
        "backend": ctx.backend,
        "statuses": sorted({f"{s.status}{':' + s.code if s.code else ''}" for s in sent}),
        "requests": len(sent),
        "max_bytes": max((s.nbytes for s in sent), default=0),
        "seconds": round(seconds, 2),
        "max_request_s": round(max((s.seconds for s in sent), default=0.0), 2),
        "health_p50_ms": round(float(np.percentile(health, 50)), 1) if len(health) else None,
        "health_max_ms": round(float(health.max()), 1) if len(health) else None,
        "health_failures": probe.failures,
        "fivexx": len(fives) - len(state),
        "state_5xx": len(state),
        "transport_errors": sum(isinstance(s.status, str) for s in sent),
        **after,
        **ctx.notes,
    }
    ctx.notes = {}
    return row
