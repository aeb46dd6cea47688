"""Video training: pooling against naive references, padding and order, the frozen-feature
cache against the direct path, `cots train/eval/export` on a tiny video gallery, and the
exported bundle against torch through the torch-free video encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES

from index_builder.atomic import atomic_write_bytes
from index_builder.bundle import Bundle
from index_builder.cli import main
from index_builder.data.synthetic_video import clip_events, render_clip
from index_builder.encoders import Encoders
from index_builder.manifest import Record, image_path, load_records, write_manifest
from index_builder.video import decode_video, encode_video
from training.model import ModelConfig, build_model, load_preset
from training.video_cache import cached_video_model, encode_video_split
from training.video_datasets import load_clip
from training.video_model import MeanPooling, SeqTransfPooling

FRAMES = 4


def video_config(pooling: str = "meanP", **extra) -> ModelConfig:
    base = load_preset("tiny").to_dict()
    options = {"video_frames": FRAMES, "video_pooling": pooling, "video_layers": 1}
    return ModelConfig.from_dict({**base, **options, "video_heads": 2, **extra})


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """12 train / 4 val / 4 test synthetic clips (32 px, 8 frames)."""
    root = tmp_path_factory.mktemp("videos")
    records = []
    splits = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    for i, split in enumerate(splits):
        events = clip_events(0, i)
        rel = f"videos/{i:03d}.mp4"
        atomic_write_bytes(root / rel, encode_video(render_clip(events, 32, 8)))
        caption = f"{events[0].phrase()}, then {events[1].phrase()}"
        records.append(Record(f"v{i:03d}", rel, (caption, f"first {caption}"), split))
    write_manifest(root, records, {"name": "tiny-videos", "media": "video"})
    return root


def test_mean_pooling_matches_a_naive_loop():
    torch.manual_seed(0)
    frames = F.normalize(torch.randn(3, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = MeanPooling()(frames, mask)
    for b in range(3):
        kept = [frames[b, n] for n in range(5) if mask[b, n]]
        want = sum(kept) / len(kept)
        torch.testing.assert_close(got[b], want / want.norm())


@pytest.mark.parametrize("pool", [MeanPooling(), SeqTransfPooling(8, 5, 2, 2)])
def test_padded_frames_never_count(pool):
    torch.manual_seed(1)
    for block in getattr(pool, "blocks", []):
        for param in block.parameters():
            torch.nn.init.normal_(param, std=0.3)
    frames = F.normalize(torch.randn(2, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    noisy = frames.clone()
    noisy[:, 3:] = torch.randn(2, 2, 8)
    torch.testing.assert_close(pool(frames, mask), pool(noisy, mask))
    assert torch.allclose(pool(frames, mask).norm(dim=-1), torch.ones(2))


def test_only_seqtransf_sees_frame_order():
    torch.manual_seed(2)
    frames = F.normalize(torch.randn(1, 4, 8), dim=-1)
    mask = torch.ones(1, 4, dtype=torch.bool)
    reverse = frames.flip(1)
    torch.testing.assert_close(MeanPooling()(frames, mask), MeanPooling()(reverse, mask))
    seq = SeqTransfPooling(8, 4, 1, 2)
    assert not torch.allclose(seq(frames, mask), seq(reverse, mask), atol=1e-4)


@pytest.mark.parametrize("pooling", ["meanP", "seqTransf"])
def test_video_model_encodes_frames_then_pools(pooling):
    torch.manual_seed(3)
    model = build_model(video_config(pooling)).eval()
    pixels = torch.randn(2, FRAMES, 3, 64, 64)
    pixels[1, 2:] = 0  # the second video has two frames
    with torch.no_grad():
        got = model.encode_image(pixels)
        frames = F.normalize(model.image_proj(model.image_tower(pixels[0])["pooled"]), dim=-1)
        first = model.video_pool(frames[None], torch.ones(1, FRAMES, dtype=torch.bool))
        short = model.encode_image(pixels[1:, :2].contiguous())
    torch.testing.assert_close(got[0], first[0])
    if pooling == "meanP":  # padding = a shorter video
        torch.testing.assert_close(got[1], short[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        image = model.encode_image(pixels[0, :1])  # an image is a one-frame video
    if pooling == "meanP":
        torch.testing.assert_close(image[0], frames[0])
    else:  # fresh blocks are the identity: 2 * frame + first position, normalised
        start = F.normalize(2 * frames[0] + model.video_pool.positions[0], dim=-1)
        torch.testing.assert_close(image[0], start)


def test_cache_gives_the_direct_path(videos):
    torch.manual_seed(4)
    config = video_config("seqTransf", image_trainable_blocks=0, text_trainable_blocks=0)
    model = build_model(config).eval()
    cache = encode_video_split(model, videos, "val", batch=3)
    assert cache["frames"].shape == (4, FRAMES, model.image_tower.width)
    assert cache["skipped"] == 0 and cache["owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    cached = cached_video_model(model, cache["frames"], cache["mask"], cache["text"])
    records = load_records(videos, "val")
    pixels = np.stack([load_clip(videos, r, model.image_spec, FRAMES)[0] for r in records])
    with torch.no_grad():
        direct = model.encode_image(torch.from_numpy(pixels))
        via_cache = cached.encode_image(torch.arange(4))
    torch.testing.assert_close(via_cache, direct, atol=1e-5, rtol=0)


VIDEO_OVERRIDES = [
    *TINY_OVERRIDES,
    "model.options.video_frames=4",
    "model.options.video_layers=1",
    "model.options.video_heads=2",
    "data.batch_size=4",
    "contrast.queue_size=8",
    "train.max_steps=4",
    "train.eval_every=2",
]


@pytest.mark.parametrize(("pooling", "cache"), [("meanP", True), ("seqTransf", False)])
def test_train_eval_export_index(videos, tmp_path, pooling, cache):
    out = tmp_path / "run"
    frozen = ["model.options.image_trainable_blocks=0", "model.options.text_trainable_blocks=0"]
    sets = [*VIDEO_OVERRIDES, f"model.options.video_pooling={pooling}"]
    sets += [*frozen, "data.cache_frozen_features=true"] if cache else []
    if not cache:  # the other COTS units train video-caption pairs unchanged
        sets += ["objectives.kl.enabled=true", "objectives.amf.enabled=true"]
        sets += ["objectives.amf.warmup=1", "objectives.amf.min_history=4"]
    args = ["train", "cots", "--data", str(videos), "--out", str(out)]
    assert main(args + [f"--set={s}" for s in sets]) == 0
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and val[0]["videos"] == 4
    assert {"i2t_medr", "t2i_medr", "rsum"} <= set(val[0])
    if not cache:
        train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all("loss/kl" in r for r in train if r["kind"] == "train")

    best = out / "checkpoints" / "best"
    metrics = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(best), "--data", str(videos), "--out", str(metrics)]
    assert main(args) == 0
    result = json.loads(metrics.read_text())
    assert result["videos"] == 4 and result["captions"] == 8 and result["t2i_medr"] >= 1

    assert main(["export", "--checkpoint", str(best), "--out", str(tmp_path / "bundle")]) == 0
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.video_spec is not None and bundle.video_spec.pooling == pooling
    assert bundle.video_spec.frames == 4
    assert max(bundle.info["parity"]["max_abs_error"].values()) <= 1e-4
    checked = set(bundle.info["parity"]["max_abs_error"])
    assert checked == {"image", "text", "video_pooling", "video"}

    from training.checkpoint import load_model

    model, _ = load_model(best)
    encoders = Encoders.open(bundle, threads=1)
    records = load_records(videos, "test")
    clips = [decode_video(image_path(videos, r), 4).frames for r in records]
    onnx = encoders.video.encode_clips(clips)
    pixels = np.stack([load_clip(videos, r, model.image_spec, 4)[0] for r in records])
    with torch.no_grad():
        reference = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(onnx, reference, atol=1e-4)

    index = tmp_path / "index"
    args = ["index", "build", "--bundle", str(bundle.path), "--data", str(videos), "--out"]
    assert main([*args, str(index), "--split", "test", "--cpu"]) == 0
    from index_builder.search import Searcher

    searcher = Searcher.open(index)
    vector = searcher.index.vector("image", 0)
    np.testing.assert_allclose(vector, reference[0], atol=1e-4)
    assert len(searcher.text_to_video(records[0].captions[0], k=10)) == 4


def test_video_recipes_and_data_must_agree(videos, gallery, tmp_path):
    from training.config import load_config
    from training.run import check_run

    image_cfg = load_config("cots", [*TINY_OVERRIDES, "contrast.queue_size=8"])
    with pytest.raises(ValueError, match="holds videos"):
        check_run(image_cfg, videos, tmp_path / "a", False)
    video_cfg = load_config("cots", VIDEO_OVERRIDES)
    with pytest.raises(ValueError, match="holds images"):
        check_run(video_cfg, gallery, tmp_path / "b", False)
    with pytest.raises(ValueError, match="mvlm"):
        mvlm = load_config("cots", [*VIDEO_OVERRIDES, "objectives.mvlm.enabled=true"])
        check_run(mvlm, videos, tmp_path / "c", False)


def test_video_recipes_load():
    from training.config import load_config

    for name in ("cots-video", "cots-video-cpu"):
        cfg = load_config(name)
        assert cfg.model.options["video_frames"] == 12
        assert cfg.model.options["video_pooling"] == "meanP"
    assert load_config("cots-video-cpu").data.cache_frozen_features
