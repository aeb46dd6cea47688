"""Generated galleries on disk: sampled once per model (bench/realistic_gallery.py) straight
into memory-mapped `.npy` files, in bounded memory whatever the size, and reused: a smaller
size is a prefix of a larger cached gallery (the sampler draws the same stream chunk by chunk),
so every size of a curve holds the same items."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np

from bench.realistic_gallery import CHUNK, ROOT, Model, Real, fitted
from index_builder.backends.faiss.store import IndexStore

CACHE = ROOT / "cots-data/cache/realistic"


def generated(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, Real]:
    """A generated gallery of `args.size` (images, captions), memory-mapped from the cache, and
    the held-out real queries. A gallery is sampled once per model and real roots; smaller
    sizes are prefixes of a larger cached one (the sampler draws the same stream chunk by
    chunk), so every size of a curve comes from the same gallery."""
    _, queries, model = fitted(args)
    roots = "|".join(f"{p.resolve()}:{IndexStore(p).current()}" for p in args.real)
    digest = hashlib.sha1(f"{roots}|{args.clusters}|{args.rank}".encode()).hexdigest()[:12]
    cache = getattr(args, "cache", None) or CACHE
    cache.mkdir(parents=True, exist_ok=True)
    paths = cached(cache, digest, args.size)
    if paths is None:
        paths = [cache / f"{side}-{args.size}-{digest}.npy" for side in ("image", "text")]
        write_gallery(model, args.size, paths)
    images, captions = (np.load(p, mmap_mode="r")[: args.size] for p in paths)
    return images, captions, queries


def cached(cache: Path, digest: str, size: int) -> list[Path] | None:
    """The smallest cached gallery of this model holding at least `size` pairs."""
    sizes = []
    for path in cache.glob(f"image-*-{digest}.npy"):
        count = int(path.name.split("-")[1])
        if count >= size and (cache / f"text-{count}-{digest}.npy").is_file():
            sizes.append(count)
    if not sizes:
        return None
    return [cache / f"{side}-{min(sizes)}-{digest}.npy" for side in ("image", "text")]


def write_gallery(model: Model, size: int, paths: list[Path]) -> None:
    """Sample `size` pairs straight into memory-mapped `.npy` files (temporary names, renamed
    when complete): memory stays bounded by one chunk whatever the size."""
    temps = [path.with_suffix(".tmp.npy") for path in paths]
    dim = model.pairs.mean.shape[1] // 2
    images, captions = (
        np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=(size, dim)) for t in temps
    )
    model.sample_into(images, captions, progress=size >= 10 * CHUNK)
    for out in (images, captions):
        out.flush()
    del images, captions
    for temp, path in zip(temps, paths, strict=True):
        os.replace(temp, path)
