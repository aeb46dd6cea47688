"""Every ANN index type against exact search on synthetic data with its own ground truth."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index_builder.backends.base import ivf_lists
from index_builder.backends.faiss import faiss_index as fi
from index_builder.backends.faiss import search as faiss_search
from index_builder.backends.recall import exact_knn, recall_at_k

DIM = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """Clustered gallery vectors and noisy 'other modality' queries (as captions of images)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, DIM))
    base = _unit(centres[rng.integers(0, 50, 4000)] + 0.5 * rng.standard_normal((4000, DIM)))
    queries = _unit(base[rng.integers(0, 4000, 200)] + 0.4 * rng.standard_normal((200, DIM)))
    shards = [base[:1500], base[1500:1501], base[1501:]]  # uneven shards, one of a single row
    truth = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    return base, shards, queries, truth


def test_exact_knn_over_shards_equals_brute_force(data):
    base, shards, queries, truth = data
    assert (exact_knn(queries, shards, 10) == truth).mean() > 0.999  # ties aside
    small = exact_knn(queries[:3], [base[:4], base[4:6]], 10)
    assert small.shape == (3, 10) and (small[:, 6:] == -1).all()


def test_recall_at_k_matches_a_naive_loop():
    rng = np.random.default_rng(1)
    found = np.array([rng.permutation(30)[:10] for _ in range(20)])
    truth = np.array([rng.permutation(30)[:10] for _ in range(20)])
    truth[0, 7:] = -1  # fewer than k true neighbours (tiny gallery)
    naive = sum(len(set(f) & set(t[t >= 0])) for f, t in zip(found, truth, strict=True))
    assert recall_at_k(found, truth) == pytest.approx(naive / (20 * 10 - 3))


@pytest.mark.parametrize(
    ("factory", "param", "target"),
    [
        ("Flat", None, 0.99),
        ("HNSW32", "efSearch", 0.95),
        ("IVF64,Flat", "nprobe", 0.95),
        ("IVF64_HNSW32,Flat", "nprobe", 0.95),
        ("IVF64,PQ16x4", "nprobe", 0.5),
        pytest.param("OPQ8,IVF32,PQ8x4", "nprobe", 0.3, marks=pytest.mark.slow),
    ],
)
def test_index_types_reach_target_against_exact_search(data, factory, param, target):
    base, shards, queries, truth = data
    index = fi.build_index(factory, shards, DIM, use_gpu=False)
    assert index.ntotal == len(base)
    params, recall = faiss_search.tune(index, queries, truth, target)
    assert recall >= target
    assert fi.tunable_param(index) == param and (list(params) == ([param] if param else []))
    _, found = faiss_search.search(index, queries, 10)  # as served (and tuned)
    assert recall_at_k(found, truth) == pytest.approx(recall)
    if param:  # the tuned value is the smallest on the grid that reaches the target
        grid = [
            v
            for v in faiss_search.SEARCH_GRID[param]
            if v < params[param] and (v >= 10 or param == "nprobe")
        ]
        if grid:
            fi.set_search_params(index, {param: grid[-1]})
            assert recall_at_k(faiss_search.search(index, queries, 10)[1], truth) < target


def test_unreachable_target_returns_the_best(data):
    base, shards, queries, truth = data
    index = fi.build_index("IVF16,PQ4x4", shards, DIM, use_gpu=False)
    params, recall = faiss_search.tune(index, queries, truth, 0.999)
    assert recall < 0.999 and params["nprobe"] <= 16
    fi.set_search_params(index, {"nprobe": 16})  # the best: no larger nprobe does better
    assert recall_at_k(index.search(queries, 10)[1], truth) <= recall


