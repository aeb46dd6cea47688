"""One training run end to end: check everything cheap first, then build, (resume,) fit."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.atomic import atomic_write_json
from index_builder.manifest import load_records, manifest_path
from training import distributed
from training.checkpoint import check_architecture, read_meta
from training.config import TrainConfig
from training.datasets import PairDataset
from training.evaluate import SplitEvaluator
from training.feature_cache import (
    CachedEvaluator,
    CachedPairDataset,
    FeatureStore,
    cached_model,
    default_root,
)
from training.model import ModelConfig, build_model, load_preset
from training.objectives import build_objectives, needs_memory
from training.objectives.cookie import check_pairs
from training.sources import WeightedGalleries, record_galleries
from training.trainer import Trainer
from training.video_cache import (
    CachedVideoEvaluator,
    CachedVideoPairs,
    cached_video_model,
    encode_video_split,
)
from training.video_datasets import VideoPairDataset, check_video_data
from training.video_evaluate import VideoSplitEvaluator

log = logging.getLogger(__name__)
LAST = Path("checkpoints") / "last"


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset with the run's `model.options` applied (unknown option -> ValueError)."""
    base = load_preset(cfg.model.preset).to_dict()
    return ModelConfig.from_dict({**base, **cfg.model.options})


def check_run(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool) -> ModelConfig:
    """Every user mistake that can be found without building a model, as one ValueError."""
    model_cfg = model_config(cfg)
    manifest_path(data)  # FileNotFoundError for a missing dataset
    n_train = len(load_records(data, "train"))
    if n_train == 0:
        raise ValueError(f"dataset {data} has no training records")
    if needs_memory(cfg) and cfg.contrast.queue_size >= n_train:
        raise ValueError(
            f"contrast.queue_size={cfg.contrast.queue_size} must be smaller than the "
            f"{n_train} training pairs of {data} (a queue that large holds each pair's own "
            "earlier key as a negative); set e.g. contrast.queue_size="
            f"{_suggest_queue(n_train, cfg.data.batch_size)}"
        )
    for name in cfg.enabled_units():
        if cfg.unit(name).weight < 0:
            raise ValueError(f"objectives.{name}.weight must be >= 0")
    if model_cfg.video_frames and cfg.unit("mvlm").enabled:
        raise ValueError("objectives.mvlm (masked image tokens) does not apply to video")
    check_video_data(load_records(data, "train")[:1], bool(model_cfg.video_frames), data)
    if cfg.objectives.cookie.enabled:
        check_pairs(cfg.objectives.cookie.pairs, model_cfg.image_weights, model_cfg.text_weights)
    if not 0.0 <= cfg.train.wise_alpha <= 1.0:
        raise ValueError(f"train.wise_alpha must be in [0, 1], got {cfg.train.wise_alpha}")
    if cfg.train.wise_alpha < 1.0 and model_cfg.semantic_classes is None:
        raise ValueError(
            "train.wise_alpha < 1 mixes with the ConSE start: it needs "
            "model.options.semantic_classes (the semantic branch)"
        )
    if cfg.data.cache_frozen_features and (
        model_cfg.image_trainable_blocks != 0 or model_cfg.text_trainable_blocks != 0
    ):
        raise ValueError(
            "data.cache_frozen_features needs frozen towers: set "
            "model.options.image_trainable_blocks=0 and model.options.text_trainable_blocks=0"
        )
    out = Path(out)
    if resume:
        check_architecture(read_meta(out / LAST), model_cfg, out / LAST)
    elif (out / LAST).exists():
        raise ValueError(
            f"{out} already holds a run; pass --resume to continue it or pick another --out"
        )
    return model_cfg


