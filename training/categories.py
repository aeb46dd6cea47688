"""The category of a gallery item, for image-to-image relevance: the Open Clip Art folder a
drawing came from, the Unicode group of an emoji; None where a gallery has no categories."""

from __future__ import annotations

import re
from functools import cache

from index_builder.manifest import Record


def record_category(record: Record) -> str | None:
    """`meta.category` (Open Clip Art: the top-level folder, e.g. "food"), else the Unicode
    emoji group of `meta.char` (e.g. "Food & Drink"), else None."""
    category = record.meta.get("category")
    if isinstance(category, str) and category:
        return category
    char = record.meta.get("char")
    if isinstance(char, str) and char:
        return emoji_group(char)
    return None


# Skin-tone modifiers and the emoji variation selector: a variant belongs to its base's group.
MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")
REGIONAL = range(0x1F1E6, 0x1F200)  # flags are pairs of regional indicator letters


@cache
def emoji_group(char: str) -> str | None:
    """The Unicode emoji group (emoji-test.txt's "# group:") from the `emojis` package's table.

    Sequences that table lacks (skin tones, newer ZWJ sequences) take their base emoji's
    group, as Unicode files them; regional-indicator pairs are Flags; None when not listed.
    """
    from emojis.db import get_emoji_by_code

    plain = MODIFIERS.sub("", char)
    base = plain.split("\u200d")[0]
    for code in (char, char.replace("\ufe0f", ""), plain, base, base + "\ufe0f"):
        found = get_emoji_by_code(code)
        if found is not None:
            return str(found.category)
    if plain and all(ord(c) in REGIONAL for c in plain):
        return "Flags"
    return None
