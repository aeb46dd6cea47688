"""The four searches against exact references: image-to-image and text-to-text (uploads,
texts, or 'more like this' from a stored vector), metadata filters on every endpoint, an
index without one side, and server paths only when the operator opts in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_api import I2I, I2T, T2I, T2T, assert_error, b64, png

from index_builder.backends.faiss.store import IndexStore
from index_builder.encoders import ImageEncoder, TextEncoder


@pytest.fixture(scope="module")
def exact(assets):
    """`exact(side, vector, keep=None, exclude=None) -> (ids, scores)`: brute-force cosine
    ranking of one side's items whose metadata `keep` accepts, best first."""
    bundle, gallery = assets["bundle"], assets["gallery"]
    texts = IndexStore(assets["index"]).open().texts
    sides = {
        "image": (
            [row["id"] for row in gallery],
            ImageEncoder(bundle).encode_paths([row["image"] for row in gallery]),
            [row["meta"] for row in gallery],
        ),
        "text": (
            [row["id"] for row in texts],
            TextEncoder(bundle).encode([row["text"] for row in texts]),
            [row["meta"] for row in texts],
        ),
    }

    def rank(side, vector, keep=None, exclude=None):
        ids, vectors, metas = sides[side]
        scores = vectors @ vector
        order = [
            i
            for i in np.argsort(-scores, kind="stable")
            if (keep is None or keep(metas[i])) and ids[i] != exclude
        ]
        return [ids[i] for i in order], scores[order]

    rank.vector = lambda side, item: sides[side][1][sides[side][0].index(item)]
    rank.text = lambda text: TextEncoder(bundle).encode([text])[0]
    rank.image = lambda data: ImageEncoder(bundle).encode_pixels(np.stack([_pixels(bundle, data)]))[
        0
    ]
    return rank


def _pixels(bundle, data: bytes) -> np.ndarray:
    from index_builder.preprocess import load_image, preprocess_image

    return preprocess_image(load_image(data), bundle.image_spec)


def assert_ranked(hits: list[dict], reference: tuple[list[str], np.ndarray]) -> None:
    """Scores are the exact ones in order, every hit is allowed and scored as its own item
    (ties may come in either order)."""
    ids, scores = reference
    assert len(hits) == min(len(hits), len(ids))
    np.testing.assert_allclose([h["score"] for h in hits], scores[: len(hits)], atol=1e-5)
    by_id = dict(zip(ids, scores, strict=True))
    for hit in hits:
        assert hit["id"] in by_id, hit["id"]
        assert abs(hit["score"] - by_id[hit["id"]]) < 1e-5
    assert [h["rank"] for h in hits] == list(range(hits[0]["rank"], hits[0]["rank"] + len(hits)))


# -- image to image, text to text ------------------------------------------------------------


def test_image_to_image_ranks_like_exact_cosine(client, exact):
    data = png((0, 0, 255))
    multipart = client.post(I2I, files={"image": ("q.png", data, "image/png")}, data={"k": "8"})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert body["hits"][0]["id"] == "blue" and len(body["hits"]) == 8
    assert_ranked(body["hits"], exact("image", exact.image(data)))
    hit = body["hits"][0]
    assert hit["url"] == "/images/blue" and hit["meta"]["channels"] == ["b"]
    assert body["results"][0]["query"] == "q.png"
    as_json = client.post(I2I, json={"image": b64(data), "k": 8}).json()
    assert as_json["hits"] == body["hits"]


def test_text_to_text_ranks_like_exact_cosine(client, exact):
    body = client.post(T2T, json={"texts": ["a cyan square", "magenta"], "k": 16}).json()
    first, second = (result["hits"] for result in body["results"])
    assert first[0]["id"] == "cyan#0" and second[0]["id"] == "magenta#1"
    assert_ranked(first, exact("text", exact.text("a cyan square")))
    assert_ranked(second, exact("text", exact.text("magenta")))
    hit = first[0]
    assert hit["text"] == "a cyan square" and hit["image_id"] == "cyan"
    assert hit["url"] == "/images/cyan" and hit["meta"] == {"style": "sentence"}


