"""Open Clip Art (Debian `openclipart-svg`): RDF titles and keywords -> captions, SVG -> PNG."""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    parallel_map,
    path_id,
    prepare_render_dir,
    progress,
    run_import,
    save_square,
)
from index_builder.manifest import Record

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/openclipart/svg"
SVG_DPI = 96  # cairosvg.svg2png's default
_CAIRO_ARGB32 = "BGRA" if sys.byteorder == "little" else "ARGB"  # native-endian 0xAARRGGBB
VERSION = 1  # bump when captions or rendering change, so old galleries are rebuilt
GENERIC_TITLES = {
    "",
    "untitled",
    "no title",
    "title",
    "image",
    "images",
    "picture",
    "drawing",
    "draw",
    "clipart",
    "clip art",
    "svg",
    "icon",
    "icons",
    "graphic",
    "graphics",
    "logo",
    "symbol",
    "sketch",
    "test",
    "new document",
    "layer",
    "unnamed",
    "various cliparts",
}
# Package-structure and tool keywords that say nothing about what a picture shows.
NOISE_KEYWORDS = {
    "hash",
    "computer",
    "icons",
    "icon",
    "theme",
    "magick",
    "action",
    "lemon theme icon",
    "unsorted",
    "special",
    "signs and symbols",
    "mapsym",
    "mimetypes",
    "mime-types",
    "united nations member",
    "menu",
    "application",
    "filesystem",
    "webpage",
    "stock",
    "clipart",
    "clip art",
    "svg",
    "image",
    "drawing",
    "coloring",
    "simple",
    "white",
    "bordered",
    "ornamental",
    "fest",
    "weathersym",
    "media",
    "remix",
}
_CREDIT = re.compile(r"^\s*clip\s*art\s+by\s+[^-]*-\s*", re.IGNORECASE)
# the elements cairosvg draws with its text code (surface.TAGS), with or without a prefix
_TEXT = re.compile(rb"<(?:[\w.-]+:)?(?:text|tspan|textPath|a)\b")
_FILE_LIKE = re.compile(r"\.(svgz?|png|jpe?g|gif|ai|eps)\b|^(img|dsc|image|drawing|file)\s*\d*$")


@dataclass(frozen=True)
class OpenClipArtConfig:
    root: str = DEFAULT_ROOT
    size: int = 256  # square PNG side
    workers: int = 2
    timeout: int = 20  # seconds per SVG before it is skipped
    limit: int = 0  # first N files in path order (0: all), for previews and tests
    shared_title: int = 5  # a title on at least this many pictures names a collection
    max_same_caption: int = 10  # drop pictures whose caption names more pictures than this


@dataclass(frozen=True)
class Metadata:
    title: str
    keywords: tuple[str, ...]
    creator: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_metadata(data: bytes) -> Metadata:
    """dc:title, dc:subject keywords (rdf:Bag/rdf:li) and creator of the cc:Work in an SVG."""
    import defusedxml.ElementTree as ET

    root = ET.fromstring(data)
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    if work is None:
        return Metadata("", (), "")
    title = next(((c.text or "").strip() for c in work if _local(c.tag) == "title"), "")
    keywords = tuple(
        (li.text or "").strip()
        for c in work
        if _local(c.tag) == "subject"
        for li in c.iter()
        if _local(li.tag) == "li" and (li.text or "").strip()
    )
    creator = next(("".join(c.itertext()).strip() for c in work if _local(c.tag) == "creator"), "")
    return Metadata(title, keywords, creator)


def clean_phrase(text: str) -> str:
    """Lower-case words: credits, underscores, numbering and stray punctuation removed."""
    text = html.unescape(html.unescape(text))
    text = _CREDIT.sub("", text)
    text = re.sub(r"[_\s]+", " ", text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])|\s-\s", " ", text, flags=re.IGNORECASE)
    words = [re.sub(r"(?<=[^\W\d])\d+$", "", w) for w in text.lower().split()]
    while words and re.fullmatch(r"\W*\d+\W*", words[-1]):
        words.pop()
    words = [w for w in words if not re.fullmatch(r"0\d*", w)]
    return " ".join(words).strip(" .,;:-()[]'\"")


def is_generic(phrase: str) -> bool:
    letters = re.sub(r"[^a-z]", "", phrase)
    return phrase in GENERIC_TITLES or len(letters) < 2 or bool(_FILE_LIKE.search(phrase))


def stem_phrase(relpath: str, creator: str = "") -> str:
    """A name from the file stem: numbering, single letters and the author's name removed.

    Package file names often end in a (truncated) author name: "dino_architetto_francesc_01".
    """
    author = creator.lower().split()
    words = [re.sub(r"\d+$", "", w) for w in re.split(r"[_\-\s.]+", Path(relpath).stem.lower())]
    kept = [
        w
        for w in words
        if len(w) > 2
        and not re.search(r"\d", w)
        and not any(a.startswith(w) or w.startswith(a) for a in author if len(a) > 2)
    ]
    return " ".join(kept)


