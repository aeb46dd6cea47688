"""`cots index ...`: embed a gallery with a bundle and build versioned FAISS indexes."""

from __future__ import annotations

import argparse
import json
import re
import sys

REBUILD_HELP = """\
The batch job for a scheduler (cron, a Kubernetes CronJob): re-embed the gallery with the
given bundle, build both indexes and switch CURRENT only when the new version is complete.
Exit codes: 0 success; 2 bad input (missing or mismatched bundle, empty or malformed gallery,
a factory string FAISS rejects); 1 failure (disk full, another build running, anything else).
A failed or killed run leaves CURRENT on the previous version; run it again to resume."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "index",
        help="embed a gallery with a bundle and build FAISS indexes",
        description="Build, extend and inspect versioned FAISS indexes (see docs/architecture.md).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="embed a gallery and build a new index version")
    _build_args(build)
    build.set_defaults(func=_build)
    rebuild = actions.add_parser(
        "rebuild",
        help="scheduled rebuild with exit codes 0/1/2",
        description=REBUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _build_args(rebuild)
    rebuild.set_defaults(func=_rebuild)
    add = actions.add_parser("add", help="append a gallery's new items to the current version")
    _common_args(add)
    add.set_defaults(func=_add)
    info = actions.add_parser("info", help="show the versions under an index root")
    info.add_argument("root", help="index root directory")
    info.add_argument("--version", help="show this version instead of the current one")
    info.add_argument("--json", action="store_true", help="print the version's index.json")
    info.set_defaults(func=_info)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory (from `cots export`)")
    parser.add_argument("--data", required=True, help="gallery dataset directory or manifest")
    parser.add_argument("--out", required=True, help="index root directory")
    parser.add_argument("--split", choices=("train", "val", "test"), help="index only one split")
    parser.add_argument("--keep", type=int, default=3, help="versions to keep (default 3)")
    parser.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="embedding engine"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray embedding actors (ray engine)")
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime threads per embedding lane (cores / threads lanes run side by side; "
        "default 1 thread, one lane per core) and FAISS threads",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="encoder batch size per lane (16: fastest on a CPU; a GPU wants hundreds)",
    )
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per embedding shard")


def _build_args(parser: argparse.ArgumentParser) -> None:
    _common_args(parser)
    parser.add_argument(
        "--factory", help="FAISS factory string (Flat, HNSW32, IVF1024,Flat, OPQ32,IVF1024,PQ32)"
    )
    parser.add_argument(
        "--memory-budget", default="4G", help="index memory budget for the automatic choice (4G)"
    )
    parser.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 to tune nprobe/efSearch for"
    )
    parser.add_argument("--queries", type=int, default=1000, help="queries for measuring recall")
    parser.add_argument(
        "--on-disk", action="store_true", help="IVF only: merge per-shard indexes on disk"
    )
    parser.add_argument("--cpu", action="store_true", help="do not use a GPU for FAISS")


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 4G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def _setup(args: argparse.Namespace):  # -> (Bundle, EmbedOptions)
    import faiss

    from index_builder.build import EmbedOptions
    from index_builder.bundle import Bundle

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    embedding = EmbedOptions(
        engine=args.engine,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        threads=args.threads,
        workers=args.workers,
    )
    return Bundle.load(args.bundle), embedding


def _build(args: argparse.Namespace) -> int:
    from index_builder.build import IndexOptions, index_dataset

    bundle, embedding = _setup(args)
    options = IndexOptions(
        factory=args.factory,
        memory_budget=parse_bytes(args.memory_budget),
        target_recall=args.target_recall,
        queries=args.queries,
        on_disk=args.on_disk,
        use_gpu=not args.cpu,
    )
    version = index_dataset(args.out, bundle, args.data, args.split, options, embedding, args.keep)
    _print_version(args.out, version)
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    message: BaseException
    try:
        return _build(args)
    except (ValueError, LookupError, FileNotFoundError, NotADirectoryError) as exc:
        code = 2
        message = exc
    except (Exception, KeyboardInterrupt) as exc:  # a scheduler needs a code, not a traceback
        code = 1
        message = exc
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"cots index rebuild: {'error' if code == 2 else 'failed'}: {text}", file=sys.stderr)
    return code


def _add(args: argparse.Namespace) -> int:
    from index_builder.build import add_dataset

    bundle, embedding = _setup(args)
    version = add_dataset(args.out, bundle, args.data, args.split, embedding, args.keep)
    _print_version(args.out, version)
    return 0


def _info(args: argparse.Namespace) -> int:
    from index_builder.store import IndexStore

    store = IndexStore(args.root)
    info = store.read_info(args.version)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    current = store.current()
    print(f"root {store.root}  current {current}")
    for version in store.versions():
        print(f"  {'*' if version == current else ' '} {version}")
    _print_info(info)
    return 0


def _print_version(root: str, version: str) -> None:
    from index_builder.store import IndexStore

    print(f"index version {version} is current under {root}")
    _print_info(IndexStore(root).read_info(version))


def _print_info(info: dict) -> None:
    where = f" ({info['bundle_path']})" if info.get("bundle_path") else ""
    print(f"version {info['version']}  bundle {info['bundle_id']}{where}  dim {info['embed_dim']}")
    for side, other in (("image", "text"), ("text", "image")):
        s = info["sides"][side]
        recall = "n/a" if s["recall_at_10"] is None else f"{s['recall_at_10']:.3f}"
        print(
            f"  {side:5s} {s['factory']:20s} {s['count']:>9d} rows  recall@10 {recall} "
            f"({other} queries)  params {s['search_params']}  {s['bytes'] / 2**20:.1f} MiB"
        )
