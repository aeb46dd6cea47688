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
    load_image_for,
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


def _resize_then_crop(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The reference: scale the short side to `resize`, then cut the centre `size` square."""
    width, height = image.size
    scale = spec.resize / min(width, height)
    new = (max(spec.size, round(width * scale)), max(spec.size, round(height * scale)))
    full = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - spec.size) // 2, (new[1] - spec.size) // 2
    crop = full.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(crop, np.float32)


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth synthetic photo: random colours at 12 x 12, scaled up (bilinear)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8))
    return small.resize(size, Image.Resampling.BILINEAR)


def _levels(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Normalised (3, S, S) pixels back to 0..255 (H, W, 3)."""
    std, mean = np.asarray(spec.std), np.asarray(spec.mean)
    return ((pixels.transpose(1, 2, 0) * std + mean) * 255).astype(np.float32)


@pytest.mark.parametrize(
    ("size", "spec"),
    [
        ((37, 23), ImageSpec(size=8, resize=8)),
        ((640, 480), ImageSpec(size=224, resize=224)),
        ((300, 1000), ImageSpec(size=224, resize=256)),
        ((5, 90), ImageSpec(size=16, resize=20)),
        ((60, 70), ImageSpec(size=224, resize=224)),
    ],
)
def test_preprocessing_equals_resizing_the_whole_image_then_cropping(size, spec):
    image = _photo(size)
    difference = np.abs(
        _levels(preprocess_image(image, spec), spec) - _resize_then_crop(image, spec)
    )
    # Pillow may run its two passes in another order for a box: a rounding step or two.
    assert difference.max() <= 2.01 and difference.mean() < 0.5


def test_large_downscales_reduce_first_and_stay_close(tmp_path):
    spec = ImageSpec(size=64, resize=64)
    image = _photo((1600, 1200))  # 19x down to 64: reduced by 6 first
    difference = np.abs(
        _levels(preprocess_image(image, spec), spec) - _resize_then_crop(image, spec)
    )
    assert difference.mean() < 0.5 and difference.max() <= 3.01
    path = tmp_path / "big.jpg"
    image.save(path, quality=95)
    drafted = load_image_for(path, spec)  # decoded at 1/4 scale: 400 x 300, still >= 3 x 64
    assert drafted.size == (400, 300)
    difference = np.abs(
        _levels(preprocess_image(drafted, spec), spec)
        - _levels(preprocess_image(load_image(path), spec), spec)
    )
    assert difference.mean() < 1.0


def test_thin_images_cost_no_more_than_square_ones(monkeypatch):
    spec = ImageSpec(size=224, resize=224)
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    for shape in ((1, 2000), (2000, 1), (3, 1000)):
        out = preprocess_image(Image.new("RGB", shape, "red"), spec)
        assert out.shape == (3, 224, 224)
    assert max(max(size) for size in sizes) == 224  # never the whole 224 x 448,000 image


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (21, 1), (1, 21)])
def test_extreme_shapes_are_refused_before_decoding(shape, tmp_path):
    path = tmp_path / "thin.png"
    Image.new("L", shape).save(path)
    with pytest.raises(ValueError, match=f"{shape[0]}x{shape[1]} is too thin"):
        load_image_for(path, ImageSpec())
    assert load_image(path).size == shape  # without a limit it still decodes (training)
    for ok in ((20, 1), (1, 20)):
        Image.new("L", ok).save(path)
        assert load_image_for(path, ImageSpec()).size == ok
