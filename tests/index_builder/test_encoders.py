"""Torch-free encoders: outputs equal a NumPy reference of the tiny graphs at any batch size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from index_builder.bundle import IMAGE_ONNX
from index_builder.encoders import ImageEncoder, TextEncoder
from index_builder.preprocess import preprocess_images


def _images(n, size=12):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + i, 3), np.uint8)) for i in range(n)]


def _weights(bundle):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(bundle.image_onnx)
    return numpy_helper.to_array(model.graph.initializer[0])


def test_image_encoder_matches_numpy_reference(tiny_bundle):
    images = _images(5)
    pixels = preprocess_images(images, tiny_bundle.image_spec)
    ref = pixels.reshape(5, -1) @ _weights(tiny_bundle)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    encoder = ImageEncoder(tiny_bundle, threads=1, batch_size=2)
    out = encoder.encode_images(images)
    assert out.dtype == np.float32 and out.shape == (5, 8)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_pixels(pixels), out, atol=1e-6)


def test_encode_paths_equals_encode_images(tiny_bundle, tmp_path):
    images = _images(3)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    encoder = ImageEncoder(tiny_bundle, threads=1)
    np.testing.assert_allclose(
        encoder.encode_paths(paths), encoder.encode_images(images), atol=1e-6
    )


def test_text_encoder_unit_vectors_and_batching(tiny_bundle):
    texts = ["a red cat", "the blue dog", "a red cat on a tree near the house", "sun"]
    one = TextEncoder(tiny_bundle, threads=1, batch_size=1).encode(texts)
    many = TextEncoder(tiny_bundle, threads=1, batch_size=64).encode(texts)
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1, atol=1e-5)
    assert TextEncoder(tiny_bundle).encode([]).shape == (0, 8)


def test_wrong_pixel_shape(tiny_bundle):
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        ImageEncoder(tiny_bundle).encode_pixels(np.zeros((1, 3, 9, 9), np.float32))


def test_corrupt_onnx_is_a_clear_error(tiny_bundle):
    (tiny_bundle.path / IMAGE_ONNX).write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        ImageEncoder(tiny_bundle)


def test_the_indexer_refuses_a_thin_image_by_its_header(tiny_bundle, tmp_path):
    Image.new("L", (1, 20000)).save(tmp_path / "thin.png")
    encoder = ImageEncoder(tiny_bundle, threads=1)
    with pytest.raises(ValueError, match="1x20000 is too thin"):
        encoder.encode_paths([tmp_path / "thin.png"])
