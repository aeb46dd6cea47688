"""A repeatable attack on the search service (issue 25 and the round before): one table.

    python -m bench.attack                                    # FAISS and milvus-lite
    python -m bench.attack --backends faiss --settle-seconds 10   # quicker, FAISS only

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
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.attack_cases import I2T, cases, image_form
from bench.attack_harness import Context, Server, build_assets, png, run_case, send
from bench.figure import Figure
from bench.tables import fmt, generic, table

ROOT = Path(__file__).resolve().parents[1]


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
        "command": shlex.join(["python", "-m", "bench.attack", *sys.argv[1:]]),
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


# -- report section (docs/benchmarks.md) --------------------------------------------------------


ATTACK_COLUMNS = [
    "backend",
    "case",
    "statuses",
    "max_bytes",
    "seconds",
    "health_max_ms",
    "fivexx",
    "state_5xx",
    "ready_200_in_5s",
    "search_after",
]


def attack_tables(data: Any) -> str:
    """bench/attack.py: the goals, then one row per case (the case's own figures, such as
    RSS or stray files, in a last column)."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return generic(data)
    verdict = {True: "PASS", False: "FAIL"}
    goals = [{**g, "pass": verdict.get(g.get("pass"), "n/a")} for g in data.get("goals", [])]
    rows = []
    for row in data["rows"]:
        extra = {k: v for k, v in row.items() if k not in ATTACK_COLUMNS and k not in SKIPPED}
        shown = {k: row.get(k) for k in ATTACK_COLUMNS}
        shown["statuses"] = " ".join(row.get("statuses") or [])
        rows.append({**shown, "also": _extras(extra)})
    return "\n\n".join(
        [table(goals, ["goal", "pass", "detail"]), table(rows, [*ATTACK_COLUMNS, "also"])]
    )


SKIPPED = {"requests", "max_request_s", "health_p50_ms", "health_failures", "transport_errors"}


def _extras(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in extra.items() if k not in ("ready_s",))


FIGURE = Figure(
    "Service attack (issue 25)",
    "attack*.json",
    "python -m bench.attack",
    note="Bad requests, a burst of maximum-size images, files truncated and a change "
    "killed under a running server (FAISS and milvus-lite, the colour towers): the "
    "issue's goals, then one row per case. `5xx` excludes the documented answers about "
    "the server's state (503 `index_corrupt`/`busy`, 507), counted in `state 5xx`. On "
    "the 2-core machine shared with a training job, /health during one maximum-size PNG "
    "varied from 10 to 45 ms over six runs (93 ms once), so that goal holds with little "
    "margin.",
    render=attack_tables,
)


if __name__ == "__main__":
    sys.exit(main())
