"""bench/report.py on fake result files; bench/two_stream_vs_cross.py's timing and arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import (
    attack,
    embed_throughput,
    index_bench,
    realistic_gallery,
    realistic_index,
    report,
    service_load,
)
from bench import two_stream_vs_cross as tsvc
from bench.tables import generic
from index_builder.synthetic import make_bundle

ROOT = Path(__file__).resolve().parents[1]


TRAIN = {
    "machine": "x86_64, 2 threads",
    "results": [
        {"recipe": "clip", "setting": "frozen", "preset": "lite", "pairs_per_s": 3.58},
        {"recipe": "cots", "setting": "frozen", "preset": "lite", "pairs_per_s": 2.44},
    ],
}
INDEX = {
    "host": "x86_64",
    "sizes": {
        str(n): {
            "floor_ms": n / 1e4,
            "indexes": [
                {"factory": "Flat", "recall_at_10": 1.0, "single_query_ms_p50": n / 5e3},
                {"factory": "HNSW32", "recall_at_10": 0.97, "single_query_ms_p50": 0.3},
            ],
        }
        for n in (10_000, 100_000)
    },
}
RATIO = {
    "command": "python bench/two_stream_vs_cross.py --presets tiny",
    "paper_ratio": 10_800,
    "results": [
        {
            "preset": "tiny",
            "backend": "torch",
            "two_stream": {"image_s": 0.001, "text_s": 0.0005, "text_query_s": 0.001},
            "cross_encoder": {"layers": 2, "width": 32, "pair_s": 0.0004},
            "shapes": {
                "flickr30k-1k": {
                    "images": 1000,
                    "queries": 5000,
                    "two_stream_s": 1.5,
                    "cross_encoder_s": 2000.0,
                    "ratio": 1333.3,
                    "two_stream_query_ms": 0.5,
                    "cross_encoder_query_ms": 400.0,
                    "query_ratio": 800.0,
                }
            },
        }
    ],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    results = tmp_path / "results"
    results.mkdir()
    for name, data in {
        "train_throughput.json": TRAIN,
        "index_bench.json": INDEX,
        "two_stream_vs_cross.json": RATIO,
        "mystery.json": {"speed": [{"name": "warp", "factor": 9}]},
    }.items():
        (results / name).write_text(json.dumps(data))
    (results / "broken.json").write_text("{not json")
    out = tmp_path / "docs" / "benchmarks.md"
    written = report.build_report(results, out, tmp_path / "docs" / "img")
    return out.read_text(), written


def test_known_tables_appear(built):
    text, _ = built
    assert "| recipe | setting | preset | pairs_per_s |" in text
    assert "| cots | frozen | lite | 2.44 |" in text
    assert "| tiny | torch | flickr30k-1k | 1,000 x 5,000 | 1.5 | 2,000 | 1,333 |" in text
    assert "The paper reports 10,800x against VinVL." in text


def test_commands_recorded_or_explained(built):
    text, _ = built
    assert "Command: `python bench/two_stream_vs_cross.py --presets tiny`" in text
    assert (
        "Command (not recorded in the JSON; how to run it): "
        "`python -m bench.train_throughput --preset lite`" in text
    )


def test_missing_results_are_listed_as_not_run(built):
    text, _ = built
    assert "not run yet: `python -m bench.objective_cost --preset tiny`" in text
    assert "not run yet: `python -m bench.embed_throughput`" in text
    assert "not run yet: `python -m bench.service_load --demo-images 2000`" in text


def test_unknown_and_broken_results_still_render(built):
    text, _ = built
    assert "### `mystery.json`" in text and "| warp | 9 |" in text
    assert "### `broken.json`" in text and "unreadable" in text


def test_machine_section(built):
    text, _ = built
    assert "## Machine" in text and "| cores |" in text and "| torch |" in text


def test_plots_are_written_and_linked(built):
    text, written = built
    names = {p.name for p in written if p.suffix == ".png"}
    assert names == {
        "bench_two_stream_vs_cross_ratio.png",
        "bench_train_throughput_train.png",
        "bench_index_bench_recall_latency.png",
        "bench_index_bench_latency_size.png",
    }
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](img/{path.name})" in text


def test_embed_throughput_has_one_row_per_variant():
    data = {
        "preset": "lite",
        "threads": 1,
        "fp32": {"images_per_s": 57.9, "parity_max_abs_error": {"image": 4e-07}},
        "int8": {"images_per_s": 55.1, "parity_max_abs_error": {"image": 0.0033}},
    }
    text = embed_throughput.variant_tables(data)
    assert "| preset | lite |" in text
    assert "| variant | images_per_s | parity_max_abs_error.image |" in text
    assert "| int8 | 55.1 | 0.0033 |" in text


def test_index_points_found_by_key_names():
    points = index_bench.index_points(INDEX)
    flat = sorted((p["size"], p["latency"]) for p in points if p["type"] == "Flat")
    assert flat == [(10_000, 2.0), (100_000, 20.0)]
    floor = [p for p in points if p["type"] == "floor_ms"]
    assert sorted(p["size"] for p in floor) == [10_000, 100_000]
    assert all(p["recall"] is None for p in floor)


# -- realistic gallery, index types, service goals ---------------------------------------------

GALLERY = {
    "real": {
        "roots": ["cots-data/real-embeddings/emoji"],
        "fit_images": 800,
        "fit_captions": 2000,
        "query_images": 200,
        "query_captions": 500,
    },
    "model": {"clusters": 40, "rank": 16, "fit_seconds": 0.5},
    "same_size_comparison": {
        "image nearest-neighbour similarity": {
            "real": {"p5": 0.4, "p25": 0.6, "p50": 0.87, "p75": 0.9, "p95": 1.0},
            "generated": {"p5": 0.55, "p25": 0.7, "p50": 0.83, "p75": 0.9, "p95": 0.955},
        },
        "modality gap (distance of the means)": {"real": 0.3251, "generated": 0.3224},
    },
    "generated": {
        "size": 200_000,
        "sample_seconds": 10.7,
        "held-out caption -> top-1 image similarity": {"p5": 0.34, "p50": 0.43, "p95": 0.63},
    },
}


def point(nprobe: int, rerank: int, recall: float, ms: float) -> dict:
    return {"nprobe": nprobe, "rerank": rerank, "recall": recall, "p50_ms": ms}


REALISTIC_INDEX = {
    "size": 1_000_000,
    "queries": 1000,
    "k": 10,
    "results": {
        "text-to-image": {
            "IVF-SQ8 + re-rank": {
                "factory": "IVF4096,SQ8",
                "build_seconds": 120.5,
                "bytes": 275_000_000,
                "points": [
                    point(32, 1, 0.93, 0.2),
                    point(64, 1, 0.951, 0.4),  # reaches 0.95 but slower than the next
                    point(64, 2, 0.96, 0.3),
                    point(256, 2, 0.99, 0.9),
                    point(256, 4, 0.99, 1.1),  # as good as the one before, slower
                ],
            },
            "HNSW32": {
                "factory": "HNSW32",
                "build_seconds": 900.0,
                "bytes": 1_300_000_000,
                "points": [{"efSearch": 64, "rerank": 1, "recall": 0.97, "p50_ms": 0.5}],
            },
            "IVF-PQ64x4fs + re-rank": {
                "factory": "IVF4096,PQ64x4fs",
                "build_seconds": 200.0,
                "bytes": 40_000_000,
                "points": [point(16, 4, 0.7, 0.1), point(64, 16, 0.9, 0.2)],
            },
        },
        "image-to-text": {
            "Flat": {
                "factory": "Flat",
                "build_seconds": 1.0,
                "bytes": 1_024_000_000,
                "points": [{"exact": 0, "rerank": 1, "recall": 1.0, "p50_ms": 80.0}],
            }
        },
    },
}

RUN = {"concurrency": 1, "requests": 60, "p50_ms": 18.2, "recall_at_10": 0.96}
SERVICE = {
    "assets": "realistic gallery",
    "index": {
        "factories": {"image": "IVF4096,SQ8", "text": "IVF4096,SQ8"},
        "search_params": {"image": {"nprobe": 64}, "text": {"nprobe": 128}},
        "recall_at_10": {"image": 0.96, "text": 0.955},
        "build_seconds": {"image": 130.2, "text": 140.0},
    },
    "endpoints": {"/search/text-to-image": [RUN, {**RUN, "concurrency": 16}]},
    "raw_vectors_bytes": 2_048_000_000,
    "server_memory_bytes": {"VmHWM": 3_072_000_000},
    "server_memory_over_raw_vectors": 1.5,
    "goals": [
        {"goal": "text-to-image p50 at concurrency 1 (ms) <= 8", "measured": 18.2, "met": False,
         "held by": "floor 10.1 ms (slowest stage encode 9.7 ms) + HTTP 8.2 ms"},
        {"goal": "text-to-image served recall@10 >= 0.95", "measured": 0.96, "met": True,
         "held by": ""},
    ],
}  # fmt: skip


def test_realistic_gallery_compares_quantiles_side_by_side():
    text = realistic_gallery.gallery_tables(GALLERY)
    assert "| statistic | real p5 / p50 / p95 | generated p5 / p50 / p95 |" in text
    assert "| image nearest-neighbour similarity | 0.4 / 0.87 / 1 | 0.55 / 0.83 / 0.955 |" in text
    assert "| modality gap (distance of the means) | 0.3251 | 0.3224 |" in text
    assert (
        "Model: 40 image clusters of rank 16, fitted in 0.5 s on 800 real images and 2000 "
        "captions; held out as queries: 200 images, 500 captions" in text
    )
    assert "at full size (200,000 items per side, sampled in 10.7 s)" in text
    assert "| held-out caption -> top-1 image similarity | 0.34 / 0.43 / 0.63 |" in text


def test_index_types_cheapest_setting_to_the_recall_goal():
    text = realistic_index.index_type_tables(REALISTIC_INDEX)
    assert text.startswith("1,000,000 items per side, 1000 held-out real queries per direction")
    assert "**text-to-image**" in text and "**image-to-text**" in text
    assert (
        "| variant | factory | build s | MB | cheapest setting to recall 0.95 | its recall "
        "| its p50 ms | best recall | best recall's p50 ms |" in text
    )
    sq8 = "| IVF-SQ8 + re-rank | IVF4096,SQ8 | 120.5 | 275 | nprobe=64, rerank 2 | 0.96 | 0.3 |"
    assert f"{sq8} 0.99 | 0.9 |" in text
    assert (
        "| HNSW32 | HNSW32 | 900 | 1,300 | efSearch=64, rerank 1 | 0.97 | 0.5 | 0.97 | 0.5 |"
        in text
    )
    assert (
        "| IVF-PQ64x4fs + re-rank | IVF4096,PQ64x4fs | 200 | 40 | not reached |  |  | 0.9 | 0.2 |"
        in text
    )
    assert "| Flat | Flat | 1 | 1,024 | exact, rerank 1 | 1 | 80 | 1 | 80 |" in text


def test_service_goals_come_first_with_served_recall():
    text = service_load.service_tables(SERVICE)
    goals = (
        "#### Goals (issue 13)\n\n| goal | measured | met | held by |\n|---|---|---|---|\n"
        "| text-to-image p50 at concurrency 1 (ms) <= 8 | 18.2 | no "
        "| floor 10.1 ms (slowest stage encode 9.7 ms) + HTTP 8.2 ms |\n"
        "| text-to-image served recall@10 >= 0.95 | 0.96 | yes |  |"
    )
    assert text.startswith(goals)
    assert "| image | IVF4096,SQ8 | nprobe=64 | 0.96 | 130.2 |" in text
    assert (
        "Server memory: VmHWM 3,072 MB; raw vectors 2,048 MB, server memory / raw vectors = 1.5."
        in text
    )
    assert "| concurrency | requests | p50_ms | recall_at_10 |" in text
    assert "| 16 | 60 | 18.2 | 0.96 |" in text
    assert "| assets | realistic gallery |" in text and "raw_vectors_bytes" not in text


def test_service_without_goals_renders_as_before():
    old = {k: v for k, v in SERVICE.items() if k in ("assets", "endpoints")}
    old["index"] = {"search_params": SERVICE["index"]["search_params"]}
    assert service_load.service_tables(old) == generic(old)
    assert "Goals" not in service_load.service_tables(old)


def test_recorded_pictures_linked_only_when_present(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (docs / "img").mkdir(parents=True)
    (tmp_path / "drawn").mkdir()
    for drawn in (docs / "img" / "realistic_index.png", tmp_path / "drawn" / "gallery.png"):
        drawn.write_bytes(b"\x89PNG\r\n\x1a\n")
    recorded = {
        # drawn in another checkout: found under the same name in the report's image folder
        "realistic_index.json": {**REALISTIC_INDEX, "picture": "/elsewhere/realistic_index.png"},
        "realistic_gallery.json": {**GALLERY, "picture": str(tmp_path / "drawn" / "gallery.png")},
        "realistic_gallery-old.json": {**GALLERY, "picture": str(tmp_path / "missing.png")},
    }
    for name, data in recorded.items():
        (results / name).write_text(json.dumps(data))
    report.build_report(results, docs / "benchmarks.md", docs / "img")
    text = (docs / "benchmarks.md").read_text()
    link = "![Index types on a realistic gallery, cross-modal queries](img/realistic_index.png)"
    assert link in text
    assert (
        "![Realistic 1M gallery: real against generated embeddings](../drawn/gallery.png)" in text
    )
    assert "missing.png" not in text and text.count("![") == 2
    assert "Latency is one query at a time on one thread" in text


# -- two_stream_vs_cross -----------------------------------------------------------------------


def test_extrapolate_matches_hand_arithmetic():
    two = {"image_s": 0.01, "text_s": 0.002, "text_query_s": 0.004}
    cross = {"image_s": 0.012, "tokenize_s": 0.0001, "pair_s": 0.003}
    search = {"build_s": 0.5, "all_queries_s": 1.5, "query_s": 0.001}
    row = tsvc.extrapolate(two, cross, search, images=100, queries=1000)
    two_full = 100 * 0.01 + 1000 * 0.002 + 0.5 + 1.5  # 5.0 s
    cross_full = 100 * 0.012 + 1000 * 0.0001 + 100 * 1000 * 0.003  # 301.3 s
    assert row["two_stream_s"] == pytest.approx(two_full)
    assert row["cross_encoder_s"] == pytest.approx(cross_full)
    assert row["ratio"] == pytest.approx(cross_full / two_full)
    assert row["two_stream_query_ms"] == pytest.approx(5.0)
    assert row["cross_encoder_query_ms"] == pytest.approx(1000 * (0.0001 + 100 * 0.003))
    assert row["pairs"] == 100_000


def test_parse_shapes():
    assert tsvc.parse_shapes("flickr30k-1k,mine=20x30") == {
        "flickr30k-1k": (1000, 5000),
        "mine": (20, 30),
    }
    with pytest.raises(ValueError, match="unknown shape 'coco'"):
        tsvc.parse_shapes("coco")


def test_cross_encoder_scores_each_pair_alone():
    import torch

    torch.manual_seed(0)
    model = tsvc.build_model(tsvc.load_preset("tiny"), load_weights=False).eval()
    cross = tsvc.build_cross_encoder(model)
    tokenizer = tsvc.TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    texts = ["a dog", "two young people walking near the street in the snow"]
    with torch.inference_mode():
        images = cross.image_tokens(model.image_features(torch.randn(2, 3, 64, 64))["tokens"])
        ids, mask = (torch.from_numpy(a) for a in tokenizer(texts))  # "a dog" is padded
        batched = cross(ids, mask, images)
        alone = [
            cross(*(torch.from_numpy(a) for a in tokenizer([t])), images[i : i + 1])
            for i, t in enumerate(texts)
        ]
    assert batched.shape == (2,)
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5)
    assert images.shape == (2, 64, model.config.text_width)  # 8x8 patches at the text width


@pytest.fixture()
def keep_threads():
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


def test_tiny_comparison_ranks_faster_with_two_streams(tmp_path, keep_threads):
    out = tmp_path / "ratio.json"
    argv = ["--presets", "tiny", "--shapes", "small=64x256", "--sample-images", "8"]
    argv += ["--sample-texts", "32", "--pair-batch", "16", "--reps", "2", "--out", str(out)]
    assert tsvc.main(argv) == 0
    data = json.loads(out.read_text())
    shape = data["results"][0]["shapes"]["small"]
    assert shape["images"] == 64 and shape["queries"] == 256
    assert shape["ratio"] > 1 and shape["query_ratio"] > 1
    assert data["command"].endswith(" ".join(argv))
    assert data["results"][0]["cross_encoder"]["image_tokens"] == 64


def test_two_stream_side_on_an_onnx_bundle(tmp_path, keep_threads):
    # The service tests' tiny ONNX bundle (8x8 pixels, 8 dimensions).
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "ratio.json"
    argv = ["--presets", "tiny", "--bundle", str(bundle.path), "--shapes", "small=32x64"]
    argv += ["--sample-images", "4", "--sample-texts", "8", "--pair-batch", "4", "--reps", "1"]
    assert tsvc.main([*argv, "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["backend"] == "onnxruntime"
    assert row["two_stream"]["embed_dim"] == bundle.embed_dim
    assert row["two_stream"]["image_size"] == bundle.image_spec.size
    assert row["shapes"]["small"]["ratio"] > 1


def test_bundle_needs_one_preset():
    with pytest.raises(SystemExit):
        tsvc.parse_args(["--presets", "tiny,lite", "--bundle", "x"])


def test_attack_goals_first_then_a_row_per_case():
    data = {
        "command": "python bench/attack.py",
        "goals": [{"goal": "no 5xx over the cases", "pass": True, "detail": "0 5xx"}],
        "rows": [
            {
                "backend": "faiss",
                "case": "kill9_change",
                "statuses": ["200", "503:busy"],
                "fivexx": 0,
                "state_5xx": 1,
                "stray_after_next_change": 0,
                "requests": 2,
            },
        ],
    }
    text = attack.attack_tables(data)
    assert text.index("PASS") < text.index("kill9_change")
    assert "200 503:busy" in text and "stray_after_next_change 0" in text
    assert "requests" not in text


TRANSFER = {
    "command": "python bench/transfer.py --run clip-cpu:0=/work/data/exp/runs/clip "
    "--eval emoji:all=/work/data/emoji --bundle /tmp/qs/cots-data/bundles/demo "
    f"--picture {ROOT}/docs/img/x.png --out bench/results/transfer_cpu.json",
    "summary": [
        {"recipe": "clip-cpu", "gallery": "emoji", "seeds": [0, 1], "rsum": 18.62,
         "rsum_std": 0.9756, "i2t_r1": 1.28, "i2t_r1_std": 0.09, "t2i_r1": 0.92,
         "t2i_r1_std": 0.01, "i2i_map": 64.03, "i2i_map_std": 0.08, "t2t_r1": 22.09,
         "t2t_r1_std": 0.89},
        {"recipe": "pretrained towers (x)", "gallery": "emoji", "seeds": [0], "i2i_map": 65.67,
         "i2i_map_std": 0.0, "t2t_r1": 20.46, "t2t_r1_std": 0.0},
    ],
    "runs": [
        {"recipe": "clip-cpu", "seed": 0, "run": "/work/data/exp/runs/clip", "gallery": "emoji",
         "split": "all", "dataset": "/work/data/emoji",
         "metrics": {"images": 3789, "captions": 8653, "rsum": 17.93, "i2t_r1": 1.214,
                     "i2t_r5": 3.51, "i2t_r10": 5.094, "t2i_r1": 0.92, "t2i_r5": 2.8,
                     "t2i_r10": 4.39, "i2i_map": 63.97, "t2t_r1": 21.46}},
    ],
}  # fmt: skip


def test_machine_paths_become_relative_and_transfer_tables_are_readable(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "transfer_cpu.json").write_text(json.dumps(TRANSFER))
    (results / "other.json").write_text(json.dumps({"rows": [{"path": "/tmp/x/y", "url": "/a"}]}))
    out = tmp_path / "docs" / "benchmarks.md"
    report.build_report(results, out, tmp_path / "docs" / "img")
    text = out.read_text()
    assert "/work/" not in text and "/tmp/" not in text and str(ROOT) not in text
    assert (
        "--run clip-cpu:0=exp/runs/clip --eval emoji:all=emoji "
        "--bundle cots-data/bundles/demo --picture docs/img/x.png" in text
    )
    assert "Paths are relative to the directory that held the runs and datasets" in text
    assert "| recipe | emoji |\n|---|---|\n| clip-cpu | 18.6 ± 1.0 |" in text
    assert "| pretrained towers (x) | 64.0 ± 0.1 / 22.1 ± 0.9 |" not in text
    assert "| pretrained towers (x) | 65.7 / 20.5 |" in text
    assert "| clip-cpu | 0 | emoji (all) | 3789 / 8653 | 17.9 | 1.2 / 3.5 / 5.1 |" in text
    widest = max(line.count("|") - 1 for line in text.splitlines() if line.startswith("|"))
    assert widest <= 10  # no 30-column raw table
    assert "| y | /a |" in text  # a lone /tmp path: relative to its folder; a URL path stays


def test_a_result_is_dated_by_its_commit_not_its_checkout(tmp_path):
    env = {**os.environ, "GIT_COMMITTER_DATE": "2026-01-02T03:04:05Z",
           "GIT_AUTHOR_DATE": "2026-01-02T03:04:05Z"}  # fmt: skip
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    result = tmp_path / "r.json"
    result.write_text("{}")
    subprocess.run([*git, "add", "r.json"], check=True)
    subprocess.run([*git, "commit", "-qm", "r"], check=True, env=env)
    assert report.measured_when(result).strftime("%Y-%m-%d %H:%M") == "2026-01-02 03:04"
    result.write_text('{"changed": 1}')  # measured again, not committed yet: its own time
    assert report.measured_when(result).year == datetime.now(UTC).year
    assert report.measured_when(result).strftime("%m-%d %H:%M") != "01-02 03:04"
