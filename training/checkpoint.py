"""Self-describing checkpoint directories, written atomically; `load_model` reads them back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.model import ModelConfig, TwoTower, build_model

FORMAT = "cots.checkpoint/1"
WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
TOKENIZER = "tokenizer.json"
# Model config keys that do not change the architecture (where weights came from, what trains).
NOT_ARCHITECTURE = {
    "name",
    "image_weights",
    "text_weights",
    "image_trainable_blocks",
    "text_trainable_blocks",
    "tokenizer",
}


def save_checkpoint(
    path: str | Path,
    model: TwoTower,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write model.safetensors (+ tokenizer.json, + trainer.pt) into a temporary directory
    beside `path`, then swap it in: a reader finds the old checkpoint or the new one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        **meta,
        "format": FORMAT,
        "model": model.config.to_dict(),
        "image_spec": model.image_spec.to_dict(),
        "text_spec": model.text_spec.to_dict(),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS, metadata={"cots": json.dumps(meta)})
    shutil.copyfile(model.tokenizer_json, tmp / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The description stored in a checkpoint, without loading its weights."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (missing {WEIGHTS})")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["cots"])
    except (KeyError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{weights} is not a cots checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{weights} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def check_architecture(meta: dict[str, Any], config: ModelConfig, where: str | Path) -> None:
    """ValueError naming the differing keys when a checkpoint cannot hold `config`'s model."""
    # Keys added since a checkpoint was written (e.g. shared_*) take their defaults, which
    # build what that checkpoint held.
    stored = {**ModelConfig.defaults(), **meta["model"]}
    wanted = config.to_dict()
    keys = sorted(k for k in set(stored) | set(wanted) if k not in NOT_ARCHITECTURE)
    diff = [k for k in keys if _norm(stored.get(k)) != _norm(wanted.get(k))]
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} vs {wanted.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"checkpoint {where} holds another architecture (preset {stored.get('name')!r}, "
            f"this config builds {wanted.get('name')!r}): {shown}"
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, dict]:
    """Rebuild the model a checkpoint describes and load its weights -> (model, meta)."""
    path = Path(path)
    meta = read_meta(path)
    config = ModelConfig.from_dict({**meta["model"], "tokenizer": str(path / TOKENIZER)})
    model = build_model(config, load_weights=False)
    load_weights(model, path)
    return model.to(device).eval(), meta


def load_weights(model: TwoTower, path: str | Path) -> None:
    """Load a checkpoint's weights into an existing model of the same architecture."""
    check_architecture(read_meta(path), model.config, path)
    state = load_file(str(Path(path) / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise ValueError(f"checkpoint {path} does not fit the model: {first[0].strip()}") from None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINER
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {TRAINER}: it cannot be resumed")
    return torch.load(file, map_location="cpu", weights_only=False)
