"""The category of a gallery item, for image-to-image relevance: the Open Clip Art folder a
drawing came from, the Unicode group of an emoji; None where a gallery has no categories."""

from __future__ import annotations

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


@cache
def emoji_group(char: str) -> str | None:
    """The Unicode emoji group (emoji-test.txt's "# group:") from the `emojis` package's table,
    trying the character without its variation selector too; None when it is not listed."""
    from emojis.db import get_emoji_by_code

    for code in (char, char.replace("\ufe0f", "")):
        found = get_emoji_by_code(code)
        if found is not None:
            return str(found.category)
    return None
