"""FAISS against a Milvus server behind the same service, in one command (issue #24): the
service load test (bench/service_load.py) run on the same gallery and held-out queries with
--backend faiss, then --backend milvus, and the two side by side with the issue's goals as
ratios measured in this one run.

    python -m bench.service_backends --bundle cots-data/bundles/demo \\
        --realistic-gallery 1000000 --real cots-data/real-embeddings/openclipart \\
        cots-data/real-embeddings/emoji cots-data/real-embeddings/synthetic \\
        --changes 0.01 --work work1m --out bench/results/service_backends-1m.json

Every service_load option applies to both runs (--work keeps one directory per backend: the
FAISS index, and the Milvus server's data and work files).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench import service_load
from bench.figure import Figure, command_line
from bench.tables import table

T2I, I2T = "/search/text-to-image", "/search/image-to-text"


def at(result: dict[str, Any], endpoint: str, concurrency: int) -> dict[str, Any]:
    runs = result["endpoints"].get(endpoint, [])
    return next((r for r in runs if r["concurrency"] == concurrency), {})


def side_by_side(result: dict[str, Any]) -> dict[str, Any]:
    """One backend's figures the issue compares."""
    changes = result.get("changes_under_load") or {}
    memory = result["server_memory_bytes"]["VmRSS"]
    milvus = (result.get("milvus_server_memory_bytes") or {}).get("VmRSS", 0)
    return {
        "backend": result["backend"],
        "t2i recall@10": at(result, T2I, 1).get("recall_at_10"),
        "i2t recall@10": at(result, I2T, 1).get("recall_at_10"),
        "t2i p50 ms (c=1)": at(result, T2I, 1).get("p50_ms"),
        "i2t p50 ms (c=1)": at(result, I2T, 1).get("p50_ms"),
        "t2i req/s (c=16)": at(result, T2I, 16).get("throughput_rps"),
        "t2i p99 ms (c=16)": at(result, T2I, 16).get("p99_ms"),
        "t2i encode ms (floor)": result["floor_in_process"]["text-to-image"]["stages_mean_ms"][
            "encode"
        ],
        "build s (image, text)": tuple(result["index"]["build_seconds"].values()),
        "service RSS MiB": round(memory / 2**20),
        "Milvus RSS MiB": round(milvus / 2**20) if milvus else None,
        "upsert 1% s": (changes.get("upsert") or {}).get("seconds"),
        "delete 1% s": (changes.get("delete") or {}).get("seconds"),
        "slowest delete of 1k s": max((changes.get("delete") or {}).get("request_seconds") or [0])
        or None,
        "failed searches during changes": sum(
            (changes.get(name) or {}).get("searches_failed", 0) for name in ("upsert", "delete")
        ),
    }


def goals(faiss: dict[str, Any], milvus: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #24's goals: Milvus recall, and Milvus against FAISS in this run."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    rows = [
        ("Milvus t2i served recall@10 >= 0.95", milvus["t2i recall@10"], 0.95, False),
        ("Milvus i2t served recall@10 >= 0.95", milvus["i2t recall@10"], 0.95, False),
        (
            "Milvus t2i p50 (c=1) / FAISS's <= 2",
            ratio(milvus["t2i p50 ms (c=1)"], faiss["t2i p50 ms (c=1)"]),
            2.0,
            True,
        ),
        (
            "Milvus t2i req/s (c=16) / FAISS's >= 0.5",
            ratio(milvus["t2i req/s (c=16)"], faiss["t2i req/s (c=16)"]),
            0.5,
            False,
        ),
        ("failed searches during Milvus changes == 0",
         milvus["failed searches during changes"], 0, True),
    ]  # fmt: skip
    return [
        {
            "goal": name,
            "measured": value,
            "met": None if value is None else (value <= target if most else value >= target),
        }
        for name, value, target, most in rows
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = service_load.parse_args(argv)
    if "--out" not in argv:  # not service_load's default file
        args.out = service_load.ROOT / "bench/results/service_backends.json"
    if not (args.realistic_gallery or args.synthetic_gallery):
        raise SystemExit("service_backends needs --synthetic-gallery or --realistic-gallery")
    work, runs = args.work, {}
    for name in ("faiss", "milvus"):
        args.backend = name
        args.work = work / name if work else None
        runs[name] = service_load.run(args)
    compared = {name: side_by_side(result) for name, result in runs.items()}
    result = {
        "command": command_line("service_backends", argv),
        "assets": runs["faiss"]["assets"],
        "machine": runs["milvus"]["machine"],
        "side_by_side": list(compared.values()),
        "goals": goals(compared["faiss"], compared["milvus"]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["side_by_side"]))
    print(table(result["goals"]))
    print(f"wrote {args.out}")
    return 0


def render(data: dict[str, Any]) -> str:
    rows = [{**g, "met": {True: "yes", False: "no", None: "n/a"}[g["met"]]} for g in data["goals"]]
    return (
        f"{data['assets']}\n\nGoals (issue #24; ratios from this one run):\n\n{table(rows)}\n\n"
        f"Side by side:\n\n{table(data['side_by_side'])}"
    )


FIGURE = Figure(
    "Service on FAISS against a Milvus server (issue #24)",
    "service_backends*.json",
    "python -m bench.service_backends --bundle cots-data/bundles/demo --realistic-gallery "
    "1000000 --real cots-data/real-embeddings/openclipart cots-data/real-embeddings/emoji "
    "cots-data/real-embeddings/synthetic --changes 0.01 --work work1m "
    "--out bench/results/service_backends-1m.json",
    render=render,
)


if __name__ == "__main__":
    raise SystemExit(main())
