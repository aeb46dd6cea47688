"""Status routes: liveness and readiness (no key: probes must reach them), /info and /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import EngineDep, SettingsDep
from service.routes.openapi import api_router, error_responses
from service.schemas import Info, Readiness, Refusal, Status
from service.versions import counts

probes = APIRouter()
router = api_router()


@probes.get("/health", response_model=Status, tags=["status"])
async def health() -> Status:
    """The process is alive (it may still be loading)."""
    return Status(status="ok")


@probes.get(
    "/ready",
    response_model=Readiness,
    response_model_exclude_none=True,
    tags=["status"],
    responses=error_responses(503),
)
async def ready(engine: EngineDep) -> Readiness:
    """200 once the bundle and an index are loaded, naming the version served and the last
    version refused since (and why: the served one keeps serving); 503 before, with code
    `not_ready` while loading and `load_failed` after a failed load (retried: move CURRENT or
    reload another version; the details are in the log), and `index_corrupt` once a search
    found the served version's files damaged on disk (serve another version)."""
    searcher = engine.ready()
    refused = None
    if engine.refusal is not None:
        refused = Refusal(version=engine.refusal[0], reason=engine.refusal[1])
    return Readiness(
        status="ready",
        index_version=searcher.version,
        bundle_id=searcher.bundle.bundle_id,
        refused=refused,
    )


@router.get("/info", response_model=Info, tags=["status"], responses=error_responses(503))
async def info(engine: EngineDep, settings: SettingsDep) -> Info:
    """The bundle, the served index version, gallery size, index types and request limits."""
    searcher = engine.searcher
    bundle = searcher.bundle if searcher is not None else engine.bundle
    index: dict[str, Any] = {}
    served = {"image": 0, "text": 0}
    if searcher is not None:
        meta = searcher.index.info
        keys = ("factory", "count", "deleted", "search_params", "recall_at_10", "fields")
        index = {
            "version": searcher.version,
            "backend": meta.get("backend", "faiss"),
            "metric": meta.get("metric"),
            "created": meta.get("created"),
            "dataset": public_dataset(meta.get("dataset")),
            "sides": {side: {key: s.get(key) for key in keys} for side, s in meta["sides"].items()},
        }
        served = counts(searcher)
    return Info(
        bundle={
            "bundle_id": bundle.bundle_id,
            "embed_dim": bundle.embed_dim,
            "precision": bundle.precision,
            "image_spec": bundle.image_spec.to_dict(),
            "text_spec": bundle.text_spec.to_dict(),
        },
        index=index,
        gallery={"images": served["image"], "texts": served["text"]},
        limits={
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_offset": settings.max_offset,
            "max_batch": settings.max_batch,
            "max_text_chars": settings.max_text_chars,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_admin_items": settings.max_admin_items,
            "max_aspect_ratio": settings.max_aspect_ratio,
        },
        ready=searcher is not None,
    )


def public_dataset(dataset: Any) -> Any:
    """The dataset a version was built from, less where it lies on the server."""
    if not isinstance(dataset, dict):
        return dataset
    return {key: value for key, value in dataset.items() if key != "path"}


@router.get("/metrics", tags=["status"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests and latency per endpoint, time per stage."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
