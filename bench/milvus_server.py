"""How long the local Milvus server (`cots milvus start`) takes: the first start (unpacking the
wheel's binaries into an empty cache), later starts, a stop when idle and a stop after a
collection existed (Milvus 2.3.5 then outlasts its graceful stop and is killed), and its memory.

    python -m bench.milvus_server --starts 3 --out bench/results/milvus_server.json

Each start is timed from the call to a healthy /healthz. The calibration beside the figures: a
fixed pure-Python loop's time and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.figure import command_line
from index_builder.atomic import atomic_write_json
from index_builder.backends.milvus import server


def calibration() -> dict[str, float]:
    begun = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    loop_s = round(time.perf_counter() - begun, 3)
    return {"python_loop_s": loop_s, "loadavg_1m": os.getloadavg()[0]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise LookupError(f"no VmRSS for pid {pid}")


def timed_start(data: Path, cache: Path) -> tuple[server.State, float]:
    begun = time.perf_counter()
    bin_dir = server.binaries(cache)
    state = server.start(data, *server.free_ports(2), timeout=300, bin_dir=bin_dir)
    return state, time.perf_counter() - begun


def timed_stop(data: Path) -> float:
    begun = time.perf_counter()
    server.stop(data)
    return time.perf_counter() - begun


def with_collection(uri: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    client.create_collection("bench", dimension=8)
    client.insert("bench", [{"id": i, "vector": [float(i)] * 8} for i in range(100)])
    client.close()


def run(starts: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="milvus-bench-") as tmp:
        cache, data = Path(tmp) / "cache", Path(tmp) / "data"
        state, first = timed_start(data, cache)
        idle_rss = rss_mb(state.pid)
        stops_idle = [timed_stop(data)]
        later = []
        for _ in range(starts):
            state, seconds = timed_start(data, cache)
            later.append(seconds)
            stops_idle.append(timed_stop(data))
        state, seconds = timed_start(data, cache)
        later.append(seconds)
        with_collection(state.uri)
        stop_after_collection = timed_stop(data)
    return {
        "first_start_s": round(first, 2),
        "later_start_s": [round(s, 2) for s in later],
        "stop_idle_s": [round(s, 2) for s in stops_idle],
        "stop_after_a_collection_s": round(stop_after_collection, 2),
        "stop_grace_s": server.STOP_GRACE_S,
        "idle_rss_mb": idle_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="later starts to time")
    parser.add_argument("--out", type=Path, default=Path("bench/results/milvus_server.json"))
    args = parser.parse_args()
    before = calibration()
    figures = run(args.starts)
    result = {
        "command": command_line("milvus_server", sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "milvus": server.server_version(),
        "calibration_before": before,
        "calibration_after": calibration(),
        **figures,
    }
    print(json.dumps(result, indent=2))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
