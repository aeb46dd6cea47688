"""Admin routes: reload (swap or roll back a version), add and delete items."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from index_builder.collection import ChangeResult
from service.bodies import parse_json, read_body, require_json, validate
from service.deps import AdminBody, EngineDep, ServedSearcher, SettingsDep, json_body
from service.engine import Engine
from service.errors import NotReady
from service.forms import ItemsForm
from service.items import Items, check_upload, read_items
from service.routes.openapi import CHANGE_ERRORS, admin_router, error_responses
from service.schemas import AddItems, ChangeResponse, DeleteItems, ReloadRequest, ReloadResponse
from service.settings import Settings
from service.versions import counts

RELOAD_BODY_BYTES = 16384
router = admin_router()


async def read_reload(request: Request, settings: Settings) -> ReloadRequest:
    """The optional reload body: none (or blank) reloads CURRENT."""
    body = await read_body(request, RELOAD_BODY_BYTES)
    if not body.strip():
        return ReloadRequest(version=None)
    require_json(request)
    return validate(ReloadRequest, parse_json(body))


def delete_limit(settings: Settings) -> int:
    return RELOAD_BODY_BYTES * 64


ReloadBody = Annotated[
    ReloadRequest,
    Depends(AdminBody(read_reload, {"application/json": ReloadRequest}, required=False)),
]
ItemsBody = Annotated[
    Items,
    Depends(
        AdminBody(read_items, {"application/json": AddItems, "multipart/form-data": ItemsForm})
    ),
]
DeleteBody = Annotated[DeleteItems, Depends(json_body(DeleteItems, delete_limit, admin=True))]


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses=error_responses(400, 404, 408, 409, 413, 415, 422, 503),
    tags=["admin"],
)
async def reload(engine: EngineDep, body: ReloadBody) -> ReloadResponse:
    """Load CURRENT (or `version`, which then becomes CURRENT: a rollback sticks) in the
    background and swap to it; a version built with another bundle is refused (409) and the
    old one keeps serving, unless the service follows bundles (COTS_FOLLOW_BUNDLE): then the
    bundle the version records swaps in with it."""
    version = body.version
    if engine.searcher is None and engine.load_error is None:
        raise NotReady("the service is still loading")
    previous, served = await engine.reload(version)
    return ReloadResponse(
        previous_version=previous, index_version=served, swapped=previous != served
    )


@router.post(
    "/items",
    response_model=ChangeResponse,
    responses=CHANGE_ERRORS,
    tags=["admin"],
)
async def add_items(
    engine: EngineDep,
    settings: SettingsDep,
    _: ServedSearcher,  # a 503 before reading a large body
    items: ItemsBody,
) -> ChangeResponse:
    """Add images (multipart files, or JSON base64) and texts (JSON) to the collection as a
    new index version, then serve it. Ids already present are skipped, or replaced with
    `upsert`; uploaded files are kept under the index root (`files/`), by content."""
    extensions = await run_in_threadpool(lambda: [check_upload(u, settings) for u in items.images])
    previous, result = await engine.add(items, extensions)
    return changed(previous, result, engine)


@router.post(
    "/delete",
    response_model=ChangeResponse,
    responses=CHANGE_ERRORS,
    tags=["admin"],
)
async def delete_items(engine: EngineDep, body: DeleteBody) -> ChangeResponse:
    """Delete items by id (from `side`, or from every side that holds them; an image's
    captions go with it) as a new index version, then serve it. An unknown id is a 404 and
    nothing changes."""
    previous, result = await engine.delete(body.ids, body.side)
    return changed(previous, result, engine)


def changed(previous: str, result: ChangeResult, engine: Engine) -> ChangeResponse:
    """The answer to a change: versions before and after, what changed, what is served."""
    served = counts(engine.current())
    return ChangeResponse(
        previous_version=previous,
        index_version=result.version,
        added=result.added,
        replaced=result.replaced,
        skipped_existing=result.skipped_existing,
        deleted=result.deleted,
        gallery={"images": served["image"], "texts": served["text"]},
    )
