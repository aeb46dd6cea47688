"""Training configuration: dataclasses with defaults, run files (YAML/JSON), dotted overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from index_builder import paths

RECIPES = Path(__file__).parent / "recipes"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """The `--data DIR` flag every training front end takes; the default gallery if omitted."""
    parser.add_argument(
        "--data",
        type=Path,
        default=paths.dataset_dir("openclipart"),
        help="dataset directory (default: $COTS_HOME/datasets/openclipart)",
    )


def add_override_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--set KEY=VALUE` flag every training front end takes (into `sets`)."""
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


@dataclass
class ModelSection:
    preset: str = "lite"  # a file in training/presets/
    # Overrides of the preset's fields (e.g. image_size, freeze options); checked against it.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    batch_size: int = 64  # per process and micro-batch
    workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    augment: bool = True  # random resized crop only: flips and colour jitter contradict captions
    crop_scale: tuple[float, float] = (0.7, 1.0)  # fraction of the image area kept
    crop_ratio: tuple[float, float] = (0.75, 1.3333)  # aspect ratio range of the crop
    val_split: str = "val"
    eval_batch_size: int = 128
    max_val_images: int = 0  # 0 = the whole validation split
    # Frozen towers only: compute their outputs once (pooled; token sequences too for a model
    # with COOKIE's shared transformer) and train what follows them on the cache (exact,
    # since frozen eval-mode towers are deterministic; implies no augmentation).
    cache_frozen_features: bool = False
    # Also cache the token sequences when the model does not need them (a ladder whose first
    # rung has no shared transformer fills the cache entry the later rungs read).
    cache_tokens: bool = False
    # A merged dataset (`cots data merge`): sampling weight per gallery (unlisted: 1); the
    # weight multiplies how many of that gallery's pairs one epoch draws.
    gallery_weights: dict[str, float] = field(default_factory=dict)
    # Where those outputs are kept between runs: "" = $COTS_HOME/cache/features, a directory,
    # or "memory" (computed for this run only).
    feature_store: str = ""


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.02  # not applied to biases, norms and the temperature
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1  # micro-batches per optimiser step
    clip_grad_norm: float = 0.0  # 0 = no clipping
    precision: str = (
        "auto"  # auto (bf16 on CUDA when supported, else fp16; fp32 on CPU), fp32, bf16, fp16
    )


@dataclass
class ContrastSection:
    temperature: float = 0.07
    learn_temperature: bool = True
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    queue_size: int = 65536  # must stay below the number of training pairs
    momentum: float = 0.995


@dataclass
class UnitSection:
    """One objective: switched on or off and weighted in the total loss."""

    enabled: bool = False
    weight: float = 1.0


@dataclass
class AmfSection(UnitSection):
    """Adaptive momentum filter (training/objectives/amf.py): per-sample weights, no loss."""

    size: int = 4096  # FIFO of recent momentum positive similarities
    lam: float = 2.0  # keep a pair when s >= mean - lam * std
    warmup: int = 100  # micro-batches during which every pair is kept
    min_history: int = 256  # scores the FIFO must hold before it filters


@dataclass
class MvlmSection(UnitSection):
    """Masked vision-language modelling (training/objectives/mvlm.py): MLM and MVM, one weight."""

    mlm: bool = True
    mvm: bool = True
    tokenizer: str = ""  # visual tokenizer directory (`cots tokenizer train`); needed by MVM
    text_mask_prob: float = 0.15
    patch_mask_ratio: float = 0.4
    min_block: int = 4  # smallest masked block, in patches (BEiT uses 16 on a 14 x 14 grid)
    head_hidden: int = 0  # hidden width of the prediction MLPs; 0 = the token width


# COOKIE's three contrastive losses in our default reading (METHOD.md): image vs text after
# the shared transformer; each embedding vs a frozen copy of its pretrained tower.
COOKIE_PAIRS = (
    ("image", "text", 1.0),
    ("image", "image_teacher", 1.0),
    ("text", "text_teacher", 1.0),
)


@dataclass
class CookieSection(UnitSection):
    """COOKIE's contrastive knowledge sharing (training/objectives/cookie.py): one symmetric
    in-batch InfoNCE per (source, target, weight) pair of named features (image, text,
    image_tower, text_tower, image_teacher, text_teacher)."""

    pairs: list[tuple[str, str, float]] = field(default_factory=lambda: list(COOKIE_PAIRS))


