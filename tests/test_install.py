"""deploy/install.sh and deploy/quickstart.sh run against stand-in commands (apt-get, dpkg, id,
pip): they wait for a held package lock, and the quickstart installs into a virtual
environment, never into the python3 it finds on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
QUICKSTART = ROOT / "deploy" / "quickstart.sh"


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def fake_root(tmp_path):
    """A PATH on which the script runs as root with apt-get, dpkg and pip stood in: apt-get
    logs its arguments, and `apt-get update` finds the lists locked `LOCKED` times first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    stub(bin_dir, "id", "echo 0")
    stub(bin_dir, "dpkg", "exit 1")  # every package missing
    stub(bin_dir, "python3", "exit 0")  # pip install
    stub(
        bin_dir,
        "apt-get",
        f'echo "$*" >> {log}\n'
        f'if [[ " $* " == *" update "* ]] && [ "$(grep -c update {log})" -le "${{LOCKED:-0}}" ]'
        "; then\n"
        '  echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1"\n'
        "  exit 100\n"
        "fi",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def test_install_waits_for_a_held_apt_lock(fake_root):
    env, log = fake_root
    out = subprocess.run(
        ["bash", str(INSTALL), "serve"], env={**env, "LOCKED": "1"}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "waiting" in out.stdout  # it says that it waits
    calls = log.read_text().splitlines()
    assert [c for c in calls if " update" in c][:2] == [calls[0], calls[1]]  # retried
    assert all("DPkg::Lock::Timeout=" in call for call in calls), calls
    assert any(" install " in call for call in calls)


def test_install_gives_up_on_other_apt_errors(fake_root):
    env, log = fake_root
    stub(Path(env["PATH"].split(":")[0]), "apt-get", 'echo "E: no network" >&2; exit 100')
    out = subprocess.run(["bash", str(INSTALL), "serve"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "no network" in out.stderr


def test_every_apt_get_call_waits_for_the_lock():
    """Any apt-get line in install.sh goes through `apt_get`, which sets the lock timeout."""
    code = [
        re.sub(r'"[^"]*"', '""', line.split("#")[0]) for line in INSTALL.read_text().splitlines()
    ]
    direct = [line.strip() for line in code if re.search(r"(?<!-v )apt-get\b", line)]
    assert direct == [
        'apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="" ""; }'
    ]


def test_install_into_a_virtual_environment(fake_root, tmp_path):
    """COTS_VENV=DIR: pip runs in DIR's python3, created by the python3 on PATH (which needs
    python3-venv on Debian when it lacks ensurepip); without it, in the python3 on PATH."""
    env, log = fake_root
    bin_dir = Path(env["PATH"].split(":")[0])
    calls = tmp_path / "python.log"
    venv_python = '#!/usr/bin/env bash\necho "venv $*" >> ' + str(calls)
    stub(
        bin_dir,
        "python3",
        f'echo "system $*" >> {calls}\n'
        'if [ "$1 $2" = "-c import ensurepip" ]; then exit 1; fi\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        f"printf '%s\\n' '{venv_python}' > \"$3/bin/python3\"; chmod +x \"$3/bin/python3\"; fi",
    )
    venv = tmp_path / "env"
    out = subprocess.run(
        ["bash", str(INSTALL), "serve"],
        env={**env, "COTS_VENV": str(venv)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    assert f"system -m venv {venv}" in lines
    pip = [line for line in lines if "pip install" in line]
    assert pip and all(line.startswith("venv ") for line in pip), lines
    assert "python3-venv" in log.read_text()
    assert f"for {venv}/bin/python3" in out.stdout

    calls.unlink()
    out = subprocess.run(["bash", str(INSTALL), "serve"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(line.startswith("system ") for line in calls.read_text().splitlines())


def test_quickstart_runs_the_demo_in_the_virtual_environment(tmp_path):
    """The real quickstart in a copy of the repository whose install.sh only makes the
    environment: install.sh is asked for .venv and `cots demo` runs in its python."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    shutil.copy(QUICKSTART, repo / "deploy" / "quickstart.sh")
    (repo / "deploy" / "install.sh").write_text(
        'echo "install $1 into $COTS_VENV"\n'
        'mkdir -p "$COTS_VENV/bin"\n'
        'printf \'#!/usr/bin/env bash\\necho "venv python $*"\\n\' > "$COTS_VENV/bin/python3"\n'
        'chmod +x "$COTS_VENV/bin/python3"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "COTS_VENV"}
    out = subprocess.run(
        ["bash", "deploy/quickstart.sh", "--no-serve"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    venv = repo.resolve() / ".venv"
    assert f"install train into {venv}" in out.stdout
    assert f"source {venv}/bin/activate" in out.stdout  # how to use `cots` afterwards
    assert out.stdout.splitlines()[-1] == "venv python -m index_builder.cli demo --no-serve"