def test_on_disk_merge_equals_in_memory(data, tmp_path):
    base, shards, queries, truth = data
    memory = fi.build_index("IVF32,Flat", shards, DIM, use_gpu=False)
    built = tmp_path / "a"
    built.mkdir()
    disk = fi.build_ivf_on_disk("IVF32,Flat", shards, DIM, built / "i.faiss", built / "i.ivfdata")
    assert disk.ntotal == len(base) and not list(built.glob(".shards-*"))
    built.rename(tmp_path / "moved")  # the inverted lists are found beside the index file
    moved = fi.read_index(tmp_path / "moved" / "i.faiss", {"nprobe": 4})
    fi.set_search_params(memory, {"nprobe": 4})
    np.testing.assert_array_equal(moved.search(queries, 10)[1], memory.search(queries, 10)[1])
    with pytest.raises(ValueError, match="needs an IVF factory"):
        fi.build_ivf_on_disk("HNSW32", shards, DIM, tmp_path / "h.faiss", tmp_path / "h.ivfdata")


def test_choose_factory_by_size_and_budget():
    gib = 1 << 30
    assert fi.choose_factory(5000, 256, gib) == "Flat"
    assert fi.choose_factory(30_000, 256, gib) == "HNSW32"
    assert fi.choose_factory(100_000, 256, gib) == "IVF1024,SQ8"
    assert fi.choose_factory(1_000_000, 256, 4 * gib) == "IVF4096,SQ8"
    assert fi.choose_factory(2_000_000, 256, 4 * gib) == "IVF4096,SQ8"
    # from 8192 lists: 4-bit fast-scan codes, one per dimension (128 bytes at d=256)
    assert fi.choose_factory(5_000_000, 256, 8 * gib) == "IVF8192_HNSW32,PQ256x4fs"
    assert fi.choose_factory(10_000_000, 256, 4 * gib) == "IVF16384_HNSW32,PQ256x4fs"
    assert fi.choose_factory(5_000_000, 256, gib) == "IVF8192_HNSW32,PQ256x4fs"
    assert fi.choose_factory(5_000_000, 256, 500 << 20) == "IVF8192_HNSW32,PQ64"
    assert fi.choose_factory(5_000_000, 256, 150 << 20) == "IVF8192_HNSW32,PQ16"
    with pytest.raises(ValueError, match="no index type fits"):
        fi.choose_factory(5_000_000, 256, 1 << 20)
    with pytest.raises(ValueError, match="empty gallery"):
        fi.choose_factory(0, 256, gib)
    assert ivf_lists(1000) == 16  # at least 39 training points per list


def test_estimates_are_close_to_real_sizes(data, tmp_path):
    base, shards, _, _ = data
    factories = ("Flat", "HNSW32", "IVF64,Flat", "IVF64,SQ8", "IVF64_HNSW32,SQ8", "IVF64,PQ16x4")
    for factory in factories:
        fi.write_index(fi.build_index(factory, shards, DIM, use_gpu=False), tmp_path / "x")
        real = (tmp_path / "x").stat().st_size
        assert 0.5 < fi.estimate_bytes(factory, len(base), DIM) / real < 2, factory


def test_bad_factory_and_untrainable_index(data):
    _, shards, _, _ = data
    with pytest.raises(ValueError, match="FAISS rejects the factory string 'Bogus42'"):
        fi.make_index("Bogus42", DIM)
    with pytest.raises(ValueError, match="cannot train 'IVF4096,Flat'"):
        fi.build_index("IVF4096,Flat", [shards[0][:100]], DIM, use_gpu=False)
    with pytest.raises(ValueError, match="empty gallery"):
        fi.build_index("Flat", [shards[0][:0]], DIM)


def test_short_hnsw_queries_widen_then_fall_back_to_exact_search(data, monkeypatch):
    base, shards, queries, _ = data
    index = fi.build_index("HNSW32", shards, DIM, use_gpu=False)
    asked: list[int] = []
    real = faiss_search._search_with

    def reaching_64(index, queries, k, param, value):  # a graph that yields no more than that
        asked.append(value)
        return real(index, queries, k, param, min(value, 64))

    monkeypatch.setattr(faiss_search, "_search_with", reaching_64)
    scores, rows = faiss_search.search(index, queries[:10], 1000)
    assert asked == [1000, 2000, 4000]  # at least k, then doubled up to WIDEN_LIMIT x k
    assert (rows >= 0).all()
    exact = exact_knn(queries[:10], shards, 1000)
    assert recall_at_k(rows, exact) == 1.0  # the short queries were answered exactly
    best = -np.sort(-(queries[:10] @ base.T), axis=1)[:, :1000]
    np.testing.assert_allclose(scores, best, atol=1e-5)


