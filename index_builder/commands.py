"""`cots index ...`: embed a gallery with a bundle and build versioned indexes (FAISS files
under an index root, or collections in Milvus with `--backend milvus`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the modules themselves load with their subcommand (`cots --help` stays fast)
    from index_builder.backends.base import Store
    from index_builder.build import EmbedOptions, Sources
    from index_builder.bundle import Bundle

log = logging.getLogger(__name__)
REBUILD_HELP = """\
The batch job for a scheduler (cron, a Kubernetes CronJob): re-embed the gallery with the
given bundle, build both indexes and switch CURRENT (Milvus: the alias) only when the new
version is complete. The backend flags default to the service's variables (COTS_BACKEND,
COTS_MILVUS_URI, COTS_MILVUS_COLLECTION, COTS_MILVUS_TOKEN), so the job and the service it
feeds share one configuration.
Exit codes: 0 success; 2 bad input (missing or mismatched bundle, empty or malformed gallery,
a factory string FAISS rejects, a bad Milvus URI or refused token); 1 failure (disk full,
Milvus unreachable, another build running, anything else).
A failed or killed run leaves the serving version as it was; run it again to resume."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "index",
        help="embed a gallery with a bundle and build FAISS (or Milvus) indexes",
        description="Build, extend and inspect versioned indexes: FAISS files under an index "
        "root, or collections in Milvus with --backend milvus (see docs/architecture.md).",
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
    _change_commands(actions)
    _version_commands(actions)


def _change_commands(actions: argparse._SubParsersAction) -> None:
    """`cots index add` and `cots index delete`."""
    add = actions.add_parser(
        "add",
        help="add items to the current version (ids already present are skipped; --upsert)",
        description="Embed only the sources' items and publish a new version holding the "
        "current one plus them, without retraining the index (Milvus: added to the current "
        "version in place, logged as a change). Ids already in the index are "
        "skipped, or replaced with --upsert (an image's captions are replaced with it).",
    )
    _common_args(add)
    add.add_argument("--upsert", action="store_true", help="replace items whose id is present")
    add.set_defaults(func=_add)
    delete = actions.add_parser(
        "delete",
        help="remove items by id (a new version; an image's captions go with it)",
        description="Publish a new version without the given ids (Milvus: deleted from the "
        "current version in place, logged as a change). Unknown ids are an error and "
        "leave the current version as it is.",
    )
    _root_arg(delete)
    delete.add_argument("ids", nargs="*", help="item ids to remove")
    delete.add_argument("--ids-file", help="a file of ids, one per line ('-' for stdin)")
    delete.add_argument("--side", choices=("image", "text"), help="only this side (default: all)")
    delete.add_argument("--keep", type=int, default=3, help="versions to keep (default 3)")
    _backend_args(delete)
    delete.set_defaults(func=_delete)


def _version_commands(actions: argparse._SubParsersAction) -> None:
    """`cots index switch`, `cots index info` and `cots index verify`."""
    switch = actions.add_parser(
        "switch",
        help="point CURRENT at an existing version (roll back or forward)",
        description="Point CURRENT (Milvus: the alias) at an existing complete version, "
        "atomically; running services follow it within their watch interval. See `cots index "
        "info ROOT`.",
    )
    _root_arg(switch)
    switch.add_argument("version", help="a version name, e.g. v000003-20250101T120000Z")
    _backend_args(switch)
    switch.set_defaults(func=_switch)
    info = actions.add_parser("info", help="show the versions under an index root")
    _root_arg(info)
    info.add_argument("--version", help="show this version instead of the current one")
    info.add_argument("--json", action="store_true", help="print the version's index.json")
    _backend_args(info)
    info.set_defaults(func=_info)
    verify = actions.add_parser(
        "verify",
        help="check a version: FAISS files present, those with a recorded checksum (every "
        "file of a side over 1 GB) matching it; Milvus: its collection present",
    )
    _root_arg(verify)
    verify.add_argument("--version", help="check this version instead of the current one")
    _backend_args(verify)
    verify.set_defaults(func=_verify)


ROOT_HELP = "index root directory (Milvus: its work files and copied images)"


def _root_arg(parser: argparse.ArgumentParser, deprecated_out: bool = False) -> None:
    """The index root, named the same way by every `cots index` command: the first positional
    ROOT. Build, rebuild and add still accept the old `--out ROOT` (deprecated)."""
    parser.add_argument(
        "root", metavar="ROOT", nargs="?" if deprecated_out else None, help=ROOT_HELP
    )
    if deprecated_out:
        parser.add_argument("--out", dest="out_root", help=argparse.SUPPRESS)


