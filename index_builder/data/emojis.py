"""Emoji gallery: Noto Color Emoji glyphs drawn with Pillow, captioned from the `emoji` package."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    parallel_map,
    prepare_render_dir,
    progress,
    run_import,
    save_square,
)
from index_builder.manifest import Record

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
BITMAP_SIZE = 109  # the one size of the CBDT bitmaps in Noto Color Emoji
VERSION = 1


@dataclass(frozen=True)
class EmojiConfig:
    font: str = DEFAULT_FONT
    size: int = 256
    workers: int = 2
    limit: int = 0  # first N emoji in the package's order (0: all)


def phrase(name: str) -> str:
    """ ":flag_for_Afghanistan:" -> "flag for afghanistan"."""
    text = name.strip(":").replace("_", " ")
    text = re.sub(r"[()]", "", text)
    return " ".join(text.lower().split())


def captions_for(name: str, aliases: list[str]) -> tuple[str, ...]:
    """The CLDR name, an "emoji" phrasing, and up to two aliases that add words."""
    main = phrase(name)
    captions = [main, f"{main} emoji"]
    for alias in aliases:
        extra = phrase(alias)
        if extra and extra not in captions and extra.replace(" ", "") != main.replace(" ", ""):
            captions.append(extra)
        if len(captions) == 4:
            break
    return tuple(captions)


def emoji_table(limit: int = 0) -> list[tuple[str, str, list[str]]]:
    """(character, English name, aliases) of every fully-qualified emoji."""
    import emoji

    qualified = emoji.STATUS["fully_qualified"]
    rows = [
        (char, data["en"], list(data.get("alias", [])))
        for char, data in emoji.EMOJI_DATA.items()
        if data["status"] == qualified
    ]
    return rows[:limit] if limit else rows


def record_id(char: str) -> str:
    return "emoji." + "-".join(f"{ord(c):04x}" for c in char)


@lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, BITMAP_SIZE)


def render_emoji(job: tuple[str, str, str, int, bool]) -> str | None:
    """Draw one emoji to a square PNG; None on success or the reason it was skipped.

    A sequence the font does not know comes out as several glyphs side by side: skip it.
    """
    char, font_path, dst, size, reuse = job
    if reuse and Path(dst).exists():
        return None
    font = _font(font_path)
    left, top, right, bottom = (int(v) for v in font.getbbox(char))
    glyph_width = font.getbbox("\U0001f600")[2]
    if right - left > 1.2 * glyph_width:
        return "not in the font (drawn as several glyphs)"
    canvas = Image.new("RGBA", (right + 8, bottom + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), char, font=font, embedded_color=True)
    return save_square(canvas, dst, size)


def import_emoji(cfg: EmojiConfig, out: str | Path) -> ImportResult:
    font = Path(cfg.font)
    if not font.is_file():
        raise FileNotFoundError(
            f"emoji font not found: {font} (install it: apt-get install fonts-noto-color-emoji)"
        )
    import emoji

    rows = emoji_table(cfg.limit)
    options = {**asdict(cfg), "workers": None, "version": VERSION, "emoji": emoji.__version__}
    fp = fingerprint("emoji", options, [font])
    info = {"name": Path(out).name, "source": "emoji", "font": str(font), "size": cfg.size}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        images = Path(out) / "images"
        stat = font.stat()
        params = {"source": "emoji", "size": cfg.size, "version": VERSION, "font": stat.st_mtime_ns}
        reuse = prepare_render_dir(images, params)
        jobs = [
            (char, str(font), str(images / f"{record_id(char)}.png"), cfg.size, reuse)
            for char, _, _ in rows
        ]
        results = parallel_map(render_emoji, jobs, cfg.workers, chunksize=32)
        for (char, name, aliases), error in progress(
            zip(rows, results, strict=True), "emoji", len(rows)
        ):
            if error:
                skips.add(error, name)
                continue
            rid = record_id(char)
            yield Record(
                id=rid,
                image=f"images/{rid}.png",
                captions=captions_for(name, aliases),
                split=splits.assign(rid, rid),
                meta={"char": char, "name": name},
            )

    return run_import(out, info, fp, produce)
