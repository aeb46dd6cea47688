"""`cots milvus start|status|stop`: a local Milvus server on loopback for `--backend milvus`
(`index_builder.backends.milvus.server`)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from index_builder.backends.milvus import server

NOT_RUNNING = 3  # the exit status of `status` when no server runs (as LSB init scripts say)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "milvus",
        help="start, check or stop a local Milvus server",
        description="A local Milvus 2.3.5 standalone server (the `milvus` wheel: embedded etcd, "
        "local storage) on 127.0.0.1, for `--backend milvus --milvus-uri http://127.0.0.1:PORT`. "
        "Its data, configuration, log (logs/server.log) and state live in --data-dir.",
    )
    parser.add_argument(
        "action", choices=("start", "status", "stop"), help="what to do with the server"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the server's directory (default $COTS_HOME/milvus, COTS_HOME defaults to "
        "./cots-data)",
    )
    parser.add_argument(
        "--port", type=int, default=server.DEFAULT_PORT, help="gRPC port (default 19530)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=server.DEFAULT_METRICS_PORT,
        help="port of /healthz and /metrics (default 9091)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=server.START_TIMEOUT_S,
        help="seconds start waits for the server to become healthy (default 120)",
    )
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="start: stay attached until the server exits, stopping it on SIGTERM or Ctrl-C "
        "(for a supervisor: systemd, a container)",
    )
    parser.set_defaults(func=run)


def say(line: str) -> None:
    print(f"cots milvus: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or server.default_data_dir()
    try:
        if args.action == "start":
            return start(args, data_dir)
        if args.action == "stop":
            state = server.stop(data_dir)
            print(f"stopped Milvus (pid {state.pid})" if state else "no Milvus server runs")
            return 0
        return report(data_dir)
    except server.ServerError as exc:
        print(f"cots milvus {args.action}: error: {exc}", file=sys.stderr)
        if exc.log_tail:
            print("the server's last log lines:", *exc.log_tail, sep="\n  ", file=sys.stderr)
        return 1


def start(args: argparse.Namespace, data_dir: Path) -> int:
    begun = time.monotonic()
    state = server.start(data_dir, args.port, args.metrics_port, args.timeout, progress=say)
    if args.foreground:  # before "healthy" is printed: a supervisor may signal right after it
        stop_on_signals(data_dir, state)
    print(
        f"Milvus {state.version} is healthy at {state.uri} (pid {state.pid}, metrics port "
        f"{state.metrics_port}, data {state.data_dir}) after {time.monotonic() - begun:.1f} s"
    )
    sys.stdout.flush()
    return attend(data_dir, state) if args.foreground else 0


def stop_on_signals(data_dir: Path, state: server.State) -> None:
    """SIGTERM, SIGINT or SIGHUP stop the server gracefully."""

    def stop_server(signum: int, frame: FrameType | None) -> None:
        say(f"got signal {signum}: stopping Milvus (pid {state.pid})")
        server.stop(data_dir)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop_server)


def attend(data_dir: Path, state: server.State) -> int:
    """Wait while the server runs (stop_on_signals stops it on a signal)."""
    while server.alive(state.pid):
        time.sleep(0.5)
    stopped = server.read_state(data_dir) is None
    if not stopped:
        say(f"Milvus (pid {state.pid}) exited; log: {server.log_path(data_dir)}")
        server.stop(data_dir)
    return 0 if stopped else 1


def report(data_dir: Path) -> int:
    state, ok = server.status(data_dir)
    if state is None:
        print(f"no Milvus server runs on {data_dir}")
        return NOT_RUNNING
    health = "healthy" if ok else "running but not healthy"
    print(
        f"Milvus {state.version} {health} at {state.uri} (pid {state.pid}, metrics port "
        f"{state.metrics_port}, data {state.data_dir}, up {time.time() - state.started:.0f} s)"
    )
    return 0 if ok else 1
