"""`cots milvus start|status|stop` (index_builder.backends.milvus.server): a real Milvus
server on free ports with its data under tmp_path; a port in use, a server that exits and one
that never becomes healthy end as one clear error with the tail of the server's log."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from index_builder.backends.milvus import commands, server

ROOT = Path(__file__).resolve().parents[3]


def cots_milvus(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cots")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["milvus", *argv])
    return args.func(args)


def fake_binaries(tmp_path: Path, body: str) -> Path:
    """A bin dir whose `milvus` is a Python script (it is `alive()` while it runs)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "milvus"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_start_status_stop_and_a_second_start(tmp_path, capsys):
    from pymilvus import MilvusClient

    data = tmp_path / "milvus"
    port, metrics = server.free_ports(2)
    flags = ["--data-dir", str(data), "--port", str(port), "--metrics-port", str(metrics)]
    assert cots_milvus("start", *flags) == 0
    assert f"healthy at http://127.0.0.1:{port}" in capsys.readouterr().out
    state = server.read_state(data)
    assert state is not None and server.alive(state.pid)
    client = MilvusClient(uri=state.uri)
    assert "default" in client.list_databases()
    client.close()

    assert cots_milvus("status", "--data-dir", str(data)) == 0
    assert f"healthy at http://127.0.0.1:{port} (pid {state.pid}" in capsys.readouterr().out

    # a second start on the same data dir is refused, whatever ports it asks for
    other, other_metrics = server.free_ports(2)
    again = ["--data-dir", str(data), "--port", str(other), "--metrics-port", str(other_metrics)]
    assert cots_milvus("start", *again) == 1
    err = capsys.readouterr().err
    assert f"already runs on {data} (pid {state.pid}" in err and len(err.splitlines()) == 1
    assert server.read_state(data) == state

    assert cots_milvus("stop", "--data-dir", str(data)) == 0
    assert f"stopped Milvus (pid {state.pid})" in capsys.readouterr().out
    assert not server.alive(state.pid) and not (data / "state.json").exists()
    assert server.port_free(port) and server.port_free(metrics)
    assert cots_milvus("status", "--data-dir", str(data)) == commands.NOT_RUNNING
    assert "no Milvus server runs" in capsys.readouterr().out
    assert cots_milvus("stop", "--data-dir", str(data)) == 0


def test_a_port_in_use_is_one_clear_error(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = server.free_ports(1)[0]
        flags = ["--data-dir", str(tmp_path), "--port", str(port), "--metrics-port", str(metrics)]
        assert cots_milvus("start", *flags) == 1
    err = capsys.readouterr().err
    assert err == (
        f"cots milvus start: error: the gRPC port {port} is in use (another Milvus?): "
        "choose another with --port\n"
    )
    assert not (tmp_path / "state.json").exists()
    with pytest.raises(server.ServerError, match="ports must differ"):
        server.start(tmp_path, metrics, metrics)


def test_a_server_that_never_becomes_healthy_is_stopped_and_reported(tmp_path):
    bin_dir = fake_binaries(
        tmp_path,
        """
        import os, sys, time
        print("fake milvus", os.getpid(), *sys.argv[1:], flush=True)
        time.sleep(120)
        """,
    )
    data = tmp_path / "data"
    port, metrics = server.free_ports(2)
    with pytest.raises(server.ServerError) as caught:
        server.start(data, port, metrics, timeout=1.5, bin_dir=bin_dir)
    message = str(caught.value)
    assert message.startswith("Milvus did not become healthy in 2 s")
    assert f"127.0.0.1:{metrics}/healthz" in message and "\n" not in message
    [line] = caught.value.log_tail
    pid = int(line.split()[2])
    assert line == f"fake milvus {pid} run standalone"
    assert not server.alive(pid)  # stopped, not left behind
    assert not (data / "state.json").exists()


def test_a_server_that_exits_while_starting_is_reported(tmp_path, capsys):
    bin_dir = fake_binaries(
        tmp_path,
        """
        import sys
        print("line one")
        print("panic: cannot open the data directory", file=sys.stderr)
        sys.exit(3)
        """,
    )
    data = tmp_path / "data"
    with pytest.raises(server.ServerError) as caught:
        server.start(data, *server.free_ports(2), timeout=30, bin_dir=bin_dir)
    assert str(caught.value) == f"Milvus exited while starting (log: {data / 'logs/server.log'})"
    assert caught.value.log_tail == ["line one", "panic: cannot open the data directory"]
    assert server.status(data) == (None, False)


def test_the_milvus_extra_brings_the_server_and_registers_the_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["milvus"]
    assert any(req.startswith("milvus==2.3.5") for req in extra)
    commands_group = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "entry-points"
    ]["cots.commands"]
    assert commands_group["milvus"] == "index_builder.backends.milvus.commands:register"
    # the server wheel pulls no client in: pymilvus stays the one pyproject asks for
    code = "import sys, milvus; print(sorted(m for m in sys.modules if 'pymilvus' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


