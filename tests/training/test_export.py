"""Export: ONNX vs torch parity, the same preprocessing as training, refusal, variants, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from index_builder.backends.faiss.store import IndexStore
from index_builder.bundle import Bundle
from index_builder.cli import main
from index_builder.encoders import ImageEncoder, TextEncoder
from index_builder.manifest import Record, image_path, load_records, write_manifest
from index_builder.preprocess import load_image, preprocess_images
from training.checkpoint import save_checkpoint
from training.datasets import Collate, PairDataset
from training.export import export_bundle
from training.model import ModelConfig, build_model, load_preset

CAPTIONS = ["a red square", "a blue circle", "green grass", "the yellow sun", "black night"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(load_preset("tiny")).eval()
    save_checkpoint(root / "ckpt", model, {"step": 7})
    (root / "data" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, caption in enumerate(CAPTIONS * 2):
        pixels = rng.integers(0, 255, (40 + 7 * i, 50, 3), np.uint8)
        Image.fromarray(pixels).save(root / "data" / "images" / f"{i}.png")
        records.append(Record(f"r{i}", f"images/{i}.png", (caption, f"{caption} {i}"), "test"))
    write_manifest(root / "data", records, {"name": "export-test"})
    bundle = export_bundle(root / "ckpt", root / "bundle")
    return root, model, bundle


def test_bundle_describes_the_checkpoint(work):
    root, model, bundle = work
    assert Bundle.load(bundle.path) == bundle
    assert bundle.embed_dim == model.config.embed_dim and bundle.precision == "fp32"
    assert bundle.image_spec == model.image_spec and bundle.text_spec == model.text_spec
    assert bundle.info["source"]["step"] == 7
    assert bundle.info["source"]["checkpoint"] == str((root / "ckpt").resolve())
    assert max(bundle.info["parity"]["max_abs_error"].values()) <= 1e-4
    assert not list(root.glob(".bundle*"))


def test_torch_free_encoders_match_torch(work):
    root, model, bundle = work
    records = load_records(root / "data")
    images = [load_image(image_path(root / "data", r)) for r in records]
    with torch.no_grad():
        pixels = torch.from_numpy(preprocess_images(images, model.image_spec))
        ref_images = model.encode_image(pixels).numpy()
        batch = Collate(model.tokenizer_json, model.text_spec.context_length)(
            [(np.zeros(1), c, 0) for c in CAPTIONS]
        )
        ref_texts = model.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
    got = ImageEncoder(bundle, threads=1, batch_size=3).encode_images(images)
    np.testing.assert_allclose(got, ref_images, atol=1e-4)
    np.testing.assert_allclose(
        TextEncoder(bundle, batch_size=2).encode(CAPTIONS), ref_texts, atol=1e-4
    )


def test_bundle_preprocessing_is_the_training_eval_transform(work):
    root, _, bundle = work
    dataset = PairDataset(root / "data", "test", bundle.image_spec, augment=False)
    records = load_records(root / "data", "test")
    for i in (0, 3, 9):
        from_training = dataset[i][0]
        image = load_image(image_path(root / "data", records[i]), bundle.image_spec.background)
        np.testing.assert_array_equal(
            preprocess_images([image], bundle.image_spec)[0], from_training
        )
    tokens = TextEncoder(bundle).tokenizer(CAPTIONS)
    batch = Collate(bundle.tokenizer_json, bundle.text_spec.context_length)(
        [(np.zeros(1), c, 0) for c in CAPTIONS]
    )
    np.testing.assert_array_equal(tokens[0], batch["input_ids"].numpy())
    np.testing.assert_array_equal(tokens[1], batch["attention_mask"].numpy())


def test_only_towers_and_projections_reach_the_bundle(work):
    _, model, bundle = work
    allowed = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.split(".")[0] in ("image_tower", "image_proj", "text_tower", "text_proj")
    )
    total = 0
    for path in (bundle.image_onnx, bundle.text_onnx):
        graph = onnx.load(str(path)).graph
        names = " ".join(t.name for t in graph.initializer).lower()
        assert not any(word in names for word in ("momentum", "mlm", "mvm", "queue", "head"))
        total += sum(int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) > 1)
        assert [i.name for i in graph.output] == ["embedding"]
    assert 0.9 * allowed <= total <= allowed


def test_disagreement_refuses_to_write(work):
    root, _, bundle = work
    with pytest.raises(ValueError, match="disagree by .* no bundle written"):
        export_bundle(root / "ckpt", root / "bundle", tolerance=0.0)
    with pytest.raises(ValueError, match="disagree"):
        export_bundle(root / "ckpt", root / "refused", tolerance=0.0)
    assert Bundle.load(root / "bundle") == bundle and not (root / "refused").exists()


def test_int8_records_its_retrieval_effect(work):
    root, _, bundle = work
    int8 = export_bundle(root / "ckpt", root / "int8", "int8", dataset=root / "data")
    effect = int8.info["retrieval_effect"]
    assert int8.precision == "int8" and int8.bundle_id != bundle.bundle_id
    assert effect["gallery"] == 10 and effect["queries"] == 20
    assert 0 < effect["top10_agreement"] <= 1
    assert effect["rsum_change"] == pytest.approx(
        effect["variant"]["rsum"] - effect["fp32"]["rsum"]
    )
    assert max(int8.info["parity"]["max_abs_error"].values()) <= 0.1


@pytest.mark.slow
def test_fp16_variant(work):
    root, _, _ = work
    fp16 = export_bundle(root / "ckpt", root / "fp16", "fp16", samples=64)
    assert fp16.info["retrieval_effect"]["top10_agreement"] > 0.8
    assert max(fp16.info["parity"]["max_abs_error"].values()) <= 1e-2


def test_cli_export_then_index(work, tmp_path, capsys):
    root, _, _ = work
    assert main(["export", "--checkpoint", str(root / "ckpt"), "--out", str(tmp_path / "b")]) == 0
    assert "ONNX vs torch max abs error" in capsys.readouterr().out
    args = ["index", "build", "--bundle", str(tmp_path / "b"), "--data", str(root / "data")]
    assert main([*args, "--out", str(tmp_path / "idx"), "--cpu", "--threads", "1"]) == 0
    loaded = IndexStore(tmp_path / "idx").open(bundle=Bundle.load(tmp_path / "b"))
    query = TextEncoder(Bundle.load(tmp_path / "b")).encode([CAPTIONS[1]])
    _, rows = loaded.search("image", query, 10)
    assert rows.shape == (1, 10) and sorted(rows[0]) == list(range(10))
    assert (
        main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    )
    assert "no checkpoint at" in capsys.readouterr().err


def test_cookie_model_exports_with_its_shared_transformer_in_each_tower(work, tmp_path):
    """The shared transformer (and each stream's map) is part of both exported towers; the
    bundle, the torch-free encoders and the index need nothing new."""
    root, _, _ = work
    torch.manual_seed(1)
    options = {"shared_layers": 2, "shared_width": 16, "shared_heads": 2, "shared_pooling": "cls"}
    config = ModelConfig.from_dict({**load_preset("tiny").to_dict(), **options})
    model = build_model(config).eval()
    save_checkpoint(tmp_path / "ckpt", model, {"step": 3, "recipe": "cookie"})
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    assert max(bundle.info["parity"]["max_abs_error"].values()) <= 1e-4
    assert bundle.info["source"]["recipe"] == "cookie"
    records = load_records(root / "data")
    images = [load_image(image_path(root / "data", r)) for r in records]
    with torch.no_grad():
        pixels = torch.from_numpy(preprocess_images(images, model.image_spec))
        ref_images = model.encode_image(pixels).numpy()
        batch = Collate(model.tokenizer_json, model.text_spec.context_length)(
            [(np.zeros(1), c, 0) for c in CAPTIONS]
        )
        ref_texts = model.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
    got = ImageEncoder(bundle, threads=1, batch_size=3).encode_images(images)
    np.testing.assert_allclose(got, ref_images, atol=1e-4)
    np.testing.assert_allclose(TextEncoder(bundle).encode(CAPTIONS), ref_texts, atol=1e-4)
    from onnx import numpy_helper

    shared = {n: p.detach().numpy() for n, p in model.named_parameters() if n.startswith("shared.")}
    for side in ("image", "text"):
        graph = onnx.load(str(getattr(bundle, f"{side}_onnx"))).graph
        stored = [numpy_helper.to_array(t) for t in graph.initializer]
        for name, value in shared.items():  # every shared weight, as is or transposed
            assert any(
                a.shape in (value.shape, value.T.shape)
                and (np.array_equal(a, value) or np.array_equal(a, value.T))
                for a in stored
            ), (side, name)


def test_export_a_recipe_before_any_training(tmp_path, capsys):
    """`cots export --recipe` writes the recipe's step-0 model (its pretrained towers) as a
    checkpoint under $COTS_HOME/runs and exports it; --set without --recipe is refused."""
    run_file = tmp_path / "tiny.yaml"
    run_file.write_text("model: {preset: tiny}\n")
    out = tmp_path / "bundle"
    args = ["export", "--recipe", str(run_file), "--set", "model.options.embed_dim=16"]
    assert main([*args, "--out", str(out)]) == 0
    bundle = Bundle.load(out)
    assert bundle.embed_dim == 16 and bundle.info["source"]["step"] == 0
    assert "step-0 checkpoint of" in capsys.readouterr().out
    refused = ["export", "--checkpoint", str(out), "--set", "a.b=1", "--out", str(tmp_path / "x")]
    assert main(refused) != 0
    assert "--recipe" in capsys.readouterr().err
