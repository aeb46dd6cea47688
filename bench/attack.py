"""A repeatable attack on the search service (issue 25 and the round before): one table.

    python bench/attack.py                                    # FAISS and milvus-lite
    python bench/attack.py --backends faiss --settle-seconds 10   # quicker, FAISS only

Each backend gets its own `cots serve` subprocess (127.0.0.1, an admin key) over the colour
towers of index_builder/synthetic.py. Each case sends its bad requests while a second thread
asks /health every 20 ms; then /ready must be 200 within 5 s and a text search must answer.
Recorded per case: the statuses, response bytes, seconds, /health latency during the case, and
the 5xx count. A 503 `index_corrupt`, `busy`, `not_ready` or `load_failed` and a 507
`insufficient_storage` are documented answers about the server's state, counted apart from
the 5xx (a truncated served version answers 503 `index_corrupt` until another version is
served: the case then reloads the previous one, as docs/deploy.md tells an operator to).
The goals of the issue are printed as PASS/FAIL lines; the results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from index_builder import synthetic
from index_builder.backends import BackendConfig, open_store
from index_builder.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"X-API-Key": "attack-admin"}
JSON = {"Content-Type": "application/json"}
BIG = "1" + "0" * 400  # 10**400: no float, no int64 holds it
DEEP = "[" * 100_000 + "]" * 100_000
T2I, T2T = "/search/text-to-image", "/search/text-to-text"
I2T, I2I = "/search/image-to-text", "/search/image-to-image"
# Answers about the server's state that docs/deploy.md documents (not a failure to handle input).
STATE_CODES = {"index_corrupt", "busy", "not_ready", "load_failed", "insufficient_storage"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--backends", default="faiss,milvus", help="comma-separated: faiss, milvus (milvus-lite)"
    )
    parser.add_argument(
        "--max-side", type=int, default=6300, help="side of the maximum-size PNG (pixels)"
    )
    parser.add_argument("--burst", type=int, default=16, help="maximum-size images sent at once")
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=60.0,
        help="wait after the burst before the server's RSS is measured again",
    )
    parser.add_argument(
        "--cases", default="", help="comma-separated parts of case names to run (default: all)"
    )
    parser.add_argument("--server-threads", type=int, default=1, help="COTS_INTRA_THREADS")
    parser.add_argument(
        "--ready-seconds", type=float, default=120.0, help="how long the server may take to load"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/attack.json", help="JSON results"
    )
    return parser.parse_args(argv)


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


# -- the cases ----------------------------------------------------------------------------------


def image_form(data: bytes = b"", **fields: str) -> dict[str, Any]:
    return {"files": {"image": ("q.png", data or png((16, 16)), "image/png")}, "data": fields}


def huge_int_meta(ctx: Context) -> list[Sent]:
    body = f'{{"texts": [{{"id": "big", "text": "x", "meta": {{"n": {BIG}}}}}]}}'.encode()
    return [
        send(ctx.http, "POST", "/admin/items", content=body, headers={**ADMIN, **JSON}),
        send(ctx.http, "POST", "/admin/items", headers=ADMIN, **image_form(meta=f'{{"n": {BIG}}}')),
    ]


def deep_filter(route: str) -> Case:
    return lambda ctx: [send(ctx.http, "POST", route, **image_form(filter=DEEP))]


def deep_admin(name: str) -> Case:
    form = image_form(**{name: DEEP})
    return lambda ctx: [send(ctx.http, "POST", "/admin/items", headers=ADMIN, **form)]


def huge_int_filter(route: str) -> Case:
    numeric = "brightness" if route in (T2I, I2I) else "style"  # a number, a string column
    specs = [BIG, *(f'{{"{op}": {BIG}}}' for op in ("eq", "gt", "gte", "lt", "lte"))]
    specs.append(f'{{"in": [{BIG}]}}')

    def case(ctx: Context) -> list[Sent]:
        sent = []
        for spec in specs:
            text = f'{{"{numeric}": {spec}}}'
            if route in (T2I, T2T):
                body = f'{{"text": "red", "filter": {text}}}'.encode()
                sent.append(send(ctx.http, "POST", route, content=body, headers=JSON))
            elif route == I2I:
                body = f'{{"id": "red", "filter": {text}}}'.encode()
                sent.append(send(ctx.http, "POST", route, content=body, headers=JSON))
                sent.append(send(ctx.http, "POST", route, **image_form(filter=text)))
            else:
                sent.append(send(ctx.http, "POST", route, **image_form(filter=text)))
        return sent

    return case


def million_batch(ctx: Context) -> list[Sent]:
    body = b'{"images": [' + b",".join([b"1"] * 1_000_000) + b"]}"
    return [send(ctx.http, "POST", I2T, content=body, headers=JSON)]


def max_image(ctx: Context) -> list[Sent]:
    return [send(ctx.http, "POST", I2T, **image_form(ctx.large))]


def burst(n: int, settle_s: float) -> Case:
    def case(ctx: Context) -> list[Sent]:
        pid = ctx.server.pid
        before = rss_mb(pid)
        peak = [before]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                peak.append(rss_mb(pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def one(_: int) -> Sent:
            with httpx.Client(base_url=ctx.server.url, timeout=120) as http:
                return send(http, "POST", I2T, **image_form(ctx.large))

        with ThreadPoolExecutor(n) as pool:
            sent = list(pool.map(one, range(n)))
        done.set()
        watcher.join()
        time.sleep(settle_s)
        after = rss_mb(pid)
        ctx.notes = {
            "rss_before_mb": before,
            "rss_peak_mb": max(peak),
            f"rss_after_{settle_s:g}s_mb": after,
            "rss_growth": round(after / before - 1, 3),
        }
        return sent

    return case


def truncate(name: str) -> Case:
    """Publish a fresh version (a text added), truncate one of its files under the running
    server and search every route; then the operator's recovery: put the file back and
    reload the version (/admin/reload)."""

    def case(ctx: Context) -> list[Sent]:
        http = ctx.http
        item = {"texts": [{"id": f"t-{name}", "text": "a red note"}]}
        added = http.post("/admin/items", json=item, headers=ADMIN).json()["index_version"]
        path = ctx.server.root / "versions" / added / name
        data = path.read_bytes()
        with open(path, "r+b") as handle:
            handle.truncate(128)
        sent = [send(http, "POST", route, json={"text": "red"}) for route in (T2I, T2T)]
        sent.append(send(http, "POST", I2I, json={"id": "red"}))
        sent.append(send(http, "POST", I2T, **image_form()))
        ready = send(http, "GET", "/ready")
        sent.append(ready)
        path.write_bytes(data)
        reload = send(http, "POST", "/admin/reload", json={"version": added}, headers=ADMIN)
        sent.append(reload)
        ctx.notes = {
            "ready_while_corrupt": f"{ready.status}:{ready.code}",
            "recovery": f"file restored, reload {reload.status}",
        }
        return sent

    return case


def _strays(ctx: Context, live: dict[str, bytes]) -> list[str]:
    """Files under <root>/files/ (stored by content hash) other than the uploads in `live`
    (id -> bytes) that the served version still has."""
    files = ctx.server.root / "files"
    kept = set()
    for item_id, data in live.items():
        if ctx.http.post(I2I, json={"id": item_id}).status_code == 200:
            kept.add(f"{hashlib.sha256(data).hexdigest()}.png")
    present = {p.name for p in files.iterdir() if p.is_file()} if files.is_dir() else set()
    return sorted(present - kept)


def kill_change(ctx: Context) -> list[Sent]:
    """kill -9 the server while a change with a maximum-size image is being encoded, start it
    again, make the next change, and count the files under <root>/files/ no version names."""
    files = ctx.server.root / "files"
    before = set(files.iterdir()) if files.is_dir() else set()
    form = image_form(ctx.large, ids='["killed"]')
    thread = threading.Thread(
        target=lambda: send(ctx.http, "POST", "/admin/items", headers=ADMIN, **form), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30  # until the upload is stored, then kill mid-change
    while time.monotonic() < deadline and not (files.is_dir() and set(files.iterdir()) - before):
        time.sleep(0.01)
    time.sleep(0.2)
    ctx.server.kill()
    thread.join()
    left = sorted(p.name for p in set(files.iterdir()) - before) if files.is_dir() else []
    ctx.server.start()
    nxt = send(
        ctx.http,
        "POST",
        "/admin/items",
        headers=ADMIN,
        json={"texts": [{"id": "after-kill", "text": "a blue note"}]},
    )
    strays = _strays(ctx, {"killed": ctx.large})
    ctx.notes = {"left_by_kill": len(left), "stray_after_next_change": len(strays)}
    return [nxt]


def deleted_upload(ctx: Context) -> list[Sent]:
    """An uploaded image deleted again: after enough changes that no kept version names it
    (and its file is older than the grace period, aged here by hand), the next change must
    remove its file."""
    sent = [
        send(
            ctx.http, "POST", "/admin/items", headers=ADMIN, **image_form(png((9, 9)), ids='["u"]')
        )
    ]
    sent.append(send(ctx.http, "POST", "/admin/delete", json={"ids": ["u"]}, headers=ADMIN))
    for i in range(4):  # past `keep` versions, so none still names the upload
        text = {"texts": [{"id": f"n{i}", "text": "red"}]}
        sent.append(send(ctx.http, "POST", "/admin/items", json=text, headers=ADMIN))
        if i == 2:
            hour_ago = time.time() - 7200
            for path in (ctx.server.root / "files").glob("*"):
                os.utime(path, (hour_ago, hour_ago))
    ctx.notes = {"stray_after_next_change": len(_strays(ctx, {}))}
    return sent


def loose(ctx: Context) -> list[Sent]:
    bodies = [{"text": "red", "k": True}, {"text": "red", "k": "5"}, {"text": "red", "k": 5.0}]
    sent = [send(ctx.http, "POST", T2I, json=body) for body in bodies]
    sent.append(send(ctx.http, "POST", T2I, json={"text": "red", "offset": "1"}))
    upsert = {"texts": [{"id": "t", "text": "red"}], "upsert": "yes"}
    sent.append(send(ctx.http, "POST", "/admin/items", json=upsert, headers=ADMIN))
    return sent


def cases(args: argparse.Namespace, backend: str) -> list[tuple[str, Case]]:
    out: list[tuple[str, Case]] = [
        ("huge_int_meta", huge_int_meta),
        ("deep_filter_i2i", deep_filter(I2I)),
        ("deep_filter_i2t", deep_filter(I2T)),
        ("deep_admin_ids", deep_admin("ids")),
        ("deep_admin_meta", deep_admin("meta")),
        *(
            (f"huge_int_filter_{r.rsplit('/', 1)[1]}", huge_int_filter(r))
            for r in (T2I, T2T, I2T, I2I)
        ),
        ("million_batch_i2t", million_batch),
        ("loose_coercion", loose),
        ("max_image", max_image),
        (f"burst_{args.burst}_max_images", burst(args.burst, args.settle_seconds)),
    ]
    if backend == "faiss":  # the files of a Milvus version live in Milvus
        out += [(f"truncate_{n}", truncate(n)) for n in ("image.npy", "images.jsonl", "text.npy")]
    # The deleted upload first: it ages every stored file past the grace period by hand.
    out += [("deleted_upload_collected", deleted_upload), ("kill9_change", kill_change)]
    wanted = [part for part in args.cases.split(",") if part]
    return [(name, case) for name, case in out if not wanted or any(w in name for w in wanted)]


# -- the run ------------------------------------------------------------------------------------


def attack(backend: str, args: argparse.Namespace, large: bytes) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"cots-attack-{backend}-") as tmp:
        bundle, root, env = build_assets(Path(tmp), backend)
        env |= {"COTS_INTRA_THREADS": str(args.server_threads)}
        env |= {"OMP_NUM_THREADS": str(args.server_threads)}
        server = Server(bundle, root, env, args.ready_seconds)
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                send(http, "POST", I2T, **image_form(large))  # warm: the first large decode
                ctx = Context(server, backend, http, large)
                for name, case in cases(args, backend):
                    row = run_case(name, case, ctx)
                    print(_line(row), flush=True)
                    rows.append(row)
        finally:
            server.stop()
    return rows


COLUMNS = [
    ("backend", 7),
    ("case", 30),
    ("statuses", 37),
    ("max_bytes", 9),
    ("seconds", 7),
    ("health_max_ms", 13),
    ("fivexx", 6),
    ("ready_200_in_5s", 15),
    ("search_after", 12),
]


def _line(row: dict[str, Any]) -> str:
    cells = []
    for name, width in COLUMNS:
        value = row.get(name)
        value = ",".join(value) if isinstance(value, list) else value
        cells.append(str(value).ljust(width))
    return " ".join(cells)


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The issue's goals: (goal, passed or None where no case measured it, what was seen)."""
    fives = sum(r["fivexx"] + r["transport_errors"] for r in rows)
    state = sum(r["state_5xx"] for r in rows)
    not_ready = [f"{r['backend']}/{r['case']}" for r in rows if not r["ready_200_in_5s"]]
    no_search = [f"{r['backend']}/{r['case']}" for r in rows if r["search_after"] != 200]
    single = [r for r in rows if not r["case"].startswith(("burst", "kill9", "deleted"))]
    worst = max(single, key=lambda r: r["health_max_ms"] or 0.0, default=None)
    growths = [r["rss_growth"] for r in rows if "rss_growth" in r]
    strays = {
        f"{r['backend']}/{r['case']}": r["stray_after_next_change"]
        for r in rows
        if "stray_after_next_change" in r
    }
    return [
        (
            "no 5xx over the cases",
            fives == 0,
            f"{fives} 5xx or transport errors; {state} documented state answers "
            "(503 index_corrupt/busy/not_ready/load_failed, 507) counted apart",
        ),
        ("/ready 200 within 5 s after each case", not not_ready, f"missed: {not_ready or 'none'}"),
        ("a search answers after each case", not no_search, f"missed: {no_search or 'none'}"),
        (
            "burst of maximum-size images: RSS within 20% of the start, later",
            max(growths) <= 0.2 if growths else None,
            f"largest growth {max(growths) if growths else None}",
        ),
        (
            "/health < 50 ms during any single bad request",
            worst["health_max_ms"] < 50 if worst else None,
            f"worst {worst['health_max_ms']} ms ({worst['backend']}/{worst['case']})"
            if worst
            else "not measured",
        ),
        (
            "no stray files under <root>/files/ after the next change",
            not any(strays.values()) if strays else None,
            f"strays {strays}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - {"faiss", "milvus"}:
        raise SystemExit("--backends takes faiss and/or milvus")
    large = png((args.max_side, args.max_side))
    print(" ".join(name.ljust(width) for name, width in COLUMNS))
    rows = [row for backend in backends for row in attack(backend, args, large)]
    checked = goals(rows)
    for name, ok, detail in checked:
        print(f"{({True: 'PASS', False: 'FAIL'}).get(ok, 'N/A ')}  {name}: {detail}")
    results = {
        "command": shlex.join(["python", "bench/attack.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "max_image": {"side": args.max_side, "png_bytes": len(large)},
        "rows": rows,
        "goals": [{"goal": n, "pass": ok, "detail": d} for n, ok, d in checked],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(ok is not False for _, ok, _ in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
