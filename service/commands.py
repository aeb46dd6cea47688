"""`cots serve`: run the search API and web page with uvicorn."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

# flag -> setting; each also reads COTS_<SETTING> from the environment, the flag wins.
FLAGS = {
    "bundle": "bundle directory from `cots export` (env COTS_BUNDLE)",
    "index": "index root from `cots index build`; its CURRENT is served (env COTS_INDEX)",
    "cors_origins": "comma-separated origins allowed by CORS, '*' for any (env COTS_CORS_ORIGINS)",
    "max_k": "largest k a request may ask for (env COTS_MAX_K, default 100)",
    "max_batch": "most queries in one request (env COTS_MAX_BATCH, default 16)",
    "max_image_bytes": "largest image upload in bytes (env COTS_MAX_IMAGE_BYTES, default 10 MiB)",
    "max_image_pixels": "largest image in pixels (env COTS_MAX_IMAGE_PIXELS, default 40M)",
    "batch_size": "most queries per encoder call (env COTS_BATCH_SIZE, default 32)",
    "batch_wait_ms": "micro-batch wait in ms while another batch runs; an idle service sends "
    "a query at once (env COTS_BATCH_WAIT_MS, default 2)",
    "intra_threads": "ONNX Runtime threads per encoder call, 0 = one per core (env "
    "COTS_INTRA_THREADS, default 1)",
    "batch_workers": "encoder batches that may run at once (env COTS_BATCH_WORKERS, default 2)",
    "search_threads": "FAISS threads per index search of a batch (env COTS_SEARCH_THREADS, "
    "default 1)",
    "lone_search_threads": "FAISS threads for a query alone in its batch, its inverted lists "
    "split across them (env COTS_LONE_SEARCH_THREADS, default 2)",
    "watch_interval_s": "seconds between CURRENT checks, 0 = off (env COTS_WATCH_INTERVAL_S)",
    "follow_bundle": "serve the bundle each index version records: a version built with another "
    "bundle swaps in with it instead of being refused (env COTS_FOLLOW_BUNDLE=true)",
    "backend": "where index versions live: faiss (files under --index, the default) or milvus "
    "(env COTS_BACKEND)",
    "milvus_uri": "Milvus: a milvus-lite file PATH.db or http://host:19530 (env COTS_MILVUS_URI)",
    "milvus_collection": "Milvus: the alias naming the served version's collection "
    "(env COTS_MILVUS_COLLECTION, default cots)",
}
# Flags that take no value: present means "true".
SWITCHES = {"follow_bundle"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the search API and web page",
        description="Serve text-to-image and image-to-text search over a bundle and the CURRENT "
        "version of an index root (or the version a Milvus alias names). Every setting is also an "
        "environment variable COTS_<NAME> (COTS_API_KEY, COTS_ADMIN_KEY and COTS_MILVUS_TOKEN "
        "only from the environment, never on the command line).",
    )
    for name, text in FLAGS.items():
        flag = f"--{name.replace('_', '-')}"
        if name in SWITCHES:
            parser.add_argument(flag, dest=name, action="store_const", const="true", help=text)
        else:
            parser.add_argument(flag, dest=name, help=text)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes; each loads the bundle and index, metrics are per process",
    )
    parser.add_argument(
        "--log-level", default="info", help="uvicorn log level (debug, info, warning, error)"
    )
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    # Flags become environment variables so that every uvicorn worker process sees them.
    for name in FLAGS:
        value = getattr(args, name)
        if value is not None:
            os.environ[f"COTS_{name.upper()}"] = str(value)
    settings = load_settings()
    lite = settings.backend == "milvus" and str(settings.milvus_uri).endswith(".db")
    if lite and args.workers > 1:
        raise ValueError("a milvus-lite file serves one process: --workers 1, or a Milvus server")
    preflight(settings)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return 0


def load_settings() -> Settings:
    """Settings from the environment; a missing or invalid one names its flag and variable."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            flag = f"--{name.replace('_', '-')}"
            if err["type"] == "missing":
                problems.append(f"{flag} (or COTS_{name.upper()}) is required")
            else:
                problems.append(f"{flag} / COTS_{name.upper()}: {err['msg']}")
        raise ValueError("; ".join(problems)) from None


def preflight(settings: Settings) -> None:
    """Refuse to start on a missing or mismatched bundle/index, with one clear line."""
    from index_builder.backends import open_store
    from service.versions import resolve_bundle

    resolve_bundle(settings, open_store(settings.index, settings.backend_config()))
