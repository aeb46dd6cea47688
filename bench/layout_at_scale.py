"""Index layouts for galleries of millions (issue 27): per-query cost of the IVF scan and of the
exact re-rank, and the recall served to held-out real queries, for compressed-code layouts.

    python -m bench.layout_at_scale --real cots-data/real-embeddings/openclipart \
        cots-data/real-embeddings/emoji cots-data/real-embeddings/synthetic --size 1000000

One generated gallery (bench/gallery_files.py) per size. Each layout is a FAISS factory string
(`{ivf}` the automatic IVF quantizer, `{nlist}` its list count, `{nlist2}` twice that, `{m}` and
`{m2}` a quarter and half the dimension), built with the product's builder and searched through
the product's search path (`search_index`: the codes' top rerank x 10, re-scored from the float
vectors) with held-out real queries of the other modality at each nprobe and re-rank depth:
recall@10 against exact search. At the smallest nprobe reaching the goal per depth, single
queries (one thread) are timed, interleaved across layouts: the IVF scan, and the re-rank's
reads of the float vectors through a memory map and through `os.preadv`
(`search.gathered`). The product's tuning (`search.tune`, the other side's gallery vectors as
queries) runs with the plain target and with its margin, and the recall those settings serve
to the real queries is recorded. Reads of re-rank vectors not in the page cache (evicted
first, as most of a 10M side's are) are timed through both paths too, and the resident
memory each path adds over many re-ranks (caption vectors). Results:
bench/results/layout_at_scale.json, with bench/calibration.py's figures before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench import calibration
from bench.figure import command_line
from bench.gallery_files import generated
from bench.realistic_gallery import RESULTS, add_model_args
from index_builder.backends import recall as rc
from index_builder.backends.base import ivf_lists
from index_builder.backends.faiss import faiss_index as fi
from index_builder.backends.faiss import search as fs
from index_builder.backends.recall import exact_knn, recall_at_k, sample_rows

K = 10
GOAL = 0.95
NPROBES = (32, 48, 64, 96, 128, 192, 256, 384, 512)
LAYOUTS = ("{ivf},SQ8", "{ivf},PQ{m2}x4fs", "IVF{nlist2}_HNSW32,SQ8")
DEPTHS = {"SQ8": (2, 4), "fs": (8, 32, 64)}


def build(factory: str, base: np.ndarray) -> tuple[Any, float]:
    started = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = fi.build_index(factory, [base], base.shape[1], use_gpu=False)
    return index, time.perf_counter() - started


def sweep(
    index: Any, stored: np.ndarray, queries: np.ndarray, truth: np.ndarray, depths: tuple
) -> tuple[list[dict], dict[int, int]]:
    """Served recall at each (nprobe, depth), until every depth is 0.02 above the goal."""
    points: list[dict] = []
    reached: dict[int, int] = {}
    for nprobe in NPROBES:
        fi.set_search_params(index, {"nprobe": nprobe})
        for depth in depths:
            rows = fs.search_index(index, stored, queries, K, None, depth)[1]
            recall = recall_at_k(rows, truth)
            points.append({"nprobe": nprobe, "rerank": depth, "recall": round(recall, 4)})
            print(f"    nprobe {nprobe} rerank {depth}: recall {recall:.4f}", flush=True)
            if recall >= GOAL:
                reached.setdefault(depth, nprobe)
        if all(p["recall"] >= GOAL + 0.02 for p in points[-len(depths) :]):
            break
    return points, reached


def timed(cases: list[dict], queries: np.ndarray) -> None:
    """Median per-query ms of the scan and of the re-rank through mmap and through pread, for
    each case, the cases interleaved query by query (one thread: what a request costs)."""
    faiss.omp_set_num_threads(1)
    times: list[dict[str, list[float]]] = [{"scan": [], "mmap": [], "pread": []} for _ in cases]
    for query in queries:
        q = query[None]
        for case, spent in zip(cases, times, strict=True):
            params = faiss.SearchParametersIVF()
            params.nprobe = case["nprobe"]
            started = time.perf_counter()
            rows = case["index"].search(q, K * case["rerank"], params=params)[1].ravel()
            scanned = time.perf_counter()
            mapped = np.asarray(case["stored"][np.maximum(rows, 0)], dtype=np.float32)
            after_mmap = time.perf_counter()
            read = fs.gathered(case["stored"], np.maximum(rows, 0))
            after_pread = time.perf_counter()
            if not np.array_equal(mapped, read):
                raise AssertionError("pread and mmap gathered different vectors")
            spent["scan"].append(scanned - started)
            spent["mmap"].append(after_mmap - scanned)
            spent["pread"].append(after_pread - after_mmap)
    for case, spent in zip(cases, times, strict=True):
        for name, values in spent.items():
            case[f"{name}_ms"] = round(float(np.median(values)) * 1000, 3)


def cold_rerank(stored: np.ndarray, depths: tuple[int, ...], trials: int) -> dict[str, float]:
    """Median ms to gather `depth` random rows of a whole memory-mapped `.npy` file none of
    whose pages are cached (evicted with POSIX_FADV_DONTNEED before each read, as a 10M-item
    side's vectors mostly are): through the memory map (opened afresh: mapped pages cannot
    be evicted) and through `search.gathered` (pread, reads started together)."""
    path = str(stored.filename)  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    spent: dict[str, list[float]] = {}
    for _ in range(trials):
        for depth in depths:
            rows = rng.integers(0, len(stored), depth)
            for name in ("mmap", "pread"):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
                mapped = np.load(path, mmap_mode="r")
                started = time.perf_counter()
                if name == "mmap":
                    np.asarray(mapped[rows], dtype=np.float32)
                else:
                    fs.gathered(mapped, rows)
                spent.setdefault(f"{name}_{depth}_rows_ms", []).append(
                    time.perf_counter() - started
                )
                del mapped
    return {name: round(float(np.median(v)) * 1000, 3) for name, v in spent.items()}


def resident_growth(stored: np.ndarray, queries: int, depth: int = 2 * K) -> dict[str, float]:
    """MiB the process's resident memory grows by over `queries` re-rank gathers of `depth`
    random rows, by pread first, then through the memory map (the pages it maps stay)."""

    def resident() -> int:
        lines = Path("/proc/self/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines)
        return int(fields["VmRSS"].split()[0]) * 1024

    rng = np.random.default_rng(1)
    out: dict[str, float] = {}
    for name in ("pread", "mmap"):
        before, started = resident(), time.perf_counter()
        for _ in range(queries):
            rows = rng.integers(0, len(stored), depth)
            if name == "pread":
                fs.gathered(stored, rows)
            else:
                np.asarray(stored[rows], dtype=np.float32)
        out[f"{name}_rss_growth_mib"] = round((resident() - before) / 2**20, 1)
        out[f"{name}_ms_per_query"] = round((time.perf_counter() - started) * 1000 / queries, 4)
    return out


def tuned(
    index: Any,
    stored: np.ndarray,
    tune_queries: np.ndarray,
    served: np.ndarray,
    served_truth: np.ndarray,
    margin: float,
) -> dict[str, Any]:
    """The product's tuning with gallery vectors of the other side, and what it serves."""
    truth = exact_knn(tune_queries, [stored], K)
    params, recall = fs.tune(index, tune_queries, truth, GOAL, stored=stored, margin=margin)
    rows = fs.search_index(index, stored, served, K, None, params.get("rerank", 1))[1]
    return {
        "aimed": round(rc.tuning_target(GOAL, margin), 4),
        "params": params,
        "tuned_recall": round(recall, 4),
        "served_recall": round(recall_at_k(rows, served_truth), 4),
    }


