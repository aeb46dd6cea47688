from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from index_builder.preprocess import (
    ImageSpec,
    TextSpec,
    TextTokenizer,
    default_tokenizer_json,
    load_image,
    preprocess_image,
    preprocess_images,
)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_transparent_pixels_become_background():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgb = load_image(png_bytes(image))
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)


def test_resize_crop_normalise_matches_hand_computation():
    spec = ImageSpec(size=4, resize=4, interpolation="bilinear")
    array = np.zeros((8, 16, 3), np.uint8)
    array[:, 4:12] = (255, 128, 0)  # the middle half: exactly what the centre crop keeps
    out = preprocess_image(Image.fromarray(array), spec)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    expected_red = (1.0 - spec.mean[0]) / spec.std[0]
    assert out[0, :, 1:3] == pytest.approx(expected_red, abs=0.05)
    assert out[2].max() < 0  # no blue anywhere
    assert preprocess_images([Image.fromarray(array)] * 3, spec).shape == (3, 3, 4, 4)


def test_normalisation_is_bit_identical_to_the_plain_formula():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    array[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    spec = ImageSpec(size=24, resize=24)  # no resize, no crop: only the normalisation
    pixels = np.asarray(array, dtype=np.float32) / np.float32(255.0)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    expected = ((pixels - mean) / std).transpose(2, 0, 1)  # the formula as first written
    out = preprocess_image(Image.fromarray(array), spec)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_spec_round_trip_and_validation():
    spec = ImageSpec(size=128, resize=146)
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    assert TextSpec.from_dict(TextSpec(40).to_dict()) == TextSpec(40)
    with pytest.raises(ValueError):
        ImageSpec(size=300, resize=224)


def test_bad_images_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(b"definitely not an image")
    truncated = png_bytes(Image.new("RGB", (64, 64), "red"))[:60]
    with pytest.raises(ValueError):
        load_image(truncated)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_tokenizer_pads_truncates_and_masks():
    tok = TextTokenizer(default_tokenizer_json(), context_length=8)
    ids, mask = tok(["a red circle above a blue square and more words", "hi"])
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0] == tok.token_id("[CLS]") and ids[0, -1] == tok.token_id("[SEP]")
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        tok([])
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        bad = default_tokenizer_json().parent / "config.json"
        TextTokenizer(bad, 8)
