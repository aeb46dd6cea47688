from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from index_builder.data.synthetic import COLOURS, SyntheticConfig, import_synthetic
from index_builder.manifest import load_records

CAPTION = re.compile(
    r"an? (small|large) (\w+) (\w+)(?: (above|below|to the left of|to the right of) "
    r"an? (small|large) (\w+) (\w+))?$"
)


def build(tmp_path, name, **kw):
    out = tmp_path / name
    import_synthetic(SyntheticConfig(**{"count": 24, "size": 96, "workers": 1, **kw}), out)
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (
        build(tmp_path, "a", seed=7),
        build(tmp_path, "b", seed=7, workers=2),
        build(tmp_path, "c", seed=8),
    )
    ra, rb, rc = load_records(a), load_records(b), load_records(c)
    assert [r.captions for r in ra] == [r.captions for r in rb]
    assert all((a / r.image).read_bytes() == (b / r.image).read_bytes() for r in ra)
    assert [r.captions for r in ra] != [r.captions for r in rc]


def _mask(pixels, colour):
    return np.all(pixels == np.asarray(COLOURS[colour]), axis=-1)


def test_captions_describe_their_images(tmp_path):
    out = build(tmp_path, "s", seed=3, count=60)
    relations = 0
    for record in load_records(out):
        match = CAPTION.match(record.captions[0])
        assert match, record.captions[0]
        size_a, colour_a, _, relation, size_b, colour_b, _ = match.groups()
        pixels = np.asarray(Image.open(out / record.image).convert("RGB"))
        mask_a = _mask(pixels, colour_a)
        assert mask_a.sum() > 20, f"{record.id}: no {colour_a} shape"
        if relation is None:
            colours = {tuple(c) for c in np.unique(pixels.reshape(-1, 3), axis=0).tolist()}
            assert colours == {(255, 255, 255), COLOURS[colour_a]}, record.id
            continue
        relations += 1
        mask_b = _mask(pixels, colour_b)
        assert mask_b.sum() > 20, f"{record.id}: no {colour_b} shape"
        (ya, xa), (yb, xb) = np.argwhere(mask_a).mean(0), np.argwhere(mask_b).mean(0)
        expected = {
            "above": ya < yb,
            "below": ya > yb,
            "to the left of": xa < xb,
            "to the right of": xa > xb,
        }
        assert expected[relation], f"{record.id}: {record.captions[0]}"
        if size_a != size_b:
            larger_a = mask_a.sum() > mask_b.sum()
            assert larger_a == (size_a == "large"), f"{record.id}: {record.captions[0]}"
    assert relations > 20


def test_count_bounds_and_rerun(tmp_path):
    with pytest.raises(ValueError, match="between 10 and 1,000,000"):
        import_synthetic(SyntheticConfig(count=5), tmp_path / "x")
    out = build(tmp_path, "r", seed=1)
    assert import_synthetic(SyntheticConfig(count=24, size=96, seed=1), out).up_to_date
