"""The README's picture of a photo collection searched by text: the packaged photo folder
(the zero-shot suite's photos: scikit-image, scikit-learn, matplotlib, Debian wallpapers)
indexed with a bundle, served, searched in headless Chromium, saved as a PNG.

    python docs/make_photo_screenshot.py --bundle cots-data/bundles/demo --query "a flower"
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from training.zero_shot.sources import photo_folder

OUT = Path(__file__).parent / "img" / "search_photos.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/ready", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the service did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--query", default="a flower")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for path in photo_folder()[0]:
            (folder / path.name).symlink_to(path)
        root, cli = Path(tmp) / "index", [sys.executable, "-m", "index_builder.cli"]
        subprocess.run([*cli, "index", "build", str(root), "--bundle", args.bundle,
                        "--images", str(folder)], check=True)  # fmt: skip
        port = free_port()
        server = subprocess.Popen([*cli, "serve", "--bundle", args.bundle, "--index", str(root),
                                   "--port", str(port)])  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=FLAGS
                )
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(url + "/")
                page.fill("#text-input", args.query)
                page.click("#search-submit")
                page.wait_for_selector("#grid .card")
                page.wait_for_function(
                    "Array.from(document.querySelectorAll('#grid img'))"
                    ".every(i => i.complete && i.naturalWidth > 0)"
                )
                page.screenshot(path=str(OUT))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=20)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
