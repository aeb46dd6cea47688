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

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import calibration
from bench.figure import Figure, Plot, barh, note
from bench.realistic_gallery import add_model_args
from bench.service_assets import assets
from bench.service_backend import add_backend_args, backend
from bench.service_changes import CONCURRENCY, KEY, change_rows, changes_under_load
from bench.service_client import free_port, measure, memory, start_server
from bench.service_floor import floor
from bench.tables import fmt, generic, table

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_gallery_args(parser)
    add_load_args(parser)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/service_load.json", help="JSON results"
    )
    return parser.parse_args(argv)


def add_gallery_args(parser: argparse.ArgumentParser) -> None:
    """What is served: a bundle and an index, or a gallery made for the run."""
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
    add_backend_args(parser)
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
    parser.add_argument(
        "--changes",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="after the load runs, upsert and delete this fraction of a synthetic or realistic "
        "gallery through the admin API under text-to-image load (e.g. 0.01)",
    )


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """How the served gallery is loaded: requests, concurrency, server settings."""
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="cots-bench-"))
        chosen = stack.enter_context(backend(args, Path(tmp)))
        bundle, index, queries, source = assets(args, Path(tmp), chosen)
        reference = floor(
            bundle, index, queries, args.k, args.floor_reps, args.server_threads, chosen
        )
        port = free_port()
        settings = {"COTS_BATCH_WAIT_MS": str(args.batch_wait_ms), "COTS_WATCH_INTERVAL_S": "0"}
        if args.changes:
            settings["COTS_ADMIN_KEY"] = KEY
        server = start_server(bundle, index, port, args, {**settings, **chosen.settings()})
        try:
            info = httpx.get(f"http://127.0.0.1:{port}/info").json()
            endpoints = measure(port, args, queries)
            changes = None
            if args.changes:
                gallery, fraction = reference["gallery"], args.changes
                changes = changes_under_load(port, queries, gallery, fraction, args.k)
            server_memory = memory(server.pid)
            milvus_memory = memory(chosen.server_pid) if chosen.server_pid else None
        finally:
            server.terminate()
            server.wait(timeout=20)
    raw = reference.pop("raw_vectors_bytes")
    return {
        "assets": source,
        "backend": chosen.name,
        "bundle_id": info["bundle"]["bundle_id"],
        "bundle": {key: info["bundle"][key] for key in ("embed_dim", "precision", "image_spec")},
        "index": reference.pop("index"),
        "gallery": reference.pop("gallery"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),  # other work sharing the CPUs
            **calibration.rates(),  # the GEMM and faiss rates the timings ran at
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
        "http_overhead_p50_ms": overhead(endpoints, reference),
        "raw_vectors_bytes": raw,
        "server_memory_bytes": server_memory,
        "milvus_server_memory_bytes": milvus_memory,
        "changes_under_load": changes,  # the Milvus server this run started
        "server_memory_over_raw_vectors": round(server_memory["VmRSS"] / raw, 3),
        "command": shlex.join(["python", "-m", "bench.service_load", *sys.argv[1:]]),
    }


def overhead(endpoints: dict[str, list], reference: dict[str, Any]) -> dict[str, float]:
    """Per endpoint: p50 at concurrency 1 minus the in-process floor's p50 (ms)."""
    out = {}
    for endpoint, runs in endpoints.items():
        single = next((r for r in runs if r["concurrency"] == 1), None)
        if single:
            name = endpoint.rsplit("/", 1)[1]
            out[name] = round(single["p50_ms"] - reference[name]["p50_ms"], 3)
    return out


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


# -- report section (docs/benchmarks.md) --------------------------------------------------------


def _params(value: Any) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) if isinstance(value, dict) else ""


def service_tables(data: Any) -> str:
    """service_load: issue 13's goals first when the run checked them, then the index each
    side served and the server's memory when recorded, then everything else (generic)."""
    if not isinstance(data, dict):
        return generic(data)
    parts, shown = [], {"goals"}
    if data.get("goals"):
        rows = [{**goal, "met": "yes" if goal.get("met") else "no"} for goal in data["goals"]]
        parts.append(
            "#### Goals (issue 13)\n\n" + table(rows, ["goal", "measured", "met", "held by"])
        )
    index = data.get("index", {})
    if isinstance(index.get("build_seconds"), dict):
        parts.append("Index served, tuned at build:\n\n" + table(served_index_rows(index)))
        shown.add("index")
    memory = data.get("server_memory_bytes")
    if isinstance(memory, dict):
        parts.append(memory_line(data, memory))
        shown |= {"server_memory_bytes", "raw_vectors_bytes", "server_memory_over_raw_vectors"}
    if data.get("changes_under_load"):
        title = f"Changes under text-to-image load (concurrency {CONCURRENCY}, admin API):"
        parts.append(f"{title}\n\n" + table(change_rows(data["changes_under_load"])))
        shown.add("changes_under_load")
    parts.append(generic({k: v for k, v in data.items() if k not in shown}))
    return "\n\n".join(parts)


def served_index_rows(index: dict) -> list[dict[str, Any]]:
    """One row per side of a service_load index: factory, tuned setting, recall, build time."""
    sides = index.get("factories", {})
    return [
        {
            "side": side,
            "factory": factory,
            "search params": _params(index.get("search_params", {}).get(side)),
            "recall@10 at build": index.get("recall_at_10", {}).get(side),
            "build s": index["build_seconds"].get(side),
        }
        for side, factory in sides.items()
    ]


def memory_line(data: dict, memory: dict) -> str:
    sizes = ", ".join(f"{key} {fmt(value / 1e6)} MB" for key, value in memory.items())
    raw = data.get("raw_vectors_bytes")
    raw_text = f"; raw vectors {fmt(raw / 1e6)} MB" if isinstance(raw, int) else ""
    ratio = data.get("server_memory_over_raw_vectors")
    ratio_text = f", server memory / raw vectors = {fmt(ratio)}" if ratio is not None else ""
    return f"Server memory: {sizes}{raw_text}{ratio_text}."


def plot_service(data: Any, out: Path) -> Path | None:
    endpoints = data.get("endpoints", {}) if isinstance(data, dict) else {}
    labels, values = [], []
    for endpoint, runs in endpoints.items():
        for run in runs if isinstance(runs, list) else []:
            if isinstance(run, dict) and isinstance(run.get("p50_ms"), int | float):
                labels.append(f"{endpoint} c={run.get('concurrency')}")
                values.append(run["p50_ms"])
    return barh(labels, values, "p50 latency (ms)", out)


FIGURE = Figure(
    "Service load",
    "service_load*.json",
    "python -m bench.service_load --demo-images 2000",
    (Plot("service", plot_service, "service p50 latency per endpoint and concurrency"),),
    note=note("service_load"),
    render=service_tables,
)


if __name__ == "__main__":
    sys.exit(main())
