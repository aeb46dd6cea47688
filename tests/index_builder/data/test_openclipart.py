from __future__ import annotations

import html
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from index_builder.data import openclipart
from index_builder.data.openclipart import (
    OpenClipArtConfig,
    clean_keywords,
    clean_phrase,
    import_openclipart,
    is_generic,
    parse_metadata,
    stem_phrase,
)
from index_builder.manifest import load_records, read_info

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="200" height="100">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Jane Doe</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""


def svg(path: Path, title: str, keywords=(), colour="#dd1111", body=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rect = f'<rect x="10" y="10" width="180" height="80" fill="{colour}"/>'
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(SVG.format(title=title, keywords=lis, body=rect if body is None else body))
    return path


@pytest.fixture
def package(tmp_path):
    root = tmp_path / "svg"
    fox = svg(root / "animals/red_fox_jane_doe_01.svg", "Red Fox", ["animal", "mammal", "computer"])
    os.symlink(fox, root / "animals/link_to_fox.svg")  # the Debian package has such links
    (root / "food").mkdir()
    shutil.copy(fox, root / "food/zz_copy_of_fox.svg")  # and byte-identical copies
    svg(root / "food/untitled.svg", "Untitled")
    svg(root / "food/pear.svg", "Pear", body="")  # draws nothing
    (root / "food/bad.svg").write_text("<svg><unclosed>")
    for n, name in enumerate(["folder_open", "trash_full", "printer", "go_home", "cut"]):
        svg(root / f"icons/{name}.svg", "My Icon Set", ["icons"], colour=f"#00{n}0{n}0")
    return root


def test_metadata_and_caption_helpers():
    meta = parse_metadata(
        SVG.format(
            title="Gelato all&amp;#39;italiana", keywords="<rdf:li>food</rdf:li>", body=""
        ).encode()
    )
    assert meta.title == "Gelato all&#39;italiana" and meta.keywords == ("food",)
    assert meta.creator == "Jane Doe"
    assert clean_phrase(meta.title) == "gelato all'italiana"
    assert clean_phrase("Clipart by Nicu Buculei - jigsaw_red_10") == "jigsaw red"
    assert clean_phrase("Tigre02") == "tigre"
    assert all(is_generic(t) for t in ["", "untitled", "drawing", "123", "img_0042.svg", "x"])
    assert not is_generic("red fox")
    assert stem_phrase("animals/dino_architetto_francesc_01.svg", "Architetto Francesco") == "dino"
    assert clean_keywords(
        ("Icons", "mammal", "fox", "jane", "sea_lion", "2004"), "red fox", "Jane Doe"
    ) == [
        "mammal",
        "sea lion",
    ]


def test_fixture_package_dedups_drops_and_renders(package, tmp_path):
    out = tmp_path / "ds"
    result = import_openclipart(OpenClipArtConfig(str(package), size=64, workers=1), out)
    records = {r.id: r for r in load_records(out)}
    assert set(records) == {
        "oca.animals.red_fox_jane_doe_01",
        *(f"oca.icons.{n}" for n in ["folder_open", "trash_full", "printer", "go_home", "cut"]),
    }
    fox = records["oca.animals.red_fox_jane_doe_01"]
    assert fox.captions == ("red fox", "red fox: animal, mammal", "clip art of red fox")
    # a title shared by a whole collection falls back to the file name
    assert records["oca.icons.folder_open"].captions[0] == "folder open"
    assert result.skipped == {
        "duplicate content": 1,
        "generic or empty title": 1,
        "unreadable SVG (ParseError)": 1,
        "empty rendering": 1,
    }
    image = Image.open(out / fox.image)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((32, 32))[0] > 200 and image.getpixel((32, 32))[1] < 60  # red body
    assert image.getpixel((1, 1)) == (255, 255, 255)  # letterbox on white
    info = read_info(out)
    assert info["count"] == 6 and info["source"] == "openclipart"


def test_rerun_does_no_work_and_resume_reuses_renders(package, tmp_path):
    out = tmp_path / "ds"
    cfg = OpenClipArtConfig(str(package), size=64, workers=1)
    import_openclipart(cfg, out)
    pngs = sorted((out / "images").glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    manifest_stamp = (out / "manifest.jsonl").stat().st_mtime_ns
    time.sleep(0.02)
    assert import_openclipart(cfg, out).up_to_date
    assert (out / "manifest.jsonl").stat().st_mtime_ns == manifest_stamp
    # an interrupted run: no manifest yet, one image missing
    (out / "manifest.jsonl").unlink()
    (out / "dataset.json").unlink()
    pngs[0].unlink()
    result = import_openclipart(cfg, out)
    assert not result.up_to_date and result.info["count"] == 6
    assert pngs[0].exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in pngs[1:])  # reused, not redrawn
    # other options change the fingerprint and the renders
    assert (
        import_openclipart(OpenClipArtConfig(str(package), size=32, workers=1), out).info["size"]
        == 32
    )
    assert Image.open(pngs[1]).size == (32, 32)


def test_a_hanging_svg_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(openclipart, "_rasterise", lambda src, side: time.sleep(10))
    start = time.monotonic()
    job = ("x.svg", str(tmp_path / "x.png"), 64, 1, False)
    assert openclipart.render_svg(job) == "render timed out after 1s"
    assert time.monotonic() - start < 5


def _svg2png_rgba(src: str, side: int) -> Image.Image:
    """The reference `_rasterise` must match: what it did until 2026-12 (svg2png, decoded)."""
    import cairosvg

    image = Image.open(io.BytesIO(cairosvg.svg2png(url=src, output_width=side)))
    if image.height > image.width:
        image = Image.open(io.BytesIO(cairosvg.svg2png(url=src, output_height=side)))
    return image.convert("RGBA")


SHAPES = (
    '<rect x="10" y="10" width="180" height="80" fill="#dd1111"/>'
    '<circle cx="60" cy="50" r="30" fill="#1144cc" fill-opacity="0.37"/>'
    '<ellipse cx="130" cy="50" rx="50" ry="20" fill="none" stroke="#22aa22" stroke-width="3"'
    ' stroke-opacity="0.6"/>'
)


@pytest.mark.parametrize(
    ("width", "height", "body"),
    [
        (200, 100, SHAPES),  # wide
        (100, 200, SHAPES),  # tall: drawn once, tall
        (100, 101, SHAPES),  # nearly square, tall after rounding
        (100, 200, SHAPES + '<text x="5" y="40" font-size="13">Fox 42</text>'),  # text, tall
    ],
)
def test_rasterise_matches_svg2png_decoded(tmp_path, width, height, body):
    path = svg(tmp_path / "a.svg", "A", body=body)
    path.write_text(
        path.read_text().replace('width="200" height="100"', f'width="{width}" height="{height}"')
    )
    fast = openclipart._rasterise(str(path), 128)
    slow = _svg2png_rgba(str(path), 128)
    assert fast.mode == "RGBA" and fast.size == slow.size
    assert fast.tobytes() == slow.tobytes()
    alpha = set(fast.getchannel("A").getdata())
    assert {0, 255} < alpha  # partly transparent pixels were divided out too


def test_straight_rgba_matches_cairos_png_writer():
    import cairocffi as cairo

    surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, 256, 3)
    context = cairo.Context(surface)
    for row, (r, g, b) in enumerate([(1.0, 0.2, 0.6), (0.01, 0.99, 0.5), (0.3, 0.3, 0.3)]):
        gradient = cairo.LinearGradient(0, 0, 256, 0)  # every alpha from 0 to 255
        gradient.add_color_stop_rgba(0, r, g, b, 0)
        gradient.add_color_stop_rgba(1, r, g, b, 1)
        context.rectangle(0, row, 256, 1)
        context.set_source(gradient)
        context.fill()
    expected = Image.open(io.BytesIO(surface.write_to_png())).convert("RGBA")
    assert openclipart.straight_rgba(surface).tobytes() == expected.tobytes()