def test_deep_ivf_searches_probe_more_lists(data):
    base, shards, queries, _ = data
    index = fi.build_index("IVF64,Flat", shards, DIM, use_gpu=False)
    fi.set_search_params(index, {"nprobe": 1})  # one list of about 60 vectors
    _, rows = faiss_search.search(index, queries[:20], 500)
    assert (rows >= 0).all()
    assert recall_at_k(rows, exact_knn(queries[:20], shards, 500)) >= 0.9
    assert fi.search_param(index, "nprobe") == 1  # per call only
    _, plain_rows = faiss_search.search(index, queries[:20], 5)
    np.testing.assert_array_equal(plain_rows, index.search(queries[:20], 5)[1])  # k <= 10: as is


def test_rerank_equals_exact_scoring_of_the_candidates(data):
    base, _, queries, _ = data
    rng = np.random.default_rng(3)
    rows = np.array([rng.permutation(len(base))[:30] for _ in queries])
    rows[0, 25:] = -1  # fewer candidates than asked
    scores, found = faiss_search.rerank(base, queries, rows, 10)
    for q, cand, s, f in zip(queries, rows, scores, found, strict=True):
        cand = cand[cand >= 0]
        exact = base[cand] @ q
        order = np.argsort(-exact, kind="stable")[:10]
        assert list(f) == list(cand[order])
        np.testing.assert_allclose(s, exact[order], rtol=1e-5, atol=1e-6)
    few = np.full((1, 30), -1)
    few[0, :3] = [5, 6, 7]
    s, f = faiss_search.rerank(base, queries[:1], few, 10)
    assert sorted(f[0, :3]) == [5, 6, 7] and (f[0, 3:] == -1).all() and np.isinf(s[0, 3:]).all()


@pytest.mark.parametrize(
    "factory", ["IVF64,SQ8", "IVF64_HNSW32,SQ8", "IVF64,PQ16x4fs", "HNSW16,SQ8"]
)
def test_compressed_codes_are_reranked_to_exact_scores(data, factory):
    """A compressed index tuned with stored vectors serves re-ranked hits: its recall is what
    tuning reported, its scores are the exact inner products, and its ranking is at least as
    good as the raw codes'."""
    base, shards, queries, truth = data
    index = fi.build_index(factory, shards, DIM, use_gpu=False)
    params, recall = faiss_search.tune(index, queries, truth, 0.9, stored=base)
    assert params["rerank"] == fi.default_rerank(index) > 1
    scores, rows = faiss_search.search_index(index, base, queries, 10, None, params["rerank"])
    assert recall_at_k(rows, truth) == pytest.approx(recall)
    assert recall >= 0.9
    exact = np.einsum("qd,qkd->qk", queries, base[rows])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    raw = recall_at_k(index.search(queries, 10)[1], truth)
    assert recall >= raw


def test_filtered_compressed_search_is_reranked_among_allowed_rows(data):
    base, shards, queries, _ = data
    index = fi.build_index("IVF64,SQ8", shards, DIM, use_gpu=False)
    fi.set_search_params(index, {"nprobe": 64})  # every list: only the codes approximate
    mask = np.zeros(len(base), bool)
    mask[::3] = True  # a third of the rows: searched through the index with a selector
    scores, rows = faiss_search.search_index(index, base, queries, 10, mask, rerank=4)
    allowed = np.flatnonzero(mask)
    truth = allowed[np.argsort(-(queries @ base[allowed].T), axis=1, kind="stable")[:, :10]]
    assert mask[rows].all()
    assert recall_at_k(rows, truth) >= 0.97
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, base[rows]), atol=1e-6)


def test_exact_knn_reads_large_shards_in_blocks(data, monkeypatch):
    base, _, queries, truth = data
    monkeypatch.setattr("index_builder.backends.recall.KNN_BLOCK", 333)  # 13 blocks, last short
    assert (exact_knn(queries, [base], 10) == truth).mean() > 0.999


