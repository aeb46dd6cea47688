"""The cases of bench/attack.py: each sends its bad requests (or truncates, kills, deletes)
under a running server and returns what it sent."""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.attack_harness import ADMIN, T2I, Case, Context, Sent, png, rss_mb, send

JSON = {"Content-Type": "application/json"}
BIG = "1" + "0" * 400  # 10**400: no float, no int64 holds it
DEEP = "[" * 100_000 + "]" * 100_000
T2T = "/search/text-to-text"
I2T, I2I = "/search/image-to-text", "/search/image-to-image"


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