def clean_keywords(keywords: tuple[str, ...], title: str, creator: str) -> list[str]:
    title_words = set(title.split())
    creator = creator.lower()
    kept: list[str] = []
    for raw in keywords:
        word = re.sub(r"[_\s]+", " ", raw.lower()).strip()
        if (
            word in NOISE_KEYWORDS
            or not 3 <= len(word) <= 30
            or re.search(r"\d", word)
            or (creator and word in creator)
            or set(word.split()) <= title_words
            or word in kept
        ):
            continue
        kept.append(word)
    return kept[:3]


def captions_for(title: str, keywords: list[str]) -> tuple[str, ...]:
    """1-3 captions: the title, the title with keywords, and a clip-art phrasing."""
    captions = [title]
    if keywords:
        captions.append(f"{title}: {', '.join(keywords)}")
    captions.append(f"clip art of {title}")
    return tuple(captions)


@dataclass(frozen=True)
class Candidate:
    relpath: str
    path: str
    digest: str
    title: str
    keywords: tuple[str, ...]
    creator: str
    category: str


def discover(root: Path, limit: int = 0) -> list[tuple[str, str]]:
    """(relative path, real path) of every SVG, one per real file, in path order.

    The package holds symlinked copies; the id comes from the real file's path when it lies
    under `root`, so it does not depend on which link is found first.
    """
    real_root = os.path.realpath(root)
    by_real: dict[str, str] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(".svg"):
                path = os.path.join(dirpath, name)
                real = os.path.realpath(path)
                rel = os.path.relpath(real, real_root)
                if rel.startswith(".."):
                    rel = os.path.relpath(path, root)
                by_real[real] = min(by_real.get(real, rel), rel)
    found = sorted((rel, real) for real, rel in by_real.items())
    return found[:limit] if limit else found


def read_candidates(files: list[tuple[str, str]], skips: Skips) -> list[Candidate]:
    """Parse metadata once per distinct content (byte-identical copies are dropped)."""
    seen: set[str] = set()
    out = []
    for rel, real in progress(files, "openclipart metadata"):
        data = Path(real).read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            skips.add("duplicate content", rel)
            continue
        seen.add(digest)
        try:
            meta = parse_metadata(data)
        except Exception as exc:  # defusedxml and expat raise several unrelated types
            skips.add(f"unreadable SVG ({type(exc).__name__})", rel)
            continue
        category = rel.split(os.sep, 1)[0] if os.sep in rel else ""
        out.append(Candidate(rel, real, digest, meta.title, meta.keywords, meta.creator, category))
    return out


def caption_candidates(cands: list[Candidate], cfg: OpenClipArtConfig, skips: Skips) -> Iterator:
    """(candidate, captions) for the pictures whose title names what they show.

    A title shared by many pictures names a collection ("Lemon SVG theme"), not a picture:
    those fall back to the file name. A caption that still names more than
    `max_same_caption` pictures cannot tell them apart, so those pictures are dropped.
    """
    titles = Counter(clean_phrase(c.title) for c in cands)
    named = []
    for cand in cands:
        title = clean_phrase(cand.title)
        if titles[title] >= cfg.shared_title:
            title = stem_phrase(cand.relpath, cand.creator)
        if is_generic(title) or title == clean_phrase(cand.creator):
            skips.add("generic or empty title", cand.relpath)
            continue
        named.append((cand, title))
    uses = Counter(title for _, title in named)
    for cand, title in named:
        if uses[title] > cfg.max_same_caption:
            skips.add("title shared by too many pictures", cand.relpath)
            continue
        yield cand, captions_for(title, clean_keywords(cand.keywords, title, cand.creator))