def _root(args: argparse.Namespace) -> str:
    """The index root of build, rebuild and add, given first or (deprecated) as --out."""
    command = f"cots index {args.action}"
    if args.out_root is None:
        if args.root is None:
            raise ValueError(f"give the index root: {command} ROOT --bundle B (sources)")
        return str(args.root)
    if args.root is not None and args.root != args.out_root:
        raise ValueError(f"two index roots given: {args.root} and --out {args.out_root}")
    log.warning("%s --out ROOT is deprecated: name the root first, %s ROOT ...", command, command)
    return str(args.out_root)


def _backend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "backend",
        "Where the versions live: FAISS files under the index root (default), or a Milvus "
        "server or milvus-lite file (the index root then holds only work files and copied "
        "images). A Milvus token is read only from COTS_MILVUS_TOKEN.",
    )
    group.add_argument(
        "--backend",
        choices=("faiss", "milvus"),
        default=os.environ.get("COTS_BACKEND", "faiss"),
        help="faiss or milvus (env COTS_BACKEND, default faiss)",
    )
    group.add_argument(
        "--milvus-uri",
        default=os.environ.get("COTS_MILVUS_URI"),
        help="a milvus-lite file PATH.db or http://host:19530 (env COTS_MILVUS_URI)",
    )
    group.add_argument(
        "--milvus-collection",
        default=os.environ.get("COTS_MILVUS_COLLECTION", "cots"),
        help="alias of the current version and prefix of its collections "
        "(env COTS_MILVUS_COLLECTION, default cots)",
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    _root_arg(parser, deprecated_out=True)
    parser.add_argument("--bundle", required=True, help="bundle directory (from `cots export`)")
    sources = parser.add_argument_group(
        "sources (at least one; each side is optional)",
        "--data indexes a captioned dataset's images and captions; --images and --texts take "
        "any source for one side (docs/data.md, 'Index sources').",
    )
    sources.add_argument("--data", help="a dataset directory (`cots data ...`): both sides")
    sources.add_argument(
        "--images",
        help="images: a folder (captions optional), a dataset, a CSV/TSV/JSONL/Parquet table of "
        "paths and metadata, or WebDataset shards (.tar, a {000..009} pattern or a folder)",
    )
    sources.add_argument(
        "--texts",
        help="texts: a .txt file (one per line), a CSV/TSV/JSONL/Parquet table, a dataset",
    )
    sources.add_argument("--id-column", default="id", help="tables: the id column (default id)")
    sources.add_argument(
        "--image-column", help="tables: the image path column (default: image, path, file...)"
    )
    sources.add_argument(
        "--text-column", help="tables: the text column (default: text, caption, sentence)"
    )
    sources.add_argument("--split", choices=("train", "val", "test"), help="datasets: one split")
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
    _backend_args(parser)


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
    parser.add_argument(
        "--milvus-index",
        type=str.upper,
        default="AUTO",
        help="Milvus index type: AUTO (as FAISS: exact, HNSW, IVF by size), FLAT, HNSW, IVF_FLAT, "
        "GPU_CAGRA or GPU_IVF_FLAT (GPU Milvus images)",
    )
    parser.add_argument(
        "--milvus-params",
        type=json.loads,
        default={},
        help="Milvus index build parameters as JSON, over the defaults (e.g. '{\"M\": 48}')",
    )


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 4G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def _sources(args: argparse.Namespace) -> Sources:
    from index_builder.build import Sources
    from index_builder.sources import SourceOptions

    if not (args.data or args.images or args.texts):
        raise ValueError("give at least one source: --data, --images or --texts")
    options = SourceOptions(args.id_column, args.image_column, args.text_column, args.split)
    return Sources(args.data, args.images, args.texts, options)


def _setup(args: argparse.Namespace) -> tuple[Bundle, EmbedOptions]:
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


def _store(args: argparse.Namespace, root: str, keep: int = 3) -> Store:
    """The versions the flags name: FAISS under `root`, or Milvus (connected now, so that a
    bad URI or token fails before any embedding)."""
    from index_builder.backends import BackendConfig, open_store

    config = BackendConfig(
        name=args.backend,
        milvus_uri=args.milvus_uri,
        milvus_token=os.environ.get("COTS_MILVUS_TOKEN"),
        milvus_collection=args.milvus_collection,
        milvus_index=getattr(args, "milvus_index", "AUTO"),
        milvus_params=getattr(args, "milvus_params", {}),
    )
    return open_store(root, config, keep)


def _build(args: argparse.Namespace) -> int:
    from index_builder.backends.base import IndexOptions
    from index_builder.build import index_sources

    root = _root(args)
    bundle, embedding = _setup(args)
    options = IndexOptions(
        factory=args.factory,
        memory_budget=parse_bytes(args.memory_budget),
        target_recall=args.target_recall,
        queries=args.queries,
        on_disk=args.on_disk,
        use_gpu=not args.cpu,
    )
    if args.backend == "milvus" and (args.factory or args.on_disk):
        raise ValueError("--factory and --on-disk are FAISS options; use --milvus-index")
    sources = _sources(args)
    store = _store(args, root, args.keep)
    version = index_sources(root, bundle, sources, options, embedding, args.keep, store)
    _print_version(store, version)
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    message: BaseException
    try:
        return _build(args)
    except (ValueError, LookupError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        code = 2
        message = exc
    except (Exception, KeyboardInterrupt) as exc:  # a scheduler needs a code, not a traceback
        code = 1
        message = exc
    from index_builder.cli import one_line

    text = one_line(message)
    print(f"cots index rebuild: {'error' if code == 2 else 'failed'}: {text}", file=sys.stderr)
    return code


def _add(args: argparse.Namespace) -> int:
    from index_builder.collection import add_sources

    root = _root(args)
    bundle, embedding = _setup(args)
    sources = _sources(args)
    store = _store(args, root, args.keep)
    result = add_sources(root, bundle, sources, embedding, args.keep, args.upsert, store)
    print(result.summary())
    _print_version(store, result.version, skips=False)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from index_builder.collection import delete_ids

    ids = list(args.ids)
    if args.ids_file:
        handle = sys.stdin if args.ids_file == "-" else open(args.ids_file, encoding="utf-8")  # noqa: SIM115
        with handle:
            ids += [line.strip() for line in handle if line.strip()]
    store = _store(args, args.root, args.keep)
    result = delete_ids(store, ids, args.side)
    print(result.summary())
    _print_version(store, result.version, skips=False)
    return 0


def _switch(args: argparse.Namespace) -> int:
    store = _store(args, args.root)
    store.switch(args.version)
    print(f"the current version in {store.location} now names {args.version}")
    _print_info(store.read_info(args.version))
    return 0


def _info(args: argparse.Namespace) -> int:
    store = _store(args, args.root)
    info = store.read_info(args.version)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    current = store.current()
    print(f"index {store.location}  current {current}")
    for version in store.versions():
        print(f"  {'*' if version == current else ' '} {version}")
    _print_info(info)
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args, args.root)
    version = args.version or store.current() or ""
    problems = store.verify(version)
    for problem in problems:
        print(f"index version {version}: {problem}", file=sys.stderr)
    if not problems:
        print(f"index version {version}: no problem found")
    return 1 if problems else 0


def _print_version(store, version: str, skips: bool = True) -> None:  # store: Store
    print(f"index version {version} is current under {store.location}")
    _print_info(store.read_info(version), skips)


def _print_info(info: dict, skips: bool = True) -> None:
    """A version's sides; `skips`: also what the build that made it skipped (not for add and
    delete, whose new version carries the record of an earlier build)."""
    from index_builder.build import describe_skips

    where = f" ({info['bundle_path']})" if info.get("bundle_path") else ""
    print(f"version {info['version']}  bundle {info['bundle_id']}{where}  dim {info['embed_dim']}")
    if info.get("changes"):  # Milvus: changes made in place (backends/milvus/change.py)
        print(f"  changed in place {info['changes']} times, last at {info['changed']}")
    for side in ("image", "text"):
        s = info["sides"].get(side)
        if s is None:
            print(f"  {side:5s} (none)")
            continue
        recall = "n/a" if s["recall_at_10"] is None else f"{s['recall_at_10']:.3f}"
        queries = s.get("query_side", "text" if side == "image" else "image")
        size = f"  {s['bytes'] / 2**20:.1f} MiB" if "bytes" in s else ""  # Milvus: server-side
        print(
            f"  {side:5s} {s['factory']:20s} {s['count']:>9d} items  recall@10 {recall} "
            f"({queries} queries)  params {s['search_params']}{size}"
        )
        if s.get("choice"):
            print(f"        chosen: {s['choice']}")
        fields = ", ".join(f"{k}:{v}" for k, v in s.get("fields", {}).items())
        if fields:
            print(f"        metadata fields: {fields}")
        skipped = s.get("skipped") or {}
        if skips and skipped.get("count"):
            print(describe_skips(skipped, indent=" " * 8))
