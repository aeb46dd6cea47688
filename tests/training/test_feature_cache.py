"""The frozen-feature cache is exact (cached encodings equal the full model's, pooled and
token sequences), and the on-disk store is keyed by data, tower weights and preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

import training.feature_cache as feature_cache
from index_builder.manifest import image_path, load_records
from index_builder.preprocess import TextTokenizer, load_image, preprocess_image
from training.config import load_config
from training.feature_cache import (
    CachedEvaluator,
    FeatureStore,
    cached_model,
    embed_features,
    encode_split,
)
from training.model import ModelConfig, build_model, load_preset
from training.run import prepare

FROZEN = ["model.options.image_trainable_blocks=0", "model.options.text_trainable_blocks=0"]


def frozen_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {**load_preset("tiny").to_dict(), "image_trainable_blocks": 0}
    config |= {"text_trainable_blocks": 0, **options}
    return build_model(ModelConfig.from_dict(config)).eval()


def full_encodings(model, gallery, split="val"):
    records = load_records(gallery, split)
    pixels = np.stack(
        [preprocess_image(load_image(image_path(gallery, r)), model.image_spec) for r in records]
    )
    captions = [c for r in records for c in r.captions]
    ids, mask = TextTokenizer(model.tokenizer_json, 32)(captions)
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(pixels))
        text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    return image, text


@pytest.mark.parametrize("shared", [0, 2])
def test_cached_encodings_equal_full_model(gallery, shared):
    options = {"shared_layers": shared, "shared_width": 16, "shared_heads": 2}
    model = frozen_model(**options)
    feats = encode_split(model, gallery, "val", tokens=bool(shared))
    image, text = full_encodings(model, gallery)
    cached = cached_model(model, feats)
    with torch.no_grad():
        got = cached.encode_image(torch.arange(len(image)))
        torch.testing.assert_close(got, image, atol=1e-5, rtol=1e-4)
        rows = torch.arange(len(text))
        mask = feats.text_mask(rows.numpy())
        got = cached.encode_text(rows[:, None], mask)
        torch.testing.assert_close(got, text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embed_features(model, feats)[1], text, atol=1e-5, rtol=1e-4)
    records = load_records(gallery, "val")
    assert feats.owner.tolist() == [i for i, r in enumerate(records) for _ in r.captions]
    assert (feats.image_tokens is None) == (shared == 0)


def test_store_reuses_an_entry_and_keys_on_weights_and_preprocessing(
    gallery, tmp_path, monkeypatch
):
    store = FeatureStore(tmp_path / "cache")
    model = frozen_model(shared_layers=1, shared_width=16, shared_heads=2)
    first = store.load(model, gallery, "val", tokens=True)
    (entry,) = (tmp_path / "cache").iterdir()
    assert json.loads((entry / "meta.json").read_text())["tokens"] is True
    assert isinstance(first.image_tokens, np.memmap)

    calls = []
    real = feature_cache.encode_split
    monkeypatch.setattr(
        feature_cache, "encode_split", lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    )
    again = store.load(model, gallery, "val", tokens=True)
    pooled_only = store.load(model, gallery, "val", tokens=False)  # a token entry serves it too
    assert calls == []
    np.testing.assert_array_equal(np.asarray(again.image_tokens), np.asarray(first.image_tokens))
    assert torch.equal(pooled_only.text_pooled, first.text_pooled)
    # only what follows the towers changed: same entry
    store.load(frozen_model(shared_layers=2, shared_width=32, shared_heads=2), gallery, "val", True)
    assert calls == []
    other = frozen_model(shared_layers=1, shared_width=16, shared_heads=2)
    with torch.no_grad():
        other.image_tower.patch_embed.proj.bias.add_(0.1)  # other tower weights: new entry
    store.load(other, gallery, "val", tokens=False)
    store.load(frozen_model(image_size=32), gallery, "val", tokens=False)  # other preprocessing
    store.load(model, gallery, "test", tokens=False)  # other split
    assert calls == ["val", "val", "test"] and len(list((tmp_path / "cache").iterdir())) == 4


def test_cached_training_saves_the_full_model(gallery, tmp_path):
    cfg = load_config(
        "cots",
        [*TINY_OVERRIDES, *FROZEN, "data.cache_frozen_features=true", "train.max_steps=4"],
    )
    trainer = prepare(cfg, gallery, tmp_path / "run")
    before = trainer.model.image_proj.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.model.image_proj.weight)  # the shared projection trained
    from training.checkpoint import load_model

    model, meta = load_model(tmp_path / "run" / "checkpoints" / "last")
    assert torch.equal(model.image_proj.weight, trainer.model.image_proj.weight)
    assert meta["step"] == 4


def test_cached_validation_equals_the_uncached_evaluator(gallery):
    from training.evaluate import SplitEvaluator

    model = frozen_model(shared_layers=1, shared_width=16, shared_heads=2)
    cached = CachedEvaluator(encode_split(model, gallery, "val", tokens=True)).evaluate(model)
    full = SplitEvaluator(gallery, "val").evaluate(model)
    assert cached == pytest.approx(full)


def test_cache_needs_frozen_towers(gallery, tmp_path):
    cfg = load_config("cots", [*TINY_OVERRIDES, "data.cache_frozen_features=true"])
    with pytest.raises(ValueError, match="needs frozen towers"):
        prepare(cfg, gallery, tmp_path / "run")