def record_id(relpath: str) -> str:
    stem = relpath[: -len(".svg")] if relpath.lower().endswith(".svg") else relpath
    return path_id("oca", stem)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def render_svg(job: tuple[str, str, int, int, bool]) -> str | None:
    """Render one SVG to a square PNG; returns None on success or the reason it failed.

    Runs in a worker. An alarm bounds the time spent on one file, so a pathological SVG
    is skipped instead of stalling the import.
    """
    src, dst, size, timeout, reuse = job
    if reuse and os.path.exists(dst):
        return None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        return save_square(_rasterise(src, 2 * size), dst, size)
    except _Timeout:
        return f"render timed out after {timeout}s"
    except Exception as exc:  # cairosvg surfaces parser, cairo and value errors alike
        return f"render failed ({type(exc).__name__})"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _rasterise(src: str, side: int) -> Image.Image:
    """The SVG at `side` pixels along its longer edge, as RGBA.

    The same pixels as decoding `cairosvg.svg2png(url=src, output_width=side)`, or
    `output_height=side` when that comes out taller than wide, at about half the cost: the
    file is parsed once, the orientation of an SVG without text is worked out before
    drawing instead of by drawing it (a portrait one was drawn twice), and the pixels are
    read from cairo's surface instead of being encoded to PNG and decoded back.
    """
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    tree = Tree(url=src)  # what svg2png parses; drawing changes the tree, sizing does not
    if not _TEXT.search(Path(src).read_bytes()):
        probe = _size_probe()(tree, None, SVG_DPI, output_width=side)
        tall = probe.height > probe.width
        fit = {"output_height": side} if tall else {"output_width": side}
        return _pixels(PNGSurface(tree, None, SVG_DPI, **fit))  # output None: no PNG
    wide = PNGSurface(tree, None, SVG_DPI, output_width=side)
    if wide.height <= wide.width:
        return _pixels(wide)
    wide.finish()
    # Text is drawn with cairo's font caches, and glyphs drawn at the wide scale change how
    # the tall drawing comes out (measured: computer/hardware/various_servers_01.svg);
    # svg2png drew every SVG wide first, so text SVGs still are, for the same pixels.
    return _pixels(PNGSurface(Tree(url=src), None, SVG_DPI, output_height=side))


def _pixels(surface: Any) -> Image.Image:
    image = straight_rgba(surface.cairo)
    surface.finish()
    return image


@cache
def _size_probe() -> type:
    """A PNGSurface that sizes itself exactly as PNGSurface does (same rounding, same
    errors), then draws nothing. Made on first use: cairosvg loads the cairo library."""
    from cairosvg.surface import PNGSurface

    class SizeProbe(PNGSurface):
        def draw(self, node: Any) -> None:
            pass

    return SizeProbe


def straight_rgba(surface: Any) -> Image.Image:
    """A cairo ARGB32 image surface as a PIL RGBA image, as cairo's own PNG writer stores it.

    cairo keeps colour premultiplied by alpha; its PNG writer (unpremultiply_data in
    cairo-png.c) divides it out rounding to nearest and writes 0 for transparent pixels.
    PIL's "RGBa" unpacker truncates instead, so the division is done here, on the few
    pixels that are neither transparent nor opaque.
    """
    surface.flush()
    width, height, stride = surface.get_width(), surface.get_height(), surface.get_stride()
    rows = np.frombuffer(surface.get_data(), dtype=np.uint8).reshape(height, stride)
    pixels = rows[:, : 4 * width].copy().view(np.uint32).ravel()  # (H*W,) 0xAARRGGBB
    alpha = pixels >> 24
    pixels[alpha == 0] = 0
    part = np.flatnonzero(alpha - np.uint32(1) < 254)  # 0 < alpha < 255
    if part.size:
        argb, a = pixels[part], alpha[part]
        r, g, b = ((((argb >> shift) & 0xFF) * 255 + a // 2) // a for shift in (16, 8, 0))
        pixels[part] = (a << 24) | (r << 16) | (g << 8) | b
    return Image.frombuffer("RGBA", (width, height), pixels, "raw", _CAIRO_ARGB32, 0, 1)


def import_openclipart(cfg: OpenClipArtConfig, out: str | Path) -> ImportResult:
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Open Clip Art not found at {root} (install it: apt-get install openclipart-svg)"
        )
    files = discover(root, cfg.limit)
    if not files:
        raise ValueError(f"no .svg files under {root}")
    options = {**asdict(cfg), "workers": None, "version": VERSION}
    fp = fingerprint("openclipart", options, [real for _, real in files])
    info = {"name": Path(out).name, "source": "openclipart", "root": str(root), "size": cfg.size}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        images = Path(out) / "images"
        reuse = prepare_render_dir(
            images, {"source": "openclipart", "size": cfg.size, "version": VERSION}
        )
        chosen = list(caption_candidates(read_candidates(files, skips), cfg, skips))
        jobs = [
            (c.path, str(images / f"{record_id(c.relpath)}.png"), cfg.size, cfg.timeout, reuse)
            for c, _ in chosen
        ]
        results = parallel_map(render_svg, jobs, cfg.workers)
        for (cand, captions), error in progress(
            zip(chosen, results, strict=True), "openclipart", len(jobs)
        ):
            if error:
                skips.add(error, cand.relpath)
                continue
            rid = record_id(cand.relpath)
            yield Record(
                id=rid,
                image=f"images/{rid}.png",
                captions=captions,
                split=splits.assign(rid, rid),
                meta={"file": cand.relpath, "title": cand.title, "category": cand.category},
            )

    return run_import(out, info, fp, produce)
