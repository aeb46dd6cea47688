"""Zero-shot evaluation of exported bundles on collections the model never trained on
(Fashion-MNIST, scikit-image's photographs, a folder of packaged photos, any gallery).
Torch-free: the bundle's ONNX towers through `index_builder.encoders`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from index_builder.bundle import Bundle
from index_builder.encoders import Encoders
from training.zero_shot.suites import KINDS, Suite, build_suites

__all__ = ["KINDS", "Suite", "build_suites", "evaluate_bundles", "load_bundles"]

log = logging.getLogger(__name__)


def load_bundles(named: Sequence[tuple[str, Path]]) -> dict[str, Bundle]:
    """Load and verify every bundle (name -> Bundle); names must be distinct."""
    bundles: dict[str, Bundle] = {}
    for name, path in named:
        if name in bundles:
            raise ValueError(f"two bundles are named {name!r}: give each --bundle NAME=PATH")
        bundles[name] = Bundle.load(path)
    return bundles


def evaluate_bundles(
    bundles: dict[str, Bundle], suites: Sequence[Suite], threads: int | None = None
) -> dict[str, Any]:
    """Score every bundle on every suite: {"bundles": {...}, "suites": {...}, "results":
    {bundle: {suite: metrics}}, "seconds": {bundle: {suite: s}}}."""
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for name, bundle in bundles.items():
        encoders = Encoders.open(bundle, threads=threads)
        results[name], seconds[name] = {}, {}
        for suite in suites:
            start = time.perf_counter()
            results[name][suite.name] = suite.score(encoders)
            seconds[name][suite.name] = round(time.perf_counter() - start, 2)
            log.info(
                "%s on %s: %s",
                name,
                suite.name,
                suite.format(suite.headline, results[name][suite.name]),
            )
    return {
        "bundles": {
            name: {
                "path": str(b.path),
                "bundle_id": b.bundle_id,
                "embed_dim": b.embed_dim,
                "precision": b.precision,
                "image_size": b.image_spec.size,
                "source": b.info.get("source"),
            }
            for name, b in bundles.items()
        },
        "suites": {
            s.name: {
                "kind": s.kind,
                "description": s.description,
                "headline": s.headline,
                "data": s.describe(),
            }
            for s in suites
        },
        "results": results,
        "seconds": seconds,
    }