def layout(
    factory: str, base: np.ndarray, queries: np.ndarray, tune_queries: np.ndarray
) -> tuple[dict[str, Any], list[dict]]:
    """One layout built, swept and tuned; the cases to time (one per re-rank depth)."""
    truth = exact_knn(queries, [base], K)
    index, seconds = build(factory, base)
    depths = DEPTHS["fs" if factory.endswith("fs") else "SQ8"]
    points, reached = sweep(index, base, queries, truth, depths)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    tuning = {
        name: tuned(index, base, tune_queries, queries, truth, margin)
        for name, margin in (("plain", 0.0), ("margin", rc.TUNE_MARGIN))
    }
    print(f"    tuning: {tuning}", flush=True)
    result = {
        "factory": factory,
        "build_seconds": round(seconds, 1),
        "index_bytes": len(faiss.serialize_index(index)),
        "points": points,
        "tuning": tuning,
        "timed": [],
    }
    cases = [
        {"nprobe": nprobe, "rerank": depth, "index": index, "stored": base, "result": result}
        for depth, nprobe in reached.items()
    ]
    return result, cases


def side(
    name: str, base: np.ndarray, other: np.ndarray, queries: np.ndarray, args: argparse.Namespace
) -> list[dict]:
    dim, nlist = base.shape[1], ivf_lists(len(base))
    tune_queries = sample_rows([other], args.queries, seed=1)
    results, cases = [], []
    for form in args.layouts:
        ivf = f"IVF{nlist}_HNSW32" if nlist >= fi.HNSW_LISTS else f"IVF{nlist}"
        factory = form.format(ivf=ivf, nlist=nlist, nlist2=2 * nlist, m=dim // 4, m2=dim // 2)
        print(f"  {name} {factory}", flush=True)
        result, more = layout(factory, base, queries, tune_queries)
        results.append(result)
        cases += more
    timed(cases, queries[: args.single])
    for case in cases:
        record = {k: v for k, v in case.items() if k not in ("index", "stored", "result")}
        case["result"]["timed"].append(record)
        print(f"  {case['result']['factory']} {record}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--size", type=int, default=1_000_000, help="items per side")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per side")
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--directions", nargs="*", default=["t2i", "i2t"])
    parser.add_argument("--cold-trials", type=int, default=30, help="uncached re-rank reads")
    parser.add_argument("--rss-queries", type=int, default=5000, help="re-ranks for RSS growth")
    parser.add_argument("--out", default="bench/results/layout_at_scale.json")
    args = parser.parse_args(argv)
    images, captions, held_out = generated(args)
    rng = np.random.default_rng(0)
    pick = lambda x: np.ascontiguousarray(x[rng.permutation(len(x))[: args.queries]])  # noqa: E731
    sides = {
        "t2i": (images, captions, pick(held_out.captions)),
        "i2t": (captions, images, pick(held_out.images)),
    }
    machine = calibration.rates()
    print(f"calibration: {machine}", flush=True)
    out: dict[str, Any] = {
        "size": args.size,
        "queries": args.queries,
        "goal": GOAL,
        "calibration": machine,
        "command": command_line("layout_at_scale", sys.argv[1:] if argv is None else argv),
        "directions": {},
    }
    if args.cold_trials:
        out["cold_rerank"] = cold_rerank(images, (20, 80), args.cold_trials)
        print(f"re-rank reads, uncached: {out['cold_rerank']}", flush=True)
    if args.rss_queries:
        out["resident_growth"] = resident_growth(captions, args.rss_queries)
        print(f"resident memory growth: {out['resident_growth']}", flush=True)
    for direction in args.directions:
        base, other, queries = sides[direction]
        out["directions"][direction] = side(direction, base, other, queries, args)
        write(out, RESULTS.parent.parent / args.out)
    write(out, RESULTS.parent.parent / args.out)
    return 0


def write(out: dict[str, Any], path: Path) -> None:
    out["calibration_after"] = calibration.rates()
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(temp, path)


if __name__ == "__main__":
    raise SystemExit(main())