def test_more_like_this_searches_with_the_stored_vector(client, exact):
    body = client.post(I2I, json={"id": "red", "k": 7}).json()
    assert "red" not in [h["id"] for h in body["hits"]] and len(body["hits"]) == 7
    assert_ranked(body["hits"], exact("image", exact.vector("image", "red"), exclude="red"))
    assert body["results"][0]["query"] == "red"
    page = client.post(I2I, json={"id": "red", "k": 2, "offset": 2}).json()["hits"]
    assert [h["rank"] for h in page] == [3, 4]  # ties (blue, white) may come in either order
    assert [h["score"] for h in page] == [h["score"] for h in body["hits"][2:4]]
    texts = client.post(T2T, json={"id": "blue#0", "k": 5}).json()["hits"]
    assert "blue#0" not in [h["id"] for h in texts]
    assert_ranked(texts, exact("text", exact.vector("text", "blue#0"), exclude="blue#0"))


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "words"),
    [
        (I2I, {"id": "purple"}, 404, "unknown_id", "no image with id 'purple'"),
        (T2T, {"id": "red"}, 404, "unknown_id", "no text with id 'red'"),
        (I2I, {"id": "red", "image": b64(png())}, 422, "invalid_input", "exactly one"),
        (T2T, {"id": "red#0", "text": "red"}, 422, "invalid_input", "exactly one"),
        (T2I, {"id": "red"}, 422, "invalid_input", "id"),
        (I2T, {"id": "red"}, 422, "invalid_input", "id"),
        (I2I, {"text": "red"}, 422, "invalid_input", "not both"),
        (T2T, {"image": b64(png())}, 422, "invalid_input", "not both"),
        (T2T, {"text": " "}, 422, "empty_text", "empty"),
        (I2I, {"id": "red", "k": 101}, 422, "k_out_of_range", "max_k"),
        (I2I, {"image": "@@"}, 400, "bad_content", "base64"),
    ],
)
def test_unimodal_bad_input(client, path, body, status, code, words):
    assert_error(client.post(path, json=body), status, code, words)


# -- filters -----------------------------------------------------------------------------------


def test_filters_on_every_endpoint_match_exact_filtered_search(client, exact):
    text_query = exact.text("a red square")
    cases = [
        ({"channels": "r"}, lambda m: "r" in m["channels"]),
        ({"brightness": {"gte": 2}, "pure": False}, lambda m: m["brightness"] >= 2),
        ({"channels": {"in": ["g", "b"]}}, lambda m: bool({"g", "b"} & set(m["channels"]))),
        ({"brightness": {"gt": 0, "lte": 1}}, lambda m: m["brightness"] == 1),
    ]
    for filter, keep in cases:
        hits = client.post(T2I, json={"text": "a red square", "k": 8, "filter": filter}).json()
        ids = [h["id"] for h in hits["hits"]]
        assert_ranked(hits["hits"], exact("image", text_query, keep))
        assert len(ids) == len(exact("image", text_query, keep)[0]), filter

    words = lambda m: m["style"] == "word"  # noqa: E731
    data = png((0, 255, 0))
    form = {"k": "16", "filter": json.dumps({"style": "word"})}
    found = client.post(I2T, files={"image": ("g.png", data, "image/png")}, data=form).json()
    assert len(found["hits"]) == 8 and all(" " not in h["text"] for h in found["hits"])
    assert_ranked(found["hits"], exact("text", exact.image(data), words))

    pure = client.post(I2I, json={"id": "red", "filter": {"pure": True}}).json()["hits"]
    assert {h["id"] for h in pure} == {"green", "blue"}
    sentences = client.post(T2T, json={"text": "red", "filter": {"style": "sentence"}}).json()
    assert len(sentences["hits"]) == 8 and sentences["hits"][0]["id"] == "red#0"
    none = client.post(T2I, json={"text": "red", "filter": {"brightness": {"gt": 5}}}).json()
    assert none["hits"] == [] and none["results"] == [
        {"query": "red", "hits": [], "exhausted": True}
    ]


@pytest.mark.parametrize(
    ("filter", "words"),
    [
        ({"colour": "red"}, "unknown filter field 'colour'"),
        ({"pure": "yes"}, "bool"),
        ({"brightness": {"gte": "two"}}, "number"),
        ({"channels": {"near": "r"}}, "unknown operator"),
        ({"brightness": {"in": []}}, "non-empty list"),
        ([1, 2], "filter"),
        ("pure", "filter"),
    ],
)
def test_bad_filters_are_422_invalid_filter(client, filter, words):
    response = client.post(T2I, json={"text": "red", "filter": filter})
    assert_error(response, 422, "invalid_filter", words)
    response = client.post(I2I, json={"id": "red", "filter": filter})
    assert_error(response, 422, "invalid_filter", words)


def test_filters_are_checked_against_the_searched_side(client):
    """The text side has its own fields: an image field is unknown there, and back."""
    response = client.post(T2T, json={"text": "red", "filter": {"pure": True}})
    assert_error(response, 422, "invalid_filter", "unknown filter field 'pure' (fields: style)")
    response = client.post(T2T, json={"text": "red", "filter": {"style": 1}})
    assert_error(response, 422, "invalid_filter", "string")
    response = client.post(I2T, json={"image": b64(png()), "filter": {"style": "word"}})
    assert response.status_code == 200
    response = client.post(T2I, json={"text": "red", "filter": {"style": "word"}})
    assert_error(response, 422, "invalid_filter", "unknown filter field 'style'")


