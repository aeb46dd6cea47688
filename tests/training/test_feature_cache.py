"""The frozen-feature cache is exact: cached encodings equal the full model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from index_builder.manifest import image_path, load_records
from index_builder.preprocess import TextTokenizer, load_image, preprocess_image
from training.config import load_config
from training.feature_cache import cached_model, encode_split
from training.model import build_model, load_preset
from training.run import prepare

FROZEN = ["model.options.image_trainable_blocks=0", "model.options.text_trainable_blocks=0"]


def test_cached_encodings_equal_full_model(gallery):
    config = load_preset("tiny")
    config.image_trainable_blocks = config.text_trainable_blocks = 0
    model = build_model(config).eval()
    image, text, owner, rows = encode_split(model, gallery, "val")
    cached = cached_model(model, image, text)
    records = load_records(gallery, "val")
    pixels = np.stack(
        [preprocess_image(load_image(image_path(gallery, r)), model.image_spec) for r in records]
    )
    with torch.no_grad():
        full = model.encode_image(torch.from_numpy(pixels))
        assert torch.allclose(cached.encode_image(torch.arange(len(records))), full, atol=1e-5)
        ids, mask = TextTokenizer(model.tokenizer_json, 32)([records[2].captions[1]])
        row = torch.tensor([[rows[2][1]]])
        expected = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
        assert torch.allclose(cached.encode_text(row, torch.ones_like(row)), expected, atol=1e-5)
    assert owner.tolist() == [i for i, r in enumerate(records) for _ in r.captions]


def test_cached_training_saves_the_full_model(gallery, tmp_path):
    cfg = load_config(
        "cots", [*TINY_OVERRIDES, *FROZEN, "data.cache_frozen_features=true", "train.max_steps=4"]
    )
    trainer = prepare(cfg, gallery, tmp_path / "run")
    before = trainer.model.image_proj.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.model.image_proj.weight)  # the shared projection trained
    from training.checkpoint import load_model

    model, meta = load_model(tmp_path / "run" / "checkpoints" / "last")
    assert torch.equal(model.image_proj.weight, trainer.model.image_proj.weight)
    assert meta["step"] == 4


def test_cache_needs_frozen_towers(gallery, tmp_path):
    cfg = load_config("cots", [*TINY_OVERRIDES, "data.cache_frozen_features=true"])
    with pytest.raises(ValueError, match="needs frozen towers"):
        prepare(cfg, gallery, tmp_path / "run")
