"""The first change after a build, at scale: a build that records the checksums of a large
side's files while they are still in the page cache, against one that leaves the first change
to read every file it shares to checksum it (issue 27: the 1% add at 10M items a side took
110 s, most of it reading 25 GB for that).

    git worktree add ../base d3054f0  # the code before the build recorded checksums
    python -m bench.first_change --sizes 1000000,3000000 --base-code ../base \
        --work cots-data/first-change

For each size N: N seeded random unit vectors a side (images, and captions near them), then
for each code (`--base-code`, the tree measured as before, and this tree) a version built from
them with the automatic layout, a 1% add (N/100 new images with a caption each) and a second
1% add, each timed, in a fresh process whose `index_builder` is the code measured. Results go
to bench/results/first_change.json with the machine's calibration; the figure beside the other
figures of scale in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.figure import Figure, command_line
from index_builder.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DIM = 256
# One code's build and two 1% adds, run with `python -c` in that code's tree (its
# `index_builder` first on the path): argv is root, gallery directory, N.
CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from index_builder import collection
from index_builder.backends.base import IndexOptions
from index_builder.backends.faiss.store import IndexStore

root, gallery, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
vectors = {side: np.load(gallery / f"{side}.npy", mmap_mode="r") for side in ("image", "text")}

def rows(start, count, prefix):
    ids = [f"{prefix}{i}" for i in range(start, start + count)]
    return {
        "image": [{"id": i, "image": f"/g/{i}.png", "meta": {"n": k}} for k, i in enumerate(ids)],
        "text": [{"id": f"{i}#0", "image_id": i, "text": f"a picture of {i}"} for i in ids],
    }

store, step, out = IndexStore(root, keep=1), n // 100, {}
started = time.perf_counter()
base = {side: [v[:n]] for side, v in vectors.items()}
store.publish(bundle_id="bench", dim=vectors["image"].shape[1], shards=base,
              rows=rows(0, n, "g"), options=IndexOptions(), dataset={})
out["build_s"] = time.perf_counter() - started
for k, name in enumerate(("first_add_s", "second_add_s")):
    start = n + k * step
    added = {side: np.asarray(v[start : start + step]) for side, v in vectors.items()}
    started = time.perf_counter()
    collection.change(store, store.open(), collection.Change(rows(start, step, "g"), added))
    out[name] = time.perf_counter() - started
info = store.read_info(store.current())
out["factory"] = info["sides"]["image"]["factory"]
out["version_bytes"] = sum(p.stat().st_size for p in store.version_dir(store.current()).iterdir())
print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
"""


def gallery(directory: Path, total: int) -> None:
    """`total` seeded random unit image vectors and a caption vector near each, as `.npy`
    files written in chunks (bounded memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        side: np.lib.format.open_memmap(
            directory / f"{side}.npy", mode="w+", dtype=np.float32, shape=(total, DIM)
        )
        for side in ("image", "text")
    }
    for start in range(0, total, 100_000):
        count = min(100_000, total - start)
        images = _unit(rng.standard_normal((count, DIM), dtype=np.float32))
        files["image"][start : start + count] = images
        files["text"][start : start + count] = _unit(images + 0.8 * _noise(rng, count))
    for array in files.values():
        array.flush()


def _noise(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.standard_normal((count, DIM), dtype=np.float32) / np.sqrt(DIM)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(code: Path, root: Path, directory: Path, n: int) -> dict[str, Any]:
    """A build and two 1% adds by the code in `code`, in a fresh process run in that tree."""
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code.resolve())}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root.resolve()), str(directory.resolve()), str(n)],
        cwd=code, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit(tree: Path) -> str:
    """The commit a tree is checked out at, "+changes" when its tracked files differ from it."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=tree, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,3000000", help="items a side, comma-separated")
    parser.add_argument("--base-code", type=Path, required=True, help="the tree measured as before")
    parser.add_argument("--work", type=Path, default=Path("cots-data/first-change"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/first_change.json"))
    args = parser.parse_args(argv)
    from bench import calibration

    sizes = sorted(map(int, args.sizes.split(",")))
    codes = {"before": commit(args.base_code), "after": commit(ROOT)}  # as the run starts
    rates = calibration.rates()
    print("calibration", json.dumps(rates), flush=True)
    directory = args.work / "gallery"
    gallery(directory, sizes[-1] + sizes[-1] // 50)  # the largest size and its two adds
    results = {}
    for n in sizes:
        results[str(n)] = {}
        for name, code in (("before", args.base_code), ("after", ROOT)):
            results[str(n)][name] = measure(code, args.work / f"{name}-{n}", directory, n)
            print(n, name, json.dumps(results[str(n)][name]), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    record = {
        "command": command_line("first_change", sys.argv[1:] if argv is None else argv),
        "calibration": rates,
        "codes": codes,
        "sizes": results,
    }
    atomic_write_json(args.out, record)


FIGURE = Figure(
    "The first change after a build: checksums recorded by the build",
    "first_change*.json",
    "python -m bench.first_change --sizes 1000000,3000000 --base-code ../base "
    "--work cots-data/first-change",
    note="Before: the build records no checksums, and the first change reads every file of a "
    "side it shares as a hard link to checksum it; after: the build records them while the "
    "files are in the page cache. Random unit vectors (the cost is in bytes, not recall); "
    "the automatic layout; `version_bytes` is the published version's files. The codes "
    "are named in `codes` (the 2026-12-08 run, before that field: d3054f0 against 27c7f18, "
    "whose 3M adds still assigned vectors nprobe deep, fixed after it: "
    "bench/notes/scale_curve.md, 'The 1% add at scale').",
)


if __name__ == "__main__":
    main()
