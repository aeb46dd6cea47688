"""The semantic branch: ConSE from the image tower's classifier, read through the text tower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from index_builder.preprocess import TextTokenizer, load_image, preprocess_image
from training.model import ModelConfig, build_model, load_preset
from training.semantic import SemanticHead, class_texts, conse_basis
from training.towers.efficientnet_lite import EfficientNetLite0

CLASSES = ["cat", "dog", "rocket", "apple", "flower", "clock", "mountain", "boat"]


def small_config(tmp_path: Path, **options) -> ModelConfig:
    """EfficientNet-Lite0 (random weights saved in lukemelas naming, with a `_fc` head over
    the classes of a small TSV) and a tiny random text tower."""
    torch.manual_seed(0)
    state = {k: v for k, v in EfficientNetLite0(64).state_dict().items() if "mask" not in k}
    state["_fc.weight"] = torch.randn(len(CLASSES), 1280) * 0.05
    state["_fc.bias"] = torch.zeros(len(CLASSES))
    torch.save(state, tmp_path / "lite.pth")
    tsv = tmp_path / "classes.tsv"
    tsv.write_text("".join(f"c{i}\t{name}\ta {name}\n" for i, name in enumerate(CLASSES)))
    tiny = load_preset("tiny").to_dict()
    return ModelConfig.from_dict(
        {
            **tiny,
            "image_tower": "efficientnet_lite0",
            "image_weights": str(tmp_path / "lite.pth"),
            "semantic_classes": str(tsv),
            **options,
        }
    )


def test_head_is_conse_top_t_renormalised():
    torch.manual_seed(1)
    head = SemanticHead(6, 5, 4, temperature=2.0, top=2)
    head.class_embeddings.copy_(F.normalize(torch.randn(5, 4), dim=-1))
    pooled = torch.randn(3, 6)
    logits = (pooled @ head.classifier.weight.T + head.classifier.bias) / 2.0
    expected = []
    for row in logits:
        top = row.argsort(descending=True)[:2]
        p = torch.exp(row[top]) / torch.exp(row[top]).sum()
        expected.append((p[:, None] * head.class_embeddings[top]).sum(0))
    assert torch.allclose(head(pooled), torch.stack(expected), atol=1e-6)
    head.top = 0  # every class
    full = torch.softmax(logits, -1) @ head.class_embeddings
    assert torch.allclose(head(pooled), full, atol=1e-6)


def test_step_zero_is_conse(tmp_path):
    """At step 0 an image embeds as its ConSE vector and a caption as its text-tower
    embedding (embed_dim = text width: the identity start), so rankings are ConSE's."""
    model = build_model(small_config(tmp_path)).eval()
    assert model.semantic is not None
    pixels = torch.randn(4, 3, 64, 64)
    ids, mask = TextTokenizer(model.tokenizer_json, 32)(["a cat", "a rocket at night"])
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        pooled = model.image_tower(pixels)["pooled"]
        logits = pooled @ model.semantic.classifier.weight.T + model.semantic.classifier.bias
        texts = [f"{name}: a {name}" for name in CLASSES]
        cid, cmask = TextTokenizer(model.tokenizer_json, 128)(texts)
        classes = model.text_tower(torch.from_numpy(cid), torch.from_numpy(cmask))["pooled"]
        classes = F.normalize(classes, dim=-1)
        values, top = logits.topk(5, -1)
        conse = (torch.softmax(values, -1)[..., None] * classes[top]).sum(1)
        caption = model.text_tower(ids, mask)["pooled"]
        reference = F.normalize(caption, dim=-1) @ F.normalize(conse, dim=-1).T
        got = model.encode_text(ids, mask) @ model.encode_image(pixels).T
    assert torch.allclose(got, reference, atol=1e-5)


def test_narrow_joint_space_starts_near_conse(tmp_path):
    """embed_dim below the text width: Q is the class texts' top principal directions, and
    the semantic and text projections share it."""
    model = build_model(small_config(tmp_path, embed_dim=16))
    assert model.semantic_proj is not None
    q = model.text_proj.weight
    assert torch.equal(q, model.semantic_proj.weight)
    assert torch.allclose(q @ q.T, torch.eye(16), atol=1e-5)
    assert not model.image_proj.weight.any()


