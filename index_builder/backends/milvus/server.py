"""A local Milvus server on loopback: start, check and stop the Milvus 2.3.5 standalone server
that the `milvus` wheel from PyPI ships (embedded etcd, local storage, rocksmq: no other
service), with its data, configuration, log and state under one directory
($COTS_HOME/milvus by default).

The wheel carries the server's binaries lzma-compressed; they are unpacked once into a cache
shared by every data directory (~/.cache/cots-milvus/VERSION, or $COTS_MILVUS_CACHE), so only
the first start on a machine pays for it. The wheel's `MilvusServerConfig` renders the server's
milvus.yaml (ports, paths); every component advertises 127.0.0.1 and the embedded etcd listens
on 127.0.0.1, on ports of its own so that two servers coexist. `state.json` in the data
directory records the pid and ports, so `status` and `stop` find a server `start` left running.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from index_builder import paths
from index_builder.atomic import atomic_write_json, atomic_write_text, read_json

HOST = "127.0.0.1"
DEFAULT_PORT = 19530
DEFAULT_METRICS_PORT = 9091
START_TIMEOUT_S = 120.0
GRACEFUL_STOP_S = 10  # Milvus's own limit on its graceful stop
STOP_GRACE_S = 30.0  # then `stop` kills it
LOG_TAIL_LINES = 20
PORT_WAIT_S = 5.0  # how long a restart waits for the last start's ports to free
PORT_RANGE = (20000, 32000)  # where free ports are drawn: below the ephemeral range
# Components whose address the others dial: all advertise loopback (by default each would
# advertise the machine's first network address).
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# The template's internal ports (the gRPC port is `proxy_port`), each given a free port.
INTERNAL_PORTS = (
    "root_coord_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
    "etcd_port",
)


class ServerError(RuntimeError):
    """A start, status or stop that failed; `log_tail` holds the server's last log lines."""

    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail or []


@dataclass(frozen=True)
class State:
    """What `start` records in state.json (and `status` reports)."""

    pid: int
    port: int
    metrics_port: int
    data_dir: str
    version: str
    started: float
    internal_ports: dict[str, int] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"


def default_data_dir() -> Path:
    return paths.home() / "milvus"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "cots-milvus"
    return Path(os.environ.get("COTS_MILVUS_CACHE") or default)


def server_version() -> str:
    import milvus

    return str(milvus.__version__)


