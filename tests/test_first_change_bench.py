"""bench/first_change.py on a tiny gallery: the gallery it writes, and one code's build and two
adds, timed in a fresh process run in that code's tree."""

from __future__ import annotations

import numpy as np

from bench import first_change as bench


def test_the_gallery_is_seeded_unit_vectors_with_captions_near_their_images(tmp_path):
    bench.gallery(tmp_path / "a", 2500)
    bench.gallery(tmp_path / "b", 2500)
    images = np.load(tmp_path / "a" / "image.npy")
    texts = np.load(tmp_path / "a" / "text.npy")
    assert images.shape == texts.shape == (2500, bench.DIM)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert np.array_equal(images, np.load(tmp_path / "b" / "image.npy"))  # seeded
    paired = np.einsum("nd,nd->n", images, texts)
    assert paired.min() > 0.5 and abs(float((images[:100] @ texts[100:200].T).mean())) < 0.05


def test_a_code_builds_and_changes_in_its_own_process(tmp_path):
    bench.gallery(tmp_path / "g", 3000)
    out = bench.measure(bench.ROOT, tmp_path / "root", tmp_path / "g", 2000)
    assert out["factory"] and out["version_bytes"] > 2 * 2000 * bench.DIM * 4
    assert all(out[name] > 0 for name in ("build_s", "first_add_s", "second_add_s"))
    assert not (tmp_path / "root").exists()  # each measurement cleans up after itself


def test_the_codes_are_named_by_their_commit(tmp_path):
    assert bench.commit(bench.ROOT).split("+")[0] not in ("", "unknown")
    assert bench.commit(tmp_path) == "unknown"  # not a checkout
