"""`cots serve` as a user runs it: a subprocess on loopback, settings from flags and env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cots_serve_answers_over_http(assets):
    port = _free_port()
    env = {**os.environ, "COTS_API_KEY": "k3y", "COTS_MAX_K": "3", "COTS_INTRA_THREADS": "1"}
    command = [sys.executable, "-m", "index_builder.cli", "serve", "--port", str(port)]
    command += ["--bundle", str(assets["bundle"].path), "--index", str(assets["index"])]
    command += ["--max-k", "5", "--log-level", "warning"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cots serve did not become ready"
            time.sleep(0.1)
        key = {"X-API-Key": "k3y"}
        assert httpx.post(f"{url}/search/text-to-image", json={"text": "red"}).status_code == 401
        body = httpx.post(
            f"{url}/search/text-to-image", json={"text": "a green square", "k": 5}, headers=key
        ).json()
        assert body["hits"][0]["id"] == "green" and len(body["hits"]) == 5
        too_many = httpx.post(
            f"{url}/search/text-to-image", json={"text": "red", "k": 6}, headers=key
        )
        assert too_many.status_code == 422 and "max_k=5" in too_many.json()["detail"]  # flag > env
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "cots search" in page.text
    finally:
        server.terminate()
        server.wait(timeout=20)