def binaries(
    cache: Path | None = None, progress: Callable[[str], None] = lambda line: None
) -> Path:
    """The directory holding the unpacked server binary `milvus` and its libraries: unpacked
    from the wheel on first use into a temporary directory, then renamed into place."""
    target = (cache or cache_dir()) / server_version() / "bin"
    if (target / "milvus").is_file():
        return target
    progress(f"unpacking the Milvus {server_version()} binaries into {target} (first start only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".bin.{os.getpid()}.tmp"
    partial.mkdir(exist_ok=True)
    for packed in (resources.files("milvus") / "data" / "bin").iterdir():
        if packed.name.endswith(".lzma"):
            out = partial / packed.name.removesuffix(".lzma")
            with packed.open("rb") as raw, lzma.open(raw) as unpacked, open(out, "wb") as dst:
                while chunk := unpacked.read(1 << 20):
                    dst.write(chunk)
            out.chmod(0o755)
    try:
        partial.rename(target)
    except OSError:  # another process unpacked it first
        if not (target / "milvus").is_file():
            raise
        subprocess.run(["rm", "-rf", str(partial)], check=True)
    return target


def port_free(port: int) -> bool:
    """Whether a listener could bind `port` on every address, as Milvus does (SO_REUSEADDR, as
    Go sets it: connections in TIME_WAIT from a server stopped a moment ago do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def port_freed(port: int, deadline: float) -> bool:
    """Whether `port` is free, or frees before `deadline` (time.monotonic(); a server killed a
    moment ago may hold its ports a little longer than its process lives)."""
    while not port_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct ports free right now, drawn below the kernel's ephemeral range
    (32768-60999), where no outgoing connection takes them between two starts."""
    found: list[int] = []
    while len(found) < count:
        port = random.randrange(*PORT_RANGE)
        if port not in found and port not in avoid and port_free(port):
            found.append(port)
    return found


def read_state(data_dir: Path) -> State | None:
    path = data_dir / "state.json"
    if not path.is_file():
        return None
    return State(**read_json(path))


def alive(pid: int) -> bool:
    """Whether `pid` is a running Milvus server (not an exited one, nor a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    # cmdline[0] is the binary, or an interpreter with the binary (a script) next
    named = any(Path(arg.decode(errors="replace")).name == "milvus" for arg in cmdline[:2])
    return status != "Z" and named and b"standalone" in cmdline


def healthy(metrics_port: int, timeout: float = 2.0) -> bool:
    url = f"http://{HOST}:{metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200 and b"OK" in resp.read()
    except (OSError, urllib.error.URLError):
        return False


def log_path(data_dir: Path) -> Path:
    return data_dir / "logs" / "server.log"


def log_tail(data_dir: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = log_path(data_dir).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line[:400] for line in text.splitlines()[-lines:]]


def write_config(
    data_dir: Path, port: int, internal: dict[str, int], settings: dict[str, Any]
) -> Path:
    """milvus.yaml (rendered by the wheel's template, with `settings`: dotted keys the
    template has, such as dataCoord.segment.assignmentExpiration) and the embedded etcd's own
    config; returns the etcd config's path."""
    from milvus import MilvusServerConfig

    config = MilvusServerConfig(data_dir=str(data_dir))
    config.resolve_storage()  # paths under data_dir (its resolve() would also probe ports)
    for key, value in {"proxy_port": port, **internal}.items():
        config.set(key, value)
    for component in COMPONENTS:
        config.set(f"{component}.ip", HOST)
    # Milvus 2.3 may hang in its graceful stop; it forces its own exit after this (default 1800 s)
    config.set("common.gracefulStopTimeout", GRACEFUL_STOP_S)
    for key, value in settings.items():
        config.set(key, value)
    config.write_config()
    client = f"http://{HOST}:{internal['etcd_port']}"
    peer = f"http://{HOST}:{internal.pop('etcd_peer_port')}"
    etcd = {
        "name": "default",
        "listen-client-urls": client,
        "advertise-client-urls": client,
        "listen-peer-urls": peer,
        "initial-advertise-peer-urls": peer,
        "initial-cluster": f"default={peer}",
    }
    path = data_dir / "configs" / "embed-etcd.yaml"
    atomic_write_text(path, yaml.safe_dump(etcd))
    return path


def check_not_running(data_dir: Path) -> None:
    state = read_state(data_dir)
    if state and alive(state.pid):
        raise ServerError(
            f"a Milvus server already runs on {data_dir} (pid {state.pid}, {state.uri}); "
            "stop it first: cots milvus stop"
        )


def check_ports(port: int, metrics_port: int) -> None:
    if port == metrics_port:
        raise ServerError(f"the gRPC and metrics ports must differ (both {port})")
    for name, value in (("gRPC", port), ("metrics", metrics_port)):
        if not port_free(value):
            raise ServerError(
                f"the {name} port {value} is in use (another Milvus?): choose another with "
                f"--{'port' if name == 'gRPC' else 'metrics-port'}"
            )


def internal_ports(data_dir: Path) -> dict[str, int]:
    """The components' ports: each that of the last start on `data_dir` while it is free,
    else a new free one (recorded in configs/ports.json). The same ports matter: the sessions
    a stopped server left in its etcd name its components' addresses, and a restart on other
    ports waits for them to expire (55 s instead of 3-9 s)."""
    names = [*INTERNAL_PORTS, "etcd_peer_port"]
    path = data_dir / "configs" / "ports.json"
    last = read_json(path) if path.is_file() else {}
    deadline = time.monotonic() + PORT_WAIT_S  # one wait for all of them
    kept = {n: int(last[n]) for n in names if n in last and port_freed(int(last[n]), deadline)}
    fresh = iter(free_ports(len(names) - len(kept), avoid=set(kept.values())))
    chosen = {name: kept[name] if name in kept else next(fresh) for name in names}
    if chosen != last:
        atomic_write_json(path, chosen)
    return chosen


def launch(
    data_dir: Path, port: int, metrics_port: int, bin_dir: Path, settings: dict[str, Any]
) -> State:
    """Write the configuration and start the server in its own session; record its state."""
    data_dir = data_dir.resolve()
    internal = internal_ports(data_dir)
    etcd_config = write_config(data_dir, port, dict(internal), settings)
    env = {
        **os.environ,
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(metrics_port),
        "ETCD_CONFIG_PATH": str(etcd_config),
        "MILVUS_RUN_DIR": str(data_dir / "run"),
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (str(bin_dir), os.environ.get("LD_LIBRARY_PATH")) if p
        ),
    }
    log_path(data_dir).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path(data_dir), "ab") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "milvus"), "run", "standalone"],
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the starting shell does not reach it
        )
    state = State(
        proc.pid, port, metrics_port, str(data_dir), server_version(), time.time(), internal
    )
    atomic_write_json(data_dir / "state.json", asdict(state))
    return state


