"""The OpenAPI document, pinned: a change to any route, model, error or request body shows
up here. Request bodies are generated from each route's `RequestBody` dependency (the key
checked, the body read within its limit and parsed into its model), never written by hand.

Regenerate the pinned file after an intended change:
    PYTHONPATH=$PWD python tests/service/test_openapi_document.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PINNED = Path(__file__).with_name("openapi.json")


def document() -> dict[str, Any]:
    """The real app's document, built without loading a bundle or an index."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(bundle=Path("/nonexistent"), index=Path("/nonexistent")))
    return app.openapi()


def test_the_document_is_the_pinned_one():
    assert document() == json.loads(PINNED.read_text())


def test_every_request_body_is_its_routes_body_dependency():
    from fastapi.encoders import jsonable_encoder
    from fastapi.routing import APIRoute

    from service.deps import RequestBody
    from service.routes import admin, gallery, search, status, video

    paths = document()["paths"]
    documented = {
        (path, method) for path, ops in paths.items() for method, op in ops.items()
        if "requestBody" in op
    }  # fmt: skip
    read = set()
    routes = [r for m in (admin, gallery, search, status, video) for r in m.router.routes]
    for route in [*routes, *status.probes.routes]:
        if not isinstance(route, APIRoute):
            continue
        bodies = [d.call for d in route.dependant.dependencies if isinstance(d.call, RequestBody)]
        for method in route.methods:
            operation = paths.get(route.path_format, {}).get(method.lower(), {})
            if bodies:
                read.add((route.path_format, method.lower()))
                generated = bodies[0].openapi()["requestBody"]
                assert operation["requestBody"] == jsonable_encoder(generated, exclude_none=True)
    assert read == documented and len(read) == 9


def test_multipart_bodies_are_the_form_models():
    paths = document()["paths"]
    for path, form in (
        ("/search/image-to-text", "ImageForm"),
        ("/search/image-to-image", "ImageForm"),
        ("/admin/items", "ItemsForm"),
        ("/search/video-to-text", "ClipForm"),
    ):
        content = paths[path]["post"]["requestBody"]["content"]
        schema = content["multipart/form-data"]["schema"]
        assert schema["title"] == form
        files = "video" if form == "ClipForm" else "image"
        assert schema["required"] == [files]
        assert "binary" in json.dumps(schema["properties"][files])
    for path in ("/search/text-to-image", "/search/text-to-text", "/admin/delete"):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] and list(body["content"]) == ["application/json"]
    assert paths["/admin/reload"]["post"]["requestBody"]["required"] is False


if __name__ == "__main__":
    PINNED.write_text(json.dumps(document(), indent=1, sort_keys=True) + "\n")
