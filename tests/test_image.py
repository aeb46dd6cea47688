"""The images built and run for real: deploy/build_image.py with podman (root only; CI installs
podman with `deploy/install.sh dev`), plus its pure parts (pip settings, build context) on any
machine. Cold, with no base image cached, the podman run takes about 9 minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "build_image.py"
spec = importlib.util.spec_from_file_location("build_image", SCRIPT)
assert spec and spec.loader
build_image = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_image)

needs_podman = pytest.mark.skipif(
    not (shutil.which("podman") and shutil.which("mmdebstrap") and os.geteuid() == 0),
    reason="needs root, podman and mmdebstrap (deploy/install.sh dev installs them)",
)


# -- the pure parts -----------------------------------------------------------------------------


def test_pip_settings_become_build_args_and_read_only_mounts(tmp_path):
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x AS a\nARG PIP_EXTRA_INDEX_URL\nARG PIP_FIND_LINKS\nARG PIP_CERT\n"
                          "FROM a AS b\nARG PIP_FIND_LINKS\n")  # fmt: skip
    config = {
        "extra-index-url": f"file://{tmp_path}/mirror/simple https://example.org/simple",
        "find-links": str(tmp_path / "wheels"),
        "constraint": "/not/declared.txt",
        "timeout": "60",
    }
    assert build_image.pip_build_args(dockerfile, config) == [
        "--build-arg", f"PIP_EXTRA_INDEX_URL={config['extra-index-url']}",
        "--build-arg", f"PIP_FIND_LINKS={tmp_path}/wheels",
        "--volume", f"{tmp_path}/mirror:{tmp_path}/mirror:ro",
        "--volume", f"{tmp_path}/wheels:{tmp_path}/wheels:ro",
    ]  # fmt: skip


def test_pip_config_reads_this_hosts_pip():
    config = build_image.pip_config()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert {line.partition("=")[0].rpartition(".")[2] for line in listed.splitlines()} == set(
        config
    )


def test_build_context_is_what_docker_would_send(tmp_path):
    context = build_image.build_context(tmp_path)
    files = {str(p.relative_to(context)) for p in context.rglob("*") if p.is_file()}
    assert {"Dockerfile", "pyproject.toml", "README.md", "deploy/install.sh"} <= files
    assert "service/app.py" in files and "index_builder/cli.py" in files
    assert not [f for f in files if f.startswith(("tests/", "docs/", "bench/", "deploy/k8s"))]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_engine_config_asks_only_for_limits_podman_holds(tmp_path):
    import resource

    text = build_image.engine_config(tmp_path).read_text()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert f'"nofile={nofile}:{nofile}"' in text
    assert 'runtime = "runc"' in text and 'cgroup_manager = "cgroupfs"' in text


# -- the images, built and run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("image")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(out / "work"), "--report", str(out / "r.json")],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "r.json").read_text())


@needs_podman
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_serving_image_serves_search_as_cots_without_torch(report):
    service = report["service"]
    assert service["uid"] == 10001 and service["torch"] is False
    assert service["text_to_image"]["hits"] == 3 and service["image_to_text"]["hits"] > 0
    assert service["image_thumbnail_page"] == ["200 image/png", "200 image/jpeg", "200 text/html"]
    assert 0 < report["start"]["healthy_s"] <= report["start"]["ready_s"] < 60
    images = report["images"]
    assert images["serve"]["user"] == images["trainer"]["user"] == "10001:10001"
    assert images["serve"]["size_mb"] < images["trainer"]["size_mb"]


@needs_podman
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bad_mounts_stop_the_container_with_one_line(report):
    bad = report["bad_input"]
    assert bad["no_bundle_mount"] == {
        "exit": 2,
        "log": "cots serve: error: no bundle at /data/bundles/default: bundle.json is missing",
    }
    assert bad["no_index_mount"]["exit"] == 2
    assert "no index under /data/indexes/default" in bad["no_index_mount"]["log"]
    unreadable = bad["bundle_unreadable_by_uid_10001"]
    assert unreadable["exit"] == 2 and unreadable["log"].endswith("(running as user id 10001)")
    read_only = bad["index_read_only_for_rebuild"]
    assert read_only["exit"] == 1 and "Read-only file system" in read_only["log"]


@needs_podman
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compose_files_serve_with_podman_compose(report):
    compose = report["compose"]
    if "skipped" in compose:
        pytest.skip(compose["skipped"])
    assert compose["hits"] > 0 and compose["ready_s"] < 60
