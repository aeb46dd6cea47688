"""TwoTower: presets, config validation, shapes, normalisation, masking and freezing."""

from __future__ import annotations

import pytest
import torch

from training.model import ModelConfig, TwoTower, build_model, list_presets, load_preset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny() -> TwoTower:
    torch.manual_seed(0)
    return build_model(load_preset("tiny")).eval()


def _text(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 2000, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1:, length - 3 :] = 0
    return ids, mask


def test_presets_are_listed() -> None:
    assert {"tiny", "lite", "base"} <= set(list_presets())


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ValueError) as err:
        load_preset("huge")
    assert str(err.value) == f"unknown preset 'huge' (available: {', '.join(list_presets())})"


def test_unknown_config_key() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown model config key\(s\): colour, size \(known: name, "
    ):
        ModelConfig.from_dict({"size": 3, "colour": "red"})


def test_bad_choices() -> None:
    with pytest.raises(ValueError, match="image_tower must be one of vit, efficientnet_lite0"):
        ModelConfig(image_tower="resnet")
    with pytest.raises(ValueError, match="context_length 80 exceeds text_max_positions 64"):
        ModelConfig.from_dict({**load_preset("tiny").to_dict(), "context_length": 80})


def test_config_value_types() -> None:
    with pytest.raises(ValueError, match=r"^model config image_size must be int, got '64'$"):
        ModelConfig(image_size="64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^model config image_mean must be tuple"):
        ModelConfig(image_mean=(0.5, 0.5))  # type: ignore[arg-type]
    assert ModelConfig(vit_mlp_ratio=4, image_weights=None).vit_mlp_ratio == 4


def test_config_round_trip() -> None:
    config = load_preset("lite")
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_specs_follow_config(tiny: TwoTower) -> None:
    assert tiny.image_spec.size == 64 and tiny.image_spec.mean == (0.5, 0.5, 0.5)
    assert tiny.text_spec.context_length == 32
    assert tiny.tokenizer_json.name == "tokenizer.json"
    assert tiny.text_tower.embeddings.word_embeddings.num_embeddings == 30522


def test_shapes_and_normalisation(tiny: TwoTower) -> None:
    pixels = torch.randn(2, 3, 64, 64)
    ids, mask = _text()
    with torch.no_grad():
        image, text = tiny.encode_image(pixels), tiny.encode_text(ids, mask)
        raw = tiny.encode_image(pixels, normalize=False)
        feats = tiny.image_features(pixels)
        tfeats = tiny.text_features(ids, mask)
    assert image.shape == text.shape == (2, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image, raw / raw.norm(dim=-1, keepdim=True))
    assert feats["tokens"].shape == (2, 64, 32) and feats["pooled"].shape == (2, 32)
    assert tfeats["tokens"].shape == (2, 7, 32) and tfeats["pooled"].shape == (2, 32)
    assert tiny.image_grid == (8, 8)


def test_text_padding_does_not_change_embedding(tiny: TwoTower) -> None:
    ids, mask = _text(batch=1, length=5)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.int64)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.int64)], 1)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.encode_text(ids, mask), tiny.encode_text(padded_ids, padded_mask)
        )


def test_vit_mask_uses_mask_token(tiny: TwoTower) -> None:
    pixels = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 10] = True
    other = pixels.clone()
    other[:, :, 8:16, 16:24] = torch.randn(3, 8, 8)  # patch 10 = row 1, col 2
    with torch.no_grad():
        masked = tiny.image_features(pixels, mask)["tokens"]
        masked_other = tiny.image_features(other, mask)["tokens"]
        plain = tiny.image_features(pixels)["tokens"]
        none_masked = tiny.image_features(pixels, torch.zeros_like(mask))["tokens"]
    # The masked patch's pixels are invisible, masking changes the output,
    # and an all-False mask is a no-op.
    torch.testing.assert_close(masked, masked_other)
    assert not torch.allclose(masked, plain)
    torch.testing.assert_close(none_masked, plain)


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_freezing_options() -> None:
    base = load_preset("tiny").to_dict()
    frozen = build_model(
        ModelConfig.from_dict({**base, "image_trainable_blocks": 0, "text_trainable_blocks": 0})
    )
    assert _trainable(frozen) == {"image_proj.weight", "text_proj.weight", "image_tower.mask_token"}
    last = build_model(
        ModelConfig.from_dict({**base, "image_trainable_blocks": 1, "text_trainable_blocks": 1})
    )
    names = _trainable(last)
    assert {n for n in names if n.startswith("image_tower.")} == {
        "image_tower.mask_token",
        *(
            f"image_tower.{n}"
            for n, _ in last.image_tower.blocks[1].named_parameters(prefix="blocks.1")
        ),
        "image_tower.norm.weight",
        "image_tower.norm.bias",
    }
    assert {n for n in names if n.startswith("text_tower.")} == {
        f"text_tower.encoder.layer.1.{n}"
        for n, _ in last.text_tower.encoder.layer[1].named_parameters()
    }
    assert _trainable(build_model(load_preset("tiny"))) == {n for n, _ in last.named_parameters()}


def test_too_many_trainable_blocks() -> None:
    config = ModelConfig.from_dict({**load_preset("tiny").to_dict(), "text_trainable_blocks": 3})
    with pytest.raises(ValueError, match="BertTower has 2 blocks, cannot train the last 3"):
        build_model(config)
