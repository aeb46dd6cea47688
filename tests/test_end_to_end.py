"""The real command-line entry points end to end: gallery -> `cots demo` (train, eval, export,
index) -> `cots serve` in a subprocess -> both search endpoints over HTTP; then a rerun of
the main job reuses every finished stage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

RUN_FILE = """\
model: {preset: tiny}
data: {batch_size: 8, workers: 0, eval_batch_size: 32}
contrast: {queue_size: 16}
optim: {lr: 1.0e-3, warmup_steps: 2}
objectives:
  clip: {enabled: false}
  instance: {enabled: true}
train: {max_steps: 6, eval_every: 3, log_every: 1, threads: 1}
"""


def cots(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "COTS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    gallery = home / "gallery"
    made = cots("data", "synthetic", "--count", "120", "--seed", "3", "--size", "64",
                "--workers", "1", "--out", str(gallery), env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    run_file = home / "tiny.yaml"
    run_file.write_text(RUN_FILE)
    args = ("demo", "--recipe", str(run_file), "--dataset", str(gallery), "--name", "e2e",
            "--no-serve")  # fmt: skip
    first = cots(*args, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return home, env, args, first


def test_demo_builds_every_artifact(pipeline):
    home, _, _, first = pipeline
    assert (home / "runs/e2e/checkpoints/best/model.safetensors").is_file()
    assert (home / "runs/e2e/test_metrics.json").is_file()
    assert (home / "bundles/e2e/bundle.json").is_file()
    assert (home / "indexes/e2e/CURRENT").is_file()
    assert "pipeline ready" in first.stdout


def test_rerun_reuses_every_stage(pipeline):
    home, env, args, _ = pipeline
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    again = cots(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    for word in ("reusing the finished run", "reusing bundle", "reusing index"):
        assert word in again.stdout
    after = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    assert after == before


def test_served_over_http(pipeline):
    home, env, _, _ = pipeline
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "index_builder.cli", "serve", "--bundle", str(home / "bundles/e2e"),
         "--index", str(home / "indexes/e2e"), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the service did not become ready in 60 s")
        hits = httpx.post(f"{base}/search/text-to-image", json={"text": "a red circle", "k": 5})
        assert hits.status_code == 200
        body = hits.json()
        assert len(body["hits"]) == 5 and body["bundle_id"] and body["index_version"]
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
        image = next(Path(home / "gallery/images").rglob("*.png"))
        files = {"image": ("q.png", image.read_bytes(), "image/png")}
        answer = httpx.post(f"{base}/search/image-to-text", files=files, data={"k": "3"})
        assert answer.status_code == 200 and len(answer.json()["hits"]) == 3
        bad = httpx.post(f"{base}/search/image-to-text", files={"image": ("x.png", b"nope")})
        assert bad.status_code in (400, 415, 422) and "detail" in bad.json()
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_an_edited_recipe_is_trained_again_and_the_old_run_kept(pipeline):
    """Runs last: it replaces the e2e run, bundle and index of the module's pipeline."""
    home, env, args, _ = pipeline
    old_bundle = (home / "bundles/e2e/bundle.json").read_text()
    old_version = (home / "indexes/e2e/CURRENT").read_text()
    run_file = home / "tiny.yaml"
    run_file.write_text(RUN_FILE.replace("lr: 1.0e-3", "lr: 2.0e-3"))
    again = cots(*args, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "has another config" in again.stdout and "reusing" not in again.stdout
    kept = list((home / "runs").glob("e2e-previous-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoints/best/model.safetensors").is_file()
    assert '"lr": 0.002' in (home / "runs/e2e/config.json").read_text()
    assert (home / "bundles/e2e/bundle.json").read_text() != old_bundle
    assert (home / "indexes/e2e/CURRENT").read_text() != old_version