@pytest.mark.parametrize("text", ["{not json", "[1]", '"pure"', '{"colour": 1}'])
def test_bad_multipart_filters(client, text):
    files = {"image": ("r.png", png(), "image/png")}
    for path in (I2T, I2I):
        response = client.post(path, files=files, data={"filter": text})
        assert_error(response, 422, "invalid_filter", "filter")


# -- sides, paths ------------------------------------------------------------------------------


def test_an_index_without_texts_answers_side_absent(assets, settings_for, open_client):
    with open_client(settings_for(index=assets["photos"])) as photos:
        assert photos.post(T2I, json={"text": "a red square"}).json()["hits"][0]["id"] == "red"
        assert photos.post(I2I, json={"id": "red", "k": 1}).status_code == 200
        for path, body in ((T2T, {"text": "red"}), (I2T, {"image": b64(png())})):
            assert_error(photos.post(path, json=body), 404, "side_absent", "no text side")
        files = {"image": ("r.png", png(), "image/png")}
        assert_error(photos.post(I2T, files=files), 404, "side_absent")
        info = photos.get("/info").json()
        assert info["gallery"] == {"images": 8, "texts": 0}
        assert list(info["index"]["sides"]) == ["image"]


def test_server_paths_only_when_the_operator_opts_in(assets, settings_for, open_client):
    with open_client(settings_for(expose_paths=True)) as exposing:
        hit = exposing.post(T2I, json={"text": "red"}).json()["hits"][0]
        assert hit["image_path"] == assets["gallery"][0]["image"]
        files = {"image": ("b.png", png((0, 0, 255)), "image/png")}
        caption = exposing.post(I2T, files=files).json()["hits"][0]
        assert caption["image_path"].endswith("blue.png")


# -- response bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("expose_paths", [False, True])
def test_search_bodies_are_their_response_models(settings_for, open_client, expose_paths):
    """The routes write their JSON from plain dicts: each body is exactly what its documented
    response model would write (fields, order, None fields left out)."""
    from service.schemas import ImageSearchResponse, TextSearchResponse

    files = {"image": ("b.png", png((0, 0, 255)), "image/png")}
    with open_client(settings_for(expose_paths=expose_paths)) as c:
        responses = [
            (ImageSearchResponse, c.post(T2I, json={"texts": ["red", "a blue square"], "k": 3})),
            (ImageSearchResponse, c.post(I2I, json={"id": "red", "k": 2, "offset": 1})),
            (TextSearchResponse, c.post(I2T, files=files)),
            (TextSearchResponse, c.post(T2T, json={"text": "cyan", "k": 20})),
        ]
    for model, response in responses:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        dumped = model.model_validate(body).model_dump(mode="json", exclude_none=True)
        assert body == dumped and json.dumps(body) == json.dumps(dumped)  # the order too
        assert all(("image_path" in hit) == expose_paths for hit in body["hits"])


def test_hits_rows_are_not_looked_up_again(settings_for, open_client, monkeypatch):
    """A search's hits carry their rows (FAISS reads a page's rows in one batch): shaping an
    image hit (its server path included) reads no row again, and the images captions
    describe are looked up once each, in one batch (their paths too)."""
    with open_client(settings_for(expose_paths=True)) as c:
        index = c.app.state.engine.searcher.index
        looked_up: list[tuple[str, str, object]] = []
        for name in ("row_of", "rows_at"):
            method = getattr(index, name)

            def spy(side, key, method=method, name=name):
                looked_up.append((name, side, key))
                return method(side, key)

            monkeypatch.setattr(index, name, spy)
        images = c.post(T2I, json={"texts": ["red", "a blue square"], "k": 4}).json()
        assert images["hits"] and {name for name, _, _ in looked_up} == {"rows_at"}
        read = [row for _, _, rows in looked_up for row in rows]
        assert len(read) == len(set(read))  # no row read twice
        looked_up.clear()
        files = {"image": ("b.png", png((0, 0, 255)), "image/png")}
        captions = c.post(I2T, files=files, data={"k": "3"}).json()["hits"]
        described = {hit["image_id"] for hit in captions}
        assert [(name, side) for name, side, _ in looked_up][:1] == [("rows_at", "text")]
        assert all(side == "image" for _, side, _ in looked_up[1:])  # no text row again
        ids = [key for name, _, key in looked_up if name == "row_of"]
        assert sorted(ids) == sorted(described)  # each described image once, in one batch
        assert [name for name, side, _ in looked_up if side == "image"].count("rows_at") == 1
