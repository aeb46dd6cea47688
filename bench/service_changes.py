"""The changes of bench/service_load.py: a 1% upsert of captions and a 1% delete of images
(with their captions) through the admin API, in requests of BATCH items, while text-to-image
load runs at concurrency 16; the time each took and the search requests that failed."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

from bench.service_assets import Queries
from bench.service_client import load

BATCH = 1000  # items per admin request (the JSON body's value limit)
KEY = "bench-admin"  # COTS_ADMIN_KEY of the served bench
CONCURRENCY = 16


def changes_under_load(
    port: int, queries: Queries, gallery: dict[str, int], fraction: float, k: int
) -> dict[str, Any]:
    """Upsert `fraction` of the captions (new texts: the server encodes them) and delete
    `fraction` of the images (other items than the upserted ones), each under load."""
    count = max(1, int(fraction * min(gallery["images"], gallery["captions"])))
    upserts = [
        {"texts": [{"id": f"syn{i:07d}#0", "text": f"a changed caption {i}"} for i in chunk],
         "upsert": True}
        for chunk in _chunks(range(count))
    ]  # fmt: skip
    deletes = [
        {"ids": [f"syn{i:07d}" for i in chunk]} for chunk in _chunks(range(count, 2 * count))
    ]
    result: dict[str, Any] = {"items": count, "batch": BATCH}
    for name, path, bodies in (
        ("upsert", "/admin/items", upserts),
        ("delete", "/admin/delete", deletes),
    ):
        result[name] = under_load(port, queries, k, path, bodies)
        print(f"{name} of {count} items under load: {result[name]}", flush=True)
    return result


def under_load(
    port: int, queries: Queries, k: int, path: str, bodies: list[dict]
) -> dict[str, Any]:
    """Send `bodies` one after another in a thread while text-to-image load runs; each
    request's time and the whole."""
    outcome: dict[str, Any] = {"statuses": {}, "request_seconds": []}

    def send() -> None:
        started = time.perf_counter()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for body in bodies:
                sent = time.perf_counter()
                status = client.post(path, json=body, headers={"X-API-Key": KEY}).status_code
                outcome["request_seconds"].append(round(time.perf_counter() - sent, 3))
                outcome["statuses"][str(status)] = outcome["statuses"].get(str(status), 0) + 1
        outcome["seconds"] = round(time.perf_counter() - started, 3)

    thread = threading.Thread(target=send)
    thread.start()
    served, failed = 0, 0
    while thread.is_alive():  # load in 1-second runs until the change is done
        run = asyncio.run(load(port, "/search/text-to-image", CONCURRENCY, 10**9, 1.0, k, queries))
        served += run["requests"]
        failed += sum(run["errors"].values())
    thread.join()
    return {**outcome, "searches_served": served, "searches_failed": failed}


def _chunks(items: range) -> list[range]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def change_rows(changes: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per change for the report."""
    return [
        {
            "change": name,
            "items": changes["items"],
            "requests": ", ".join(f"{n} x {s}" for s, n in changes[name]["statuses"].items()),
            "seconds": changes[name].get("seconds"),
            "slowest request s": max(changes[name].get("request_seconds") or [0]) or None,
            "searches served meanwhile": changes[name]["searches_served"],
            "searches failed": changes[name]["searches_failed"],
        }
        for name in ("upsert", "delete")
    ]