def test_classifier_and_class_embeddings_are_frozen_and_saved(tmp_path):
    model = build_model(small_config(tmp_path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "semantic_proj.weight" in trainable
    assert not any(n.startswith("semantic.") for n in trainable)
    state = model.state_dict()
    assert state["semantic.class_embeddings"].abs().sum() > 0
    fresh = build_model(model.config, load_weights=False)
    fresh.load_state_dict(state)  # a checkpoint restores the branch without the weights
    assert torch.equal(fresh.semantic.class_embeddings, model.semantic.class_embeddings)


def test_config_refuses_what_has_no_classifier():
    tiny = load_preset("tiny").to_dict()
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        ModelConfig.from_dict({**tiny, "semantic_classes": "imagenet"})
    with pytest.raises(ValueError, match="semantic_top"):
        ModelConfig.from_dict(
            {
                **tiny,
                "image_tower": "efficientnet_lite0",
                "semantic_classes": "imagenet",
                "semantic_top": -1,
            }
        )


def test_shipped_imagenet_class_texts():
    texts = class_texts("imagenet")
    assert len(texts) == 1000
    assert texts[0].startswith("tench, Tinca tinca: freshwater")
    assert texts[281].startswith("tabby, tabby cat: ")  # class 281 of ImageNet-1k


def test_pretrained_step_zero_reads_a_photo(tmp_path):
    """The shipped weights: a portrait of a naval officer embeds nearest the caption of a
    uniformed person among unrelated ones, with no training."""
    import matplotlib

    config = load_preset("lite").to_dict()
    config |= {"semantic_classes": "imagenet", "image_size": 192, "embed_dim": 384}
    model = build_model(ModelConfig.from_dict(config)).eval()
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    pixels = preprocess_image(load_image(photo, model.image_spec.background), model.image_spec)
    captions = ["a red apple", "a woman in a military uniform", "a cat", "mountains"]
    ids, mask = TextTokenizer(model.tokenizer_json, 32)(captions)
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(np.stack([pixels])))
        text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert captions[int((text @ image[0]).argmax())] == "a woman in a military uniform"


def test_branch_exports_inside_the_image_encoder(tmp_path):
    """The ONNX image encoder holds the whole branch (parity checked at export), so the
    bundle, index and service need nothing new; a perturbed branch changes the bundle's
    output, so it is really in the graph."""
    from index_builder.bundle import Bundle
    from index_builder.encoders import ImageEncoder
    from training.checkpoint import save_checkpoint
    from training.export import export_bundle

    model = build_model(small_config(tmp_path, embed_dim=16)).eval()
    torch.nn.init.normal_(model.image_proj.weight, std=0.05)  # both parts matter
    save_checkpoint(tmp_path / "ckpt", model, {"step": 0})
    export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.info["parity"]["max_abs_error"]["image"] <= 1e-4
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    onnx_out = ImageEncoder(bundle).encode_pixels(pixels)
    with torch.no_grad():
        torch_out = model.encode_image(torch.from_numpy(pixels)).numpy()
        assert np.abs(onnx_out - torch_out).max() <= 1e-4
        model.semantic_proj.weight.zero_()
        without = model.encode_image(torch.from_numpy(pixels)).numpy()
    assert np.abs(onnx_out - without).max() > 1e-2


def test_wise_mixes_trained_projections_with_the_conse_start(tmp_path):
    """alpha = 0 is the step-0 model, alpha = 1 the trained one, in between the weights'
    straight line; `wise_mixed` puts the trained weights back afterwards."""
    from training.semantic import wise_mixed

    model = build_model(small_config(tmp_path, embed_dim=16)).eval()
    start = {n: getattr(model, n).weight.clone() for n in ("image_proj", "text_proj")}
    start["semantic_proj"] = model.semantic_proj.weight.clone()
    torch.manual_seed(3)
    with torch.no_grad():
        for proj in (model.image_proj, model.text_proj, model.semantic_proj):
            proj.weight.add_(torch.randn_like(proj.weight))
    trained = {n: getattr(model, n).weight.clone() for n in start}
    with wise_mixed(model, 0.0):
        for name, weight in start.items():
            assert torch.allclose(getattr(model, name).weight, weight, atol=1e-5), name
    with wise_mixed(model, 0.25):
        for name in start:
            mix = 0.25 * trained[name] + 0.75 * start[name]
            assert torch.allclose(getattr(model, name).weight, mix, atol=1e-5), name
    for name, weight in trained.items():
        assert torch.equal(getattr(model, name).weight, weight)


def test_wise_alpha_needs_the_semantic_branch(gallery, tmp_path, capsys):
    from conftest import TINY_OVERRIDES

    from index_builder.cli import main

    args = ["train", "cots", "--data", str(gallery), "--out", str(tmp_path / "run")]
    args += [f"--set={o}" for o in TINY_OVERRIDES] + ["--set", "train.wise_alpha=0.5"]
    assert main(args) != 0
    assert "semantic_classes" in capsys.readouterr().err


def test_training_keeps_the_wise_mix_as_best(gallery, tmp_path):
    """`best` holds alpha * trained + (1 - alpha) * start; `last` the trained weights."""
    from conftest import TINY_OVERRIDES

    from index_builder.cli import main
    from training.checkpoint import load_model

    config = small_config(tmp_path, embed_dim=16)
    out = tmp_path / "run"
    args = ["train", "cots", "--data", str(gallery), "--out", str(out)]
    args += [f"--set={o}" for o in TINY_OVERRIDES]
    options = {
        "image_tower": "efficientnet_lite0",
        "image_weights": config.image_weights,
        "semantic_classes": config.semantic_classes,
        "embed_dim": 16,
        "image_trainable_blocks": 0,
        "text_trainable_blocks": 0,
    }
    args += [f"--set=model.options.{k}={v}" for k, v in options.items()]
    args += ["--set=data.cache_frozen_features=true", "--set=train.max_steps=3"]
    args += ["--set=train.eval_every=3", "--set=train.wise_alpha=0.5"]
    assert main(args) == 0
    best, _ = load_model(out / "checkpoints" / "best")
    last, _ = load_model(out / "checkpoints" / "last")
    q = conse_basis(16, last.semantic.class_embeddings)  # the start of this run's towers
    for name, start in (("image_proj", 0.0), ("text_proj", q), ("semantic_proj", q)):
        mix = 0.5 * getattr(last, name).weight + 0.5 * start
        assert torch.allclose(getattr(best, name).weight, mix, atol=1e-5), name
