"""The web page end to end in headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium package"),
]


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1000, "height": 800},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_search_page_in_chromium(live, page, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live.url + "/")
    page.wait_for_selector("#status:has-text('8 images')")

    page.fill("#text-input", "a red square")
    page.click("#text-submit")
    page.wait_for_selector("#grid .card")
    cards = page.locator("#grid .card")
    assert cards.count() == 8
    assert cards.first.locator(".caption").inner_text() == "a red square"
    assert "score 0.99" in cards.first.locator(".score").inner_text()
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#grid img'))"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(tmp_path / "text-to-image.png"), full_page=True)

    upload = tmp_path / "query.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(upload)
    page.set_input_files("#image-input", str(upload))
    page.click("#image-submit")
    page.wait_for_selector("#captions li")
    assert page.locator("#grid .card").count() == 0
    first = page.locator("#captions li").first.locator(".text").inner_text()
    assert first in ("blue", "a blue square")
    page.screenshot(path=str(tmp_path / "image-to-text.png"), full_page=True)

    page.fill("#text-input", "   ")
    page.click("#text-submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "must not be empty" in page.inner_text("#error")
    assert errors == []
    shot = Image.open(io.BytesIO((tmp_path / "text-to-image.png").read_bytes()))
    assert shot.size[0] == 1000
