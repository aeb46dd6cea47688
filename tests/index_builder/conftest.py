"""Fixtures: a tiny ONNX bundle and a tiny gallery (helpers in tiny_bundles.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_bundles import make_gallery, make_tiny_bundle

from index_builder.bundle import Bundle


@pytest.fixture
def tiny_bundle(tmp_path) -> Bundle:
    return make_tiny_bundle(tmp_path / "bundle")


@pytest.fixture
def gallery(tmp_path) -> Path:
    return make_gallery(tmp_path / "gallery")