def wait_healthy(
    state: State, timeout: float, progress: Callable[[str], None], every_s: float = 5.0
) -> None:
    """Poll /healthz until it answers OK; a server that exits or stays unhealthy past
    `timeout` is stopped and reported with the tail of its log."""
    data_dir = Path(state.data_dir)
    start = time.monotonic()
    said = start
    while not healthy(state.metrics_port):
        waited = time.monotonic() - start
        if not alive(state.pid):
            (data_dir / "state.json").unlink(missing_ok=True)
            raise ServerError(
                f"Milvus exited while starting (log: {log_path(data_dir)})", log_tail(data_dir)
            )
        if waited > timeout:
            stop(data_dir, grace=5.0)
            raise ServerError(
                f"Milvus did not become healthy in {timeout:.0f} s "
                f"(http://{HOST}:{state.metrics_port}/healthz; log: {log_path(data_dir)})",
                log_tail(data_dir),
            )
        if time.monotonic() - said >= every_s:
            progress(f"waiting for Milvus to become healthy ({waited:.0f} s)")
            said = time.monotonic()
        time.sleep(0.2)


def start(
    data_dir: Path | None = None,
    port: int = DEFAULT_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    timeout: float = START_TIMEOUT_S,
    progress: Callable[[str], None] = lambda line: None,
    bin_dir: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> State:
    """Start a server on `data_dir` and wait until it is healthy; returns its state.
    `settings`: milvus.yaml keys to change (dotted, e.g. {"dataCoord.segment.
    assignmentExpiration": 200}); keys the template lacks are ignored by the wheel's renderer."""
    data_dir = data_dir or default_data_dir()
    check_not_running(data_dir)
    check_ports(port, metrics_port)
    bin_dir = bin_dir or binaries(progress=progress)
    state = launch(data_dir, port, metrics_port, bin_dir, settings or {})
    progress(f"started Milvus (pid {state.pid}); waiting for {state.uri} to become healthy")
    wait_healthy(state, timeout, progress)
    return state


def status(data_dir: Path | None = None) -> tuple[State | None, bool]:
    """The recorded state of the server on `data_dir` (None: none runs) and its health."""
    data_dir = data_dir or default_data_dir()
    state = read_state(data_dir)
    if state is None or not alive(state.pid):
        return None, False
    return state, healthy(state.metrics_port)


def stop(data_dir: Path | None = None, grace: float = STOP_GRACE_S) -> State | None:
    """Stop the server on `data_dir`: SIGTERM, then SIGKILL after `grace` seconds; returns
    the state it had (None: none ran)."""
    data_dir = data_dir or default_data_dir()
    state = read_state(data_dir)
    if state is None or not alive(state.pid):
        (data_dir / "state.json").unlink(missing_ok=True)
        return None
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(state.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)
        while alive(state.pid):
            time.sleep(0.05)
    (data_dir / "state.json").unlink(missing_ok=True)
    return state
