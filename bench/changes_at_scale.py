"""The cost of a change and of loading a version against gallery size (issue 27), before (the
main branch's code: a change rewrites the whole version) and after (segments: a change writes
a delta segment and tombstones; id lookups persisted), in one run.

    python -m bench.changes_at_scale --gallery cots-data/cache/realistic \
        --sizes 100000,1000000 --base-code ../main --work cots-data/changes

For each size N (a prefix of a cached realistic gallery, bench/gallery_files.py): one version
of N images and N captions is built (IVF1024,SQ8), then for each code (`--base-code`, this
tree) a copy of it is changed in turn: a 1% add (N/100 new images with a caption each), a 1%
delete (N/100 images, their captions with them), a 1% upsert (N/100 images replaced). Each
change is timed and the bytes it wrote counted (files of the new version not sharing an
inode with the previous one); the version is loaded in a fresh process before the changes
and after them: open, id lookups, filter columns (two metadata fields), one search a side.
Results go to bench/results/changes_at_scale.json with the machine's calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.figure import Figure  # main's tree has it too: the children import this file

FACTORY = "IVF1024,SQ8"


def _rows(start: int, count: int, prefix: str) -> dict[str, list[dict[str, Any]]]:
    ids = [f"{prefix}{i}" for i in range(start, start + count)]
    meta = [{"group": f"g{i % 50}", "n": i} for i in range(start, start + count)]
    return {
        "image": [{"id": i, "image": f"/g/{i}.png", "meta": m}
                  for i, m in zip(ids, meta, strict=True)],
        "text": [{"id": f"{i}#0", "image_id": i, "text": f"a picture of {i}", "meta": m}
                 for i, m in zip(ids, meta, strict=True)],
    }  # fmt: skip


def _inodes(path: Path) -> set[int]:
    return {p.stat().st_ino for p in path.iterdir()}


def measure_changes(root: Path, gallery: dict[str, np.ndarray], n: int) -> dict[str, Any]:
    """Three 1% changes, each timed, with the bytes of the new version's files that are not
    hard links of the previous version's (its files are alive while the change writes, so
    no inode number is reused)."""
    from index_builder import collection
    from index_builder.backends.faiss.store import IndexStore

    store, step, out = IndexStore(root, keep=1), max(1, n // 100), {}
    new = {side: np.asarray(v[:step]) for side, v in gallery.items()}  # re-embedded copies
    changes = {
        "add": lambda: collection.change(
            store, store.open(), collection.Change(_rows(n, step, "new"), new)
        ),
        "delete": lambda: collection.delete_ids(store, [f"syn{i}" for i in range(step)]),
        "upsert": lambda: collection.change(
            store, store.open(), collection.Change(_rows(step, step, "syn"), new, upsert=True)
        ),
    }
    for name, run in changes.items():
        before = _inodes(store.version_dir(store.current()))
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        after = store.version_dir(store.current())
        written = sum(p.stat().st_size for p in after.iterdir() if p.stat().st_ino not in before)
        out[name] = {"seconds": round(seconds, 2), "bytes_written": written}
    return out


def measure_load(root: Path) -> dict[str, float]:
    """Open CURRENT, build the id lookups and filter columns, search once a side."""
    from index_builder.backends.faiss.store import IndexStore

    timings, started = {}, time.perf_counter()
    loaded = IndexStore(root).open()
    timings["open_s"] = time.perf_counter() - started
    for side in loaded.sides:
        t = time.perf_counter()
        loaded.row_of(side, "")
        timings[f"{side}_ids_s"] = time.perf_counter() - t
        t = time.perf_counter()
        loaded.warm(side)  # the lookups are built: this is the filter columns
        timings[f"{side}_columns_s"] = time.perf_counter() - t
        query = np.asarray(loaded.vector(side, 0))[None]
        t = time.perf_counter()
        loaded.search(side, query, 10)
        timings[f"{side}_search_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    return {k: round(v, 3) for k, v in timings.items()}


def build(root: Path, gallery: dict[str, np.ndarray], n: int) -> float:
    """The version of N images and N captions every code changes a copy of."""
    from index_builder.backends.base import IndexOptions
    from index_builder.backends.faiss.store import IndexStore

    started = time.perf_counter()
    IndexStore(root, keep=1).publish(
        bundle_id="bench",
        dim=gallery["image"].shape[1],
        shards={side: [v] for side, v in gallery.items()},
        rows=_rows(0, n, "syn"),
        options=IndexOptions(factory=FACTORY, queries=200),
        dataset={},
    )
    return time.perf_counter() - started


def as_old_version(root: Path) -> None:
    """Make the copy a version written before persisted lookups (main's code reads and
    carries it as its own; its loads build the lookups as they always did)."""
    path = root / "versions" / (root / "CURRENT").read_text().strip()
    info = json.loads((path / "index.json").read_text())
    for side in info["sides"].values():
        side.pop("keys", None)
    (path / "index.json").write_text(json.dumps(info))
    for file in path.glob("*.keys.npy"):
        file.unlink()


def _gallery(directory: Path, n: int) -> dict[str, np.ndarray]:
    found = {}
    for side in ("image", "text"):
        path = min(directory.glob(f"{side}-*.npy"), key=lambda p: int(p.name.split("-")[1])
                   if int(p.name.split("-")[1]) >= n else 1 << 62)  # fmt: skip
        found[side] = np.load(path, mmap_mode="r")[:n]
    return found


def _child(args: argparse.Namespace) -> None:
    """One measurement, in a process whose `index_builder` is the code measured."""
    if args.child == "build":
        seconds = build(args.root, _gallery(args.gallery, args.n), args.n)
        result: Any = {"build_s": round(seconds, 1)}
    elif args.child == "load":
        result = measure_load(args.root)
    else:
        result = measure_changes(args.root, _gallery(args.gallery, args.n), args.n)
    print(json.dumps(result))


def _run(code: Path, *argv: Any) -> Any:
    env = {**os.environ, "PYTHONPATH": str(code.resolve())}
    done = subprocess.run(
        [sys.executable, __file__, *map(str, argv)], env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    here = Path(__file__).resolve().parents[1]
    base = args.work / f"base-{n}"
    shutil.rmtree(args.work, ignore_errors=True)
    common = ["--gallery", args.gallery, "--n", n]
    result: dict[str, Any] = _run(here, "--child", "build", "--root", base, *common)
    for name, code in (("before", args.base_code), ("after", here)):
        root = args.work / name
        shutil.copytree(base, root)
        if name == "before":
            as_old_version(root)
        load = _run(code, "--child", "load", "--root", root, *common)
        changes = _run(code, "--child", "changes", "--root", root, *common)
        after = _run(code, "--child", "load", "--root", root, *common)
        result[name] = {"load": load, "changes": changes, "load_after_changes": after}
        print(n, name, json.dumps(result[name]), flush=True)
        shutil.rmtree(root)
    shutil.rmtree(args.work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=Path, required=True, help="cached realistic gallery")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--base-code", type=Path, help="the tree measured as before (main)")
    parser.add_argument("--work", type=Path, default=Path("cots-data/changes"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/changes_at_scale.json"))
    parser.add_argument("--child", choices=("build", "load", "changes"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    from bench import calibration
    from bench.figure import command_line

    rates = calibration.rates()
    print("calibration", json.dumps(rates), flush=True)
    sizes = {n: _size(args, n) for n in map(int, args.sizes.split(","))}
    record = {"command": command_line("changes_at_scale", sys.argv[1:] if argv is None else argv),
              "calibration": rates, "factory": FACTORY, "sizes": sizes}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, args.out)


FIGURE = Figure(
    "Changes and loads at scale: segments against whole-version rewrites",
    "changes_at_scale*.json",
    "python -m bench.changes_at_scale --gallery cots-data/cache/realistic "
    "--sizes 100000,1000000 --base-code ../main --work cots-data/changes",
    note="Before: the main branch's code (a change rewrites the version); after: segments. "
    "Bytes written count the new version's files that are not hard links of the previous "
    "one's; below 1 GB a side the unchanged segments are copied, so they count.",
)


if __name__ == "__main__":
    main()