def _suggest_queue(n_train: int, batch: int) -> int:
    return max(batch, (n_train // 2) // batch * batch)


def feature_store(setting: str) -> FeatureStore:
    """`data.feature_store`: "" the default directory, "memory" none, else that directory."""
    if setting == "memory":
        return FeatureStore(None)
    return FeatureStore(setting or default_root())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> Trainer:
    """Checks, then builds model, objectives, dataset, evaluator and trainer (resumed if asked)."""
    model_cfg = check_run(cfg, data, out, resume)
    dist = distributed.init_distributed(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    d = cfg.data
    has_val = bool(load_records(data, d.val_split))
    if not has_val and dist.is_main:
        log.warning("no %r split in %s: the last checkpoint doubles as the best", d.val_split, data)
    want_eval = dist.is_main and has_val
    parts = video_parts if model_cfg.video_frames else image_parts
    objectives, dataset, evaluator = parts(cfg, model_cfg, data, resume, want_eval)
    galleries = record_galleries(load_records(data, "train"))
    if d.gallery_weights or len(set(galleries.tolist())) > 1:
        dataset = WeightedGalleries(dataset, galleries, d.gallery_weights, cfg.train.seed)
    trainer = Trainer(cfg, objectives, dataset, out, dist, evaluator)
    if resume:
        trainer.resume(Path(out) / LAST)
    elif dist.is_main:
        resolved = {**cfg.to_dict(), "model_config": dataclasses.asdict(model_cfg)}
        atomic_write_json(Path(out) / "config.json", resolved)
    return trainer


def image_parts(
    cfg: TrainConfig, model_cfg: ModelConfig, data: str | Path, resume: bool, want_eval: bool
) -> tuple[Any, Any, Any]:
    """Objectives, training set and evaluator of an image-caption run."""
    d = cfg.data
    if d.cache_frozen_features:  # frozen towers = pretrained ones, so load them even on resume
        model = build_model(model_cfg)
        store = feature_store(d.feature_store)
        tokens = model.shared is not None or d.cache_tokens  # the shared transformer reads them
        feats = store.load(model, data, "train", tokens, d.eval_batch_size)
        objectives = build_objectives(cfg, cached_model(model, feats))
        dataset: PairDataset | CachedPairDataset = CachedPairDataset(feats, cfg.train.seed)
        evaluator: SplitEvaluator | CachedEvaluator | None = None
        if want_eval:
            val = store.load(model, data, d.val_split, tokens, d.eval_batch_size)
            galleries = record_galleries(load_records(data, d.val_split))
            evaluator = CachedEvaluator(val, galleries)
        return objectives, dataset, evaluator
    model = build_model(model_cfg, load_weights=not resume)
    objectives = build_objectives(cfg, model)
    dataset = PairDataset(
        data, "train", model.image_spec, d.augment, d.crop_scale, d.crop_ratio, cfg.train.seed
    )
    evaluator = None
    if want_eval:
        evaluator = SplitEvaluator(data, d.val_split, d.eval_batch_size, d.max_val_images)
    return objectives, dataset, evaluator


def video_parts(
    cfg: TrainConfig, model_cfg: ModelConfig, data: str | Path, resume: bool, want_eval: bool
) -> tuple[Any, Any, Any]:
    """Objectives, training set and evaluator of a video-caption run."""
    d = cfg.data
    if d.cache_frozen_features:
        model = build_model(model_cfg)
        train = encode_video_split(model, data, "train", d.eval_batch_size)
        cached = cached_video_model(model, train["frames"], train["mask"], train["text"])
        objectives = build_objectives(cfg, cached)
        evaluator: Any = None
        if want_eval:
            val = encode_video_split(model, data, d.val_split, d.eval_batch_size)
            evaluator = CachedVideoEvaluator(val)
        return objectives, CachedVideoPairs(train["rows"], cfg.train.seed), evaluator
    model = build_model(model_cfg, load_weights=not resume)
    objectives = build_objectives(cfg, model)
    frames = model_cfg.video_frames
    dataset = VideoPairDataset(data, "train", model.image_spec, frames, cfg.train.seed)
    evaluator = None
    if want_eval:
        evaluator = VideoSplitEvaluator(data, d.val_split, d.eval_batch_size)
    return objectives, dataset, evaluator