def test_missing_package_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-svg"):
        import_openclipart(OpenClipArtConfig(str(tmp_path / "nope")), tmp_path / "ds")


REAL = Path(openclipart.DEFAULT_ROOT)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", html.unescape(html.unescape(text)).lower()))


@pytest.mark.skipif(not REAL.is_dir(), reason="openclipart-svg is not installed")
def test_real_package_captions_match_the_svg_metadata(tmp_path):
    out = tmp_path / "oca"
    import_openclipart(OpenClipArtConfig(limit=16, size=64, workers=2), out)
    records = load_records(out)
    assert len(records) >= 10
    for record in records:
        # the metadata read independently of the importer: a regex over the file
        text = (REAL / record.meta["file"]).read_text(encoding="utf-8", errors="replace")
        work = re.search(r"<cc:Work.*?</cc:Work>", text, re.S).group(0)
        title = re.search(r"<dc:title>(.*?)</dc:title>", work, re.S).group(1)
        keywords = {
            k.strip().lower().replace("_", " ") for k in re.findall(r"<rdf:li>(.*?)</rdf:li>", work)
        }
        assert record.meta["title"] == title.strip()
        name = record.captions[0]
        assert _words(name) <= _words(title) | _words(
            Path(record.meta["file"]).stem.replace("_", " ")
        )
        assert record.captions[-1] == f"clip art of {name}"
        if len(record.captions) == 3:
            listed = record.captions[1].removeprefix(f"{name}: ").split(", ")
            assert set(listed) <= keywords
        image = Image.open(out / record.image)
        assert image.size == (64, 64)
        assert len(set(image.getdata())) > 1  # something was drawn


def _digest_in_a_fresh_process(call: str, src: str) -> str:
    """SHA-1 of the RGBA pixels of `call(src, 512)`, drawn by a process that drew nothing
    before: which scale a text was first drawn at changes its later drawings (cairo's font
    caches), so two drawings in one process cannot tell the two ways apart."""
    code = (
        "import hashlib, sys\n"
        "from tests.index_builder.data import test_openclipart as t\n"
        f"image = {call}(sys.argv[1], 512)\n"
        "print(image.size, hashlib.sha1(image.tobytes()).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code, src], cwd=root, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not REAL.is_dir(), reason="openclipart-svg is not installed")
def test_rasterise_matches_svg2png_on_a_tall_svg_with_text():
    src = str(REAL / "computer/hardware/various_servers_01.svg")  # drawn tall, with text
    fast = _digest_in_a_fresh_process("t.openclipart._rasterise", src)
    assert fast.startswith("(362, 512)")
    assert fast == _digest_in_a_fresh_process("t._svg2png_rgba", src)
