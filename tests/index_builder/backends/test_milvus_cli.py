"""`cots index ... --backend milvus` end to end on a tiny bundle (a real Milvus server): the same
searches as the FAISS build, add, delete, info, and bad input as one line."""

from __future__ import annotations

import json

from tiny_bundles import make_gallery, make_tiny_bundle

from index_builder.backends import BackendConfig, open_store
from index_builder.cli import main
from index_builder.search import Searcher


def _build(action, bundle, out, uri, *extra):
    return main(["index", action, str(out), "--bundle", str(bundle), "--threads", "1",
                 "--backend", "milvus", "--milvus-uri", str(uri), *extra])  # fmt: skip


def _unranked(hits):
    """Hits with scores rounded and without ranks, in a fixed order (equal scores tie)."""
    found = [{**h, "score": round(h["score"], 4), "rank": None} for h in hits]
    return sorted(found, key=lambda h: (-h["score"], h["id"]))


def _milvus(uri):
    return ["--backend", "milvus", "--milvus-uri", str(uri)]


def test_build_add_delete_info_and_the_same_hits_as_faiss(
    tmp_path, tiny_bundle, gallery, capsys, milvus_uri
):
    uri = milvus_uri
    assert _build("build", tiny_bundle.path, tmp_path / "work", uri, "--data", str(gallery)) == 0
    assert f"is current under Milvus {uri} (collection cots)" in capsys.readouterr().out
    assert main(["index", "build", str(tmp_path / "faiss"), "--bundle", str(tiny_bundle.path),
                 "--data", str(gallery), "--threads", "1", "--cpu"]) == 0  # fmt: skip
    store = open_store(tmp_path / "work", BackendConfig("milvus", milvus_uri=str(uri)))
    milvus, faiss = Searcher.open(store), Searcher.open(tmp_path / "faiss")
    assert milvus.index.info["sides"]["image"]["recall_at_10"] == 1.0
    for search in ("text_to_image", "text_to_text"):  # every item: ties may swap ranks
        found = [_unranked(getattr(s, search)("a red cat", k=30)) for s in (milvus, faiss)]
        assert found[0] == found[1] and len(found[0]) in (12, 24)
    image = milvus.image_path("g0")
    assert _unranked(milvus.image_to_text(image, k=30)) == _unranked(
        faiss.image_to_text(image, k=30)
    )

    more = make_gallery(tmp_path / "more", n=3, prefix="m")
    assert _build("add", tiny_bundle.path, tmp_path / "work", uri, "--data", str(more)) == 0
    assert "added: 3 images, 6 texts" in capsys.readouterr().out
    assert main(["index", "delete", str(tmp_path / "work"), "g1", "m2", *_milvus(uri)]) == 0
    assert "deleted: 2 images, 4 texts" in capsys.readouterr().out
    assert main(["index", "info", str(tmp_path / "work"), *_milvus(uri)]) == 0
    text = capsys.readouterr().out
    assert "  * v000001-" in text and "v000002-" not in text and "13 items" in text
    assert "changed in place 2 times" in text  # a change is no new version on Milvus
    assert main(["index", "info", str(tmp_path / "work"), "--json", *_milvus(uri)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "milvus" and info["sides"]["text"]["count"] == 26
    assert [e["state"] for e in store.changes()] == ["done", "done"]
    assert _build("rebuild", tiny_bundle.path, tmp_path / "work", uri, "--data", str(gallery)) == 0
    first = store.versions()[0]  # back to the first collection, with its changes
    assert main(["index", "switch", str(tmp_path / "work"), first, *_milvus(uri)]) == 0
    assert store.current() == first and "13 items" in capsys.readouterr().out
    absent = "v000009-20000101T000000Z"
    assert main(["index", "switch", str(tmp_path / "work"), absent, *_milvus(uri)]) == 2
    assert f"index version {absent} not found in Milvus" in capsys.readouterr().err


def test_bad_milvus_input_is_one_line(tmp_path, tiny_bundle, gallery, capsys, milvus_uri):
    work, data = tmp_path / "work", ["--data", str(gallery)]
    assert _build("build", tiny_bundle.path, work, tmp_path / "nodb", *data) == 2
    assert "error: bad Milvus URI" in capsys.readouterr().err
    assert _build("rebuild", tiny_bundle.path, work, "http://127.0.0.1:1", *data) == 1
    err = capsys.readouterr().err
    assert err.startswith("cots index rebuild: failed: cannot reach Milvus at http://127.0.0.1:1")
    assert len(err.strip().splitlines()) == 1
    uri = milvus_uri
    assert main(["index", "info", str(work), *_milvus(uri)]) == 2
    assert "the alias 'cots' does not exist" in capsys.readouterr().err
    assert _build("build", tiny_bundle.path, work, uri, *data, "--factory", "Flat") == 2
    assert "FAISS options; use --milvus-index" in capsys.readouterr().err
    assert _build("build", tiny_bundle.path, work, uri, *data) == 0
    other = make_tiny_bundle(tmp_path / "other", dim=12, seed=3)
    assert _build("add", other.path, work, uri, *data) == 2
    assert "embeds in 12 dimensions" in capsys.readouterr().err
    assert main(["index", "build", str(work), "--bundle", str(tiny_bundle.path),
                 *data, "--backend", "milvus"]) == 2  # fmt: skip
    assert "needs a URI: --milvus-uri (or COTS_MILVUS_URI)" in capsys.readouterr().err
