from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from index_builder.data.emojis import (
    DEFAULT_FONT,
    EmojiConfig,
    captions_for,
    import_emoji,
    phrase,
    record_id,
)
from index_builder.manifest import load_records


def test_names_become_captions():
    assert phrase(":A_button_(blood_type):") == "a button blood type"
    assert captions_for(":ATM_sign:", [":atm:", ":atm_sign:"]) == (
        "atm sign",
        "atm sign emoji",
        "atm",
    )
    assert captions_for(":red_heart:", [":heart:"])[2] == "heart"
    assert record_id("\U0001f1e6\U0001f1eb") == "emoji.1f1e6-1f1eb"


@pytest.mark.skipif(
    not Path(DEFAULT_FONT).is_file(), reason="fonts-noto-color-emoji is not installed"
)
def test_real_font_renders_captioned_emoji(tmp_path):
    out = tmp_path / "emoji"
    result = import_emoji(EmojiConfig(size=64, workers=1, limit=12), out)
    records = load_records(out)
    assert len(records) == result.info["count"] >= 10
    for record in records:
        assert record.captions[0] == phrase(record.meta["name"])
        image = Image.open(out / record.image)
        assert image.size == (64, 64) and image.mode == "RGB"
        colours = {c for c in image.getdata() if max(c) - min(c) > 40}
        assert colours, f"{record.id} rendered without colour"
    assert import_emoji(EmojiConfig(size=64, workers=1, limit=12), out).up_to_date


def test_missing_font_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        import_emoji(EmojiConfig(font=str(tmp_path / "none.ttf")), tmp_path / "ds")