def test_blocked_build_equals_one_add(data, monkeypatch):
    """Adding a shard larger than ADD_BLOCK a block at a time gives the index one add gives."""
    base, _, queries, _ = data
    whole = fi.build_index("IVF16,SQ8", [base], DIM, use_gpu=False)
    monkeypatch.setattr(fi, "ADD_BLOCK", 999)
    blocked = fi.build_index("IVF16,SQ8", [base], DIM, use_gpu=False)
    assert blocked.ntotal == whole.ntotal == len(base)
    for index in (whole, blocked):
        fi.set_search_params(index, {"nprobe": 4})
    assert np.array_equal(whole.search(queries, 10)[1], blocked.search(queries, 10)[1])


def test_the_choice_is_explained():
    gib = 1 << 30
    assert "exact search" in fi.explain_choice("Flat", 5000, 256, gib)
    assert "HNSW graph" in fi.explain_choice("HNSW32", 30_000, 256, gib)
    why = fi.explain_choice("IVF16384_HNSW32,SQ8", 10_000_000, 256, 4 * gib)
    assert "16384 inverted lists" in why and "8-bit scalar codes" in why and "HNSW graph" in why
    assert "2.48 GiB in memory within the 4.00 GiB budget" in why
    assert "would exceed the budget" in fi.explain_choice("IVF8192,PQ64", 5_000_000, 256, gib)


def test_a_killed_build_resumes_from_its_parts(data, tmp_path, monkeypatch):
    base, shards, queries, truth = data
    monkeypatch.setattr(fi, "PART", 1000)
    whole = fi.blocks
    calls = []

    def killed_in_the_third_part(parts, size):
        calls.append(size)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return whole(parts, size)

    work = tmp_path / fi.resume_key("IVF16,SQ8", shards)
    monkeypatch.setattr(fi, "blocks", killed_in_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        fi.build_resumable("IVF16,SQ8", shards, DIM, work)
    names = sorted(p.name for p in work.iterdir())
    assert names == ["part-00000.faiss", "part-00001.faiss", "trained.faiss"]
    expected = fi.read_index(work / "trained.faiss")
    expected.add(base)  # what an uninterrupted build adds to the same trained index

    monkeypatch.setattr(fi, "blocks", whole)
    monkeypatch.setattr(fi, "make_index", lambda *a: pytest.fail("trained again"))
    resumed = fi.build_resumable("IVF16,SQ8", shards, DIM, work)
    assert resumed.ntotal == len(base)
    for index in (resumed, expected):
        fi.set_search_params(index, {"nprobe": 16})
    found = resumed.search(queries, 10)
    assert np.array_equal(found[1], expected.search(queries, 10)[1])
    assert recall_at_k(found[1], truth) > 0.9  # every list probed: only SQ8's error is left


def test_resume_keys_name_the_gallery(data):
    base, shards, _, _ = data
    assert fi.resume_key("IVF16,SQ8", shards) == fi.resume_key("IVF16,SQ8", [base])
    assert fi.resume_key("IVF16,SQ8", [base]) != fi.resume_key("IVF32,SQ8", [base])
    assert fi.resume_key("IVF16,SQ8", [base]) != fi.resume_key("IVF16,SQ8", [base[::-1]])
    assert [len(p) for p in fi.rows_between(shards, 1000, 2000)] == [500, 1, 499]
    assert fi.resumable("IVF16384,SQ8", 10_000_000, use_gpu=False)
    assert not fi.resumable("IVF1024,SQ8", 100_000, use_gpu=False)  # one part
    assert not fi.resumable("HNSW32", 10_000_000, use_gpu=False)


def test_an_hnsw_quantizer_searches_as_deep_as_nprobe(data):
    base, shards, queries, truth = data
    index = fi.build_index("IVF64_HNSW32,Flat", shards, DIM, use_gpu=False)
    fi.set_search_params(index, {"nprobe": 64})  # every list: exact, if all are found
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert quantizer.hnsw.efSearch == 64
    assert recall_at_k(index.search(queries, 10)[1], truth) > 0.99
