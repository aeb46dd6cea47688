"""Gallery routes: a gallery image by id, the original file or a thumbnail."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from service.deps import EngineDep
from service.errors import NotFound
from service.routes.openapi import api_router, error_responses

router = api_router()


@router.get(
    "/images/{image_id:path}",
    tags=["gallery"],
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}},
        **error_responses(404, 422, 503),
    },
)
async def gallery_image(
    image_id: str,
    request: Request,
    engine: EngineDep,
    size: Annotated[
        int | None, Query(ge=16, le=1024, description="longest side of a JPEG thumbnail")
    ] = None,
) -> Response:
    """A gallery image by id: the original file, or a thumbnail with `size`. Only ids that
    the index holds are served; no path from the request ever reaches the file system."""
    path = await run_in_threadpool(engine.image_file, image_id)  # Milvus: a round trip
    if size is None:
        media = mimetypes.guess_type(path.name)[0] or ""
        return FileResponse(path, media_type=media if media.startswith("image/") else None)
    try:
        data = await run_in_threadpool(request.app.state.thumbnails.get, path, size)
    except (OSError, ValueError):
        raise NotFound(f"gallery image {image_id!r} cannot be decoded on the server") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
