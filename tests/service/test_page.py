"""The web page end to end in headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
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
    page.wait_for_selector("#status:has-text('8 images · 16 texts')")

    page.fill("#text-input", "a red square")
    page.click("#search-submit")
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

    assert "mode=text-to-image" in page.url and "q=a+red+square" in page.url

    upload = tmp_path / "query.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(upload)
    page.click("[data-mode=image-to-text]")
    page.set_input_files("#image-input", str(upload))
    page.wait_for_function("document.querySelector('#preview').naturalWidth === 40")
    page.click("#search-submit")
    page.wait_for_selector("#texts li")
    assert page.locator("#grid .card").count() == 0
    first = page.locator("#texts li").first.locator(".text").inner_text()
    assert first in ("blue", "a blue square")
    page.screenshot(path=str(tmp_path / "image-to-text.png"), full_page=True)

    page.click("[data-mode=image-to-image]")  # the same upload, searched against images
    page.wait_for_selector("#grid .card")
    assert page.locator("#grid .card").first.get_attribute("data-id") == "blue"

    page.click("[data-mode=text-to-image]")
    page.fill("#text-input", "   ")
    page.click("#search-submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "must not be empty" in page.inner_text("#error")
    assert errors == []
    shot = Image.open(io.BytesIO((tmp_path / "text-to-image.png").read_bytes()))
    assert shot.size[0] == 1000


def _ids(page, selector: str = "#grid .card") -> list[str]:
    return page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.dataset.id)")


def _wait_first_rank(page, rank: int) -> None:
    page.wait_for_function(
        "r => (document.querySelector('#grid .card .score') || {}).textContent"
        "?.startsWith('#' + r)",
        arg=rank,
    )


def test_modes_paging_filters_and_shared_urls(live, page):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A shared URL runs its search when opened.
    page.goto(live.url + "/?mode=text-to-image&q=a+red+square&k=3")
    page.wait_for_selector("#grid .card")
    assert _ids(page)[0] == "red" and len(_ids(page)) == 3
    assert page.is_disabled("#prev") and not page.is_hidden("#pager")

    page.click("#next")
    _wait_first_rank(page, 4)
    assert "page=2" in page.url and "q=a+red+square" in page.url
    body = httpx.post(
        f"{live.url}/search/text-to-image", json={"text": "a red square", "k": 3, "offset": 3}
    ).json()
    assert _ids(page) == [hit["id"] for hit in body["hits"]]
    page.go_back()  # the browser's history steps through the searches
    _wait_first_rank(page, 1)
    assert _ids(page)[0] == "red"

    page.fill("#k-input", "12")
    page.fill("#filter-input", '{"channels": "r"}')
    page.click("#search-submit")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 4")
    assert set(_ids(page)) == {"red", "yellow", "magenta", "white"}
    assert "filter=%7B%22channels%22" in page.url
    page.fill("#filter-input", '{"channels": ')
    page.click("#search-submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "filter: not valid JSON" in page.inner_text("#error")
    page.fill("#filter-input", '{"colour": "red"}')
    page.click("#search-submit")
    page.wait_for_selector("#error:has-text('unknown filter field')")
    page.fill("#filter-input", "")

    # "More like this" on the top image: the image-to-image mode with its id, in the URL.
    page.click("#search-submit")
    page.wait_for_selector("#grid .card")
    page.locator("#grid .card").first.locator("button.like").click()
    page.wait_for_url("**mode=image-to-image**")
    page.wait_for_selector("#grid .card")
    assert "id=red" in page.url and page.inner_text("#like-id") == "red"
    assert "red" not in _ids(page)
    page.wait_for_function("document.querySelector('#preview').naturalWidth > 0")

    page.click("[data-mode=text-to-text]")
    page.fill("#text-input", "blue")
    page.click("#search-submit")
    page.wait_for_selector("#texts li")
    assert _ids(page, "#texts li")[0] in ("blue#0", "blue#1")
    page.locator("#texts li").first.locator("button.like").click()
    page.wait_for_url("**id=blue%23**")
    page.wait_for_selector("#texts li")
    assert _ids(page, "#texts li")[0].startswith("blue#")

    page.goto(live.url + "/?mode=image-to-image&id=cyan&k=2")  # opened fresh
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 2")
    assert page.inner_text("#like-id") == "cyan" and "cyan" not in _ids(page)
    assert errors == []


def test_docs_work_offline(live, page):
    """Swagger UI comes from the installed package: no request leaves the service."""
    outside: list[str] = []

    def only_local(route) -> None:
        if route.request.url.startswith(live.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(live.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('cots search')")
    for path in ("/search/image-to-image", "/search/text-to-text", "/admin/items"):
        page.wait_for_selector(f".opblock-summary-path[data-path='{path}']")
    assert outside == []


def test_video_tabs_in_chromium(video_live, live, page, video_assets, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(video_live.url + "/")
    page.wait_for_selector("#status:has-text('1 images · 4 videos · 4 texts')")
    page.click("[data-mode=text-to-video]")
    page.fill("#text-input", "blue")
    page.click("#search-submit")
    page.wait_for_selector("#videos .video-card")
    assert _ids(page, "#videos .video-card")[0] == "blue"
    assert set(_ids(page, "#videos .video-card")) == {"red", "blue", "green", "redblue"}
    assert page.locator("#grid .card").count() == 0
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#videos img.strip'))"
        ".every(i => i.complete && i.naturalWidth === 4 * 96)"  # four keyframes side by side
    )
    assert "4 keyframes" in page.locator("#videos .video-card").first.inner_text()
    assert "mode=text-to-video" in page.url and "q=blue" in page.url
    page.screenshot(path=str(tmp_path / "text-to-video.png"), full_page=True)

    page.click("[data-mode=video-to-text]")
    page.set_input_files("#video-input", str(video_assets["clips"] / "green.mp4"))
    page.click("#search-submit")
    page.wait_for_selector("#texts li")
    assert page.locator("#texts li").first.locator(".text").inner_text() == "green"
    assert errors == []

    page.goto(live.url + "/")  # an index without videos: the video tabs are disabled
    page.wait_for_selector("#status:has-text('8 images · 16 texts')")
    assert page.is_disabled("[data-mode=text-to-video]")
    assert page.is_disabled("[data-mode=video-to-text]")
    assert not page.is_disabled("[data-mode=text-to-image]")


def test_filter_hint_names_the_index_fields_and_ids_are_whole(live, page):
    """The filter box names this index's fields for the side searched (not a `year` the
    index lacks); every card shows its id whole on hover and copies it."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    page.goto(live.url + "/?mode=text-to-image&q=a+red+square&k=3")
    page.wait_for_function("document.querySelector('#filter-input').placeholder.includes('fields')")
    hint = page.get_attribute("#filter-input", "placeholder")
    assert hint == '{"brightness": {"gte": …}} · fields: brightness, channels, pure'
    assert "year" not in hint and "pure (bool)" in page.get_attribute("#filter-input", "title")
    page.click("[data-mode=text-to-text]")
    assert page.get_attribute("#filter-input", "placeholder") == '{"style": "…"} · fields: style'

    page.click("[data-mode=text-to-image]")
    page.wait_for_selector("#grid .card .id-text")
    card = page.locator("#grid .card").first
    assert card.locator(".id-text").get_attribute("title") == card.get_attribute("data-id")
    card.locator("button.copy").click()
    page.wait_for_function(
        "document.querySelector('#grid .card button.copy').textContent === 'copied'"
    )
    assert page.evaluate("navigator.clipboard.readText()") == card.get_attribute("data-id")
    assert errors == []