FOREGROUND = """
import argparse, sys
from index_builder.backends.milvus import commands
parser = argparse.ArgumentParser(prog="cots")
commands.register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["milvus", *sys.argv[1:]])
sys.exit(args.func(args))
"""


@pytest.mark.slow
def test_foreground_start_stops_the_server_on_sigterm(tmp_path):
    """The supervised form (systemd, a container): attached until a signal, then a clean stop."""
    data = tmp_path / "milvus"
    port, metrics = server.free_ports(2)
    argv = ["start", "--foreground", "--data-dir", str(data), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, *argv, "--metrics-port", str(metrics)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"healthy at http://127.0.0.1:{port}" in proc.stdout.readline()
        state = server.read_state(data)
        assert state is not None and server.alive(state.pid) and server.healthy(metrics)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    except BaseException:
        server.stop(data, grace=5.0)  # never leave a server behind a failed test
        raise
    finally:
        proc.kill()
    assert "got signal 15: stopping Milvus" in proc.stderr.read()
    assert not server.alive(state.pid) and server.read_state(data) is None


@pytest.mark.slow
def test_a_killed_server_keeps_its_rows_on_restart(tmp_path):
    """`stop` kills a server that outlasts the grace period; Milvus replays its write-ahead log
    (rocksmq under the data dir) on the next start, so inserted rows survive."""
    from pymilvus import MilvusClient

    data = tmp_path / "milvus"
    # a restart after a kill waits for the killed server's sessions in etcd to expire: a
    # 10 s lease instead of 30 s keeps the wait short
    settings = {"dataCoord.segment.assignmentExpiration": 300, "common.session.ttl": 10}
    state = server.start(data, *server.free_ports(2), timeout=120, settings=settings)
    config = yaml.safe_load((data / "configs" / "milvus.yaml").read_text())
    assert config["dataCoord"]["segment"]["assignmentExpiration"] == 300
    assert config["common"]["gracefulStopTimeout"] == server.GRACEFUL_STOP_S
    assert config["common"]["session"]["ttl"] == 10
    assert config["proxy"]["port"] == int(state.uri.rsplit(":", 1)[1])
    client = MilvusClient(uri=state.uri)
    client.create_collection("kept", dimension=4)
    client.insert("kept", [{"id": i, "vector": [1.0, 0.0, 0.0, float(i)]} for i in range(5)])
    client.close()
    assert server.stop(data, grace=0.5) == state
    assert not server.alive(state.pid)

    again = server.start(data, *server.free_ports(2), timeout=120, settings=settings)
    try:
        # the components keep their ports: the sessions left in etcd name the right addresses
        assert again.internal_ports == state.internal_ports
        client = MilvusClient(uri=again.uri)
        client.load_collection("kept")
        rows = client.query("kept", filter="id >= 0", output_fields=["id"])
        assert sorted(row["id"] for row in rows) == [0, 1, 2, 3, 4]
        client.close()
    finally:
        server.stop(data, grace=5.0)


def test_a_restart_waits_briefly_for_its_last_ports():
    """A port the last start used and that frees within the wait is kept; one held past the
    deadline is not (the server then takes a new one)."""
    (port,) = server.free_ports(1)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", port))
    held.listen()
    threading.Timer(0.5, held.close).start()
    assert server.port_freed(port, time.monotonic() + 5.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        begun = time.monotonic()
        assert not server.port_freed(port, begun + 0.5)
        assert time.monotonic() - begun >= 0.5
