"""MVLM prediction heads against a naive per-position loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.objectives.masking import IGNORE_INDEX
from training.objectives.mvlm import MaskedTokenHead


def _naive(head, tokens, global_feature, labels, weights=None):
    total, norm = 0.0, 0.0
    for b in range(labels.shape[0]):
        for n in range(labels.shape[1]):
            if labels[b, n] == IGNORE_INDEX:
                continue
            joined = torch.cat([tokens[b, n], global_feature[b]])[None]
            loss = F.cross_entropy(head.mlp(joined), labels[b, n][None])
            w = 1.0 if weights is None else float(weights[b])
            total, norm = total + w * loss, norm + w
    return total / norm


@pytest.fixture
def case():
    torch.manual_seed(0)
    head = MaskedTokenHead(token_width=6, global_width=4, vocab_size=11, hidden=8)
    tokens, global_feature = torch.randn(3, 5, 6), torch.randn(3, 4)
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 4], labels[1, 0], labels[2, 2], labels[2, 3] = 3, 7, 10, 0, 5
    return head, tokens, global_feature, labels


def test_head_loss_matches_naive_loop(case):
    head, tokens, global_feature, labels = case
    expected = _naive(head, tokens, global_feature, labels)
    assert head(tokens, global_feature, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_sample_weights_drop_a_sample(case):
    head, tokens, global_feature, labels = case
    weights = torch.tensor([1.0, 0.0, 1.0])
    got = head(tokens, global_feature, labels, weights)
    expected = _naive(head, tokens, global_feature, labels, weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    tokens2 = tokens.clone()
    tokens2[1] += 100.0  # the dropped sample no longer matters
    assert head(tokens2, global_feature, labels, weights).item() == pytest.approx(got.item())


def test_the_other_streams_global_feature_reaches_the_prediction(case):
    head, tokens, global_feature, labels = case
    tokens.requires_grad_(True)
    global_feature.requires_grad_(True)
    head(tokens, global_feature, labels).backward()
    assert global_feature.grad[0].abs().sum() > 0 and tokens.grad[0, 1].abs().sum() > 0
    assert tokens.grad[0, 0].abs().sum() == 0  # unmasked positions carry no loss


def test_nothing_masked_gives_a_differentiable_zero(case):
    head, tokens, global_feature, _ = case
    tokens.requires_grad_(True)
    loss = head(tokens, global_feature, torch.full((3, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and tokens.grad is not None


def test_shape_mismatch_is_an_error(case):
    head, tokens, global_feature, labels = case
    with pytest.raises(ValueError, match="do not match labels"):
        head(tokens, global_feature, labels[:, :4])


@pytest.fixture
def tiny_unit(tmp_path):
    from training.config import load_config
    from training.model import build_model, load_preset
    from training.objectives import build_objectives
    from training.visual_tokenizer.model import TokenizerConfig, VisualTokenizer, save_tokenizer

    torch.manual_seed(0)
    model = build_model(load_preset("tiny"), load_weights=False)
    tokenizer = VisualTokenizer(TokenizerConfig(stride=8, codebook_size=16, width=8))
    save_tokenizer(tmp_path, tokenizer, {"image_spec": model.image_spec.to_dict()})
    sets = ["model.preset=tiny", "objectives.mvlm.enabled=true", "contrast.queue_size=8"]
    cfg = load_config("cots", [*sets, f"objectives.mvlm.tokenizer={tmp_path}"])
    return cfg, model, build_objectives(cfg, model).train()


def _batch(model):
    from index_builder.preprocess import TextTokenizer

    ids, mask = TextTokenizer(model.tokenizer_json, 32)(
        ["a red square"] * 3 + ["a big blue circle"]
    )
    return {
        "pixels": torch.randn(4, 3, 64, 64),
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
    }


def test_mvlm_unit_trains_heads_and_towers_but_not_the_tokenizer(tiny_unit):
    _, model, objectives = tiny_unit
    unit = objectives.units["mvlm"]
    codebook = unit.tokenizer.quantizer.embed.clone()
    torch.manual_seed(1)
    losses = objectives(_batch(model))
    assert {"loss/instance", "loss/mlm", "loss/mvm"} <= set(losses)
    assert 0.0 <= objectives.logs()["mvm_acc"] <= 1.0
    assert losses["loss/mvm"].item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=0.3)
    losses["loss"].backward()
    assert not unit.tokenizer.training and torch.equal(unit.tokenizer.quantizer.embed, codebook)
    assert model.image_tower.mask_token.grad.abs().sum() > 0  # MVM reaches the mask embedding
    assert unit.mvm_head.mlp[0].weight.grad.abs().sum() > 0
    assert not any(k.startswith(("units.", "mvlm")) for k in model.state_dict())


def test_mvlm_unit_rejects_a_misaligned_or_misnormalised_tokenizer(tiny_unit, tmp_path):
    from training.objectives.mvlm import MvlmObjective
    from training.visual_tokenizer.model import TokenizerConfig, VisualTokenizer, save_tokenizer

    cfg, model, _ = tiny_unit
    wrong = tmp_path / "stride16"
    save_tokenizer(
        wrong,
        VisualTokenizer(TokenizerConfig(stride=16, codebook_size=16, width=8)),
        {"image_spec": model.image_spec.to_dict()},
    )
    cfg.objectives.mvlm.tokenizer = str(wrong)
    with pytest.raises(ValueError, match="gives a 4x4 grid at 64px but the image tower has 8x8"):
        MvlmObjective.from_config(cfg, model)
    other = tmp_path / "imagenet"
    spec = {**model.image_spec.to_dict(), "mean": [0.485, 0.456, 0.406]}
    save_tokenizer(other, VisualTokenizer(TokenizerConfig(stride=8)), {"image_spec": spec})
    cfg.objectives.mvlm.tokenizer = str(other)
    with pytest.raises(ValueError, match="trained with mean/std"):
        MvlmObjective.from_config(cfg, model)
    cfg.objectives.mvlm.tokenizer = ""
    with pytest.raises(ValueError, match="needs objectives.mvlm.tokenizer"):
        MvlmObjective.from_config(cfg, model)
    cfg.data.cache_frozen_features = True
    with pytest.raises(ValueError, match="cached features"):
        MvlmObjective.from_config(cfg, model)


def test_masked_pass_leaves_batchnorm_statistics_alone():
    from training.objectives.mvlm import frozen_norm_statistics

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    before = net[1].running_mean.clone()
    with frozen_norm_statistics(net):
        out = net(torch.randn(8, 3, 5, 5) + 3.0)
    assert torch.equal(net[1].running_mean, before) and net[1].momentum == 0.1
    assert out.mean().abs() < 1e-4  # still normalised with the batch statistics
    net(torch.randn(8, 3, 5, 5) + 3.0)
    assert not torch.equal(net[1].running_mean, before)