@dataclass
class AnchorSection(UnitSection):
    """Distillation toward the step-0 model (training/objectives/anchor.py)."""

    teacher_temperature: float = 0.05  # of the step-0 model's in-batch similarities


@dataclass
class ObjectivesSection:
    # Units run in this order each step (a sample filter must come before the losses it weights).
    amf: AmfSection = field(default_factory=AmfSection)  # noisy-pair filter (COTS)
    clip: UnitSection = field(default_factory=UnitSection)  # in-batch InfoNCE baseline
    instance: UnitSection = field(default_factory=lambda: UnitSection(enabled=True))
    kl: UnitSection = field(default_factory=UnitSection)  # task-level KL (COTS), after instance
    mvlm: MvlmSection = field(default_factory=MvlmSection)  # token level (COTS)
    cookie: CookieSection = field(default_factory=CookieSection)  # knowledge sharing (COOKIE)
    anchor: AnchorSection = field(default_factory=AnchorSection)  # keep step 0's knowledge


@dataclass
class LoopSection:
    epochs: int = 10
    max_steps: int = 0  # > 0 overrides epochs
    eval_every: int = 0  # optimiser steps between validations; 0 = once per epoch
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    threads: int = 0  # torch CPU threads for the run; 0 = torch's default
    compile: bool = False  # torch.compile the towers (first steps slower, later ones faster)
    compile_backend: str = "inductor"  # the torch.compile backend when compile is on
    checkpointing: bool = False  # recompute transformer blocks in backward: less memory
    best_metric: str = "rsum"  # the validation metric that picks the best checkpoint
    # With the semantic branch: validation scores, and `best` holds, the weight-space
    # ensemble of the trained projections with their ConSE start (WiSE-FT): alpha * trained
    # + (1 - alpha) * start. 1 = the trained weights alone; `last` (resume) is never mixed.
    wise_alpha: float = 1.0


@dataclass
class TrainConfig:
    name: str = "cots"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    contrast: ContrastSection = field(default_factory=ContrastSection)
    objectives: ObjectivesSection = field(default_factory=ObjectivesSection)
    train: LoopSection = field(default_factory=LoopSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def enabled_units(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.objectives) if self.unit(f.name).enabled]

    def unit(self, name: str) -> UnitSection:
        return getattr(self.objectives, name)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def from_dict(obj: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, obj, "")


def load_config(source: str | Path, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """A recipe name (training/recipes/NAME.yaml) or a YAML/JSON run file, then `a.b=value`
    overrides; unknown keys and values of the wrong type are ValueErrors."""
    path = Path(source)
    if not path.is_file():
        if str(source) not in list_recipes():
            raise FileNotFoundError(
                f"no run file or recipe {str(source)!r} (recipes: {', '.join(list_recipes())})"
            )
        path = RECIPES / f"{source}.yaml"
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a mapping of config sections")
    obj.setdefault("name", path.stem)
    for item in overrides:
        _set_dotted(obj, item)
    return from_dict(obj)


def _set_dotted(obj: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = _parse_value(value)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _build(cls: type, obj: Any, prefix: str) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {obj!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r} (known in this section: "
            f"{', '.join(sorted(names))})"
        )
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in obj.items()}
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key + ".")
    origin = typing.get_origin(kind)
    if origin is list:
        return _coerce_list(kind, value, key)
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind in (int, float):
            if isinstance(value, bool) or (kind is int and isinstance(value, float)):
                raise TypeError
            return kind(value)
        if kind is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if origin is tuple:
            items = json.loads(value) if isinstance(value, str) else value
            args = typing.get_args(kind)
            if not isinstance(items, list | tuple) or len(items) != len(args):
                raise TypeError
            return tuple(_coerce(a, v, key) for a, v in zip(args, items, strict=True))
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: {value!r} is not a valid {_name(kind)}") from None
    raise AssertionError(f"unsupported config type {kind} for {key}")


def _coerce_list(kind: Any, value: Any, key: str) -> list[Any]:
    """A list (or its JSON/YAML text); each item is checked on its own, named key[i]."""
    items = _parse_value(value) if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"config key {key!r}: {value!r} is not a valid {_name(kind)}")
    (item,) = typing.get_args(kind)
    return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(items)]


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
