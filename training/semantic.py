"""The image tower's semantic branch: its ImageNet classifier read through the text tower.

ConSE (Norouzi et al., ICLR 2014, "Zero-Shot Learning by Convex Combination of Semantic
Embeddings"): the classifier's probabilities over the 1,000 ImageNet classes, kept for the top
T classes and renormalised, weight the text tower's embeddings of those classes' texts
("<lemma, synonyms>: <WordNet definition>"). The result lives in the text tower's space, so a
caption can be compared with it before any training. `SemanticHead` is that map; the model
projects its output into the joint space beside the visual projection (training/two_tower.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index_builder import paths
from index_builder.preprocess import TextTokenizer, sha256_file
from training.towers.weights import tensor_digest

CLASS_FILES = {"imagenet": Path(__file__).parent / "data" / "imagenet_classes.tsv"}
CLASS_TEXT_LENGTH = 128  # tokens of a class text (sentence-transformers' limit is 256)


def class_file(spec: str) -> Path:
    """`imagenet` (the shipped file) or a path to a TSV of `id<TAB>names<TAB>definition`."""
    path = CLASS_FILES.get(spec) or Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"semantic classes {spec!r}: no such file (use 'imagenet' or a TSV path)"
        )
    return path


def class_texts(spec: str) -> list[str]:
    """One text per classifier output, in the classifier's order: "names: definition"."""
    texts = []
    for line in class_file(spec).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"semantic classes {spec!r}: expected 3 tab-separated fields: {line}")
        texts.append(f"{fields[1]}: {fields[2]}")
    return texts


class SemanticHead(nn.Module):
    """Pooled image features (B, W) -> ConSE vector (B, Dt) in the text tower's space.

    `classifier`: the image tower's pretrained classifier (C classes); `class_embeddings`
    (C, Dt): the text tower's unit embeddings of the class texts. Both frozen: they are the
    knowledge this branch keeps. `top` = 0 uses every class.
    """

    def __init__(self, width: int, classes: int, text_width: int, temperature: float, top: int):
        super().__init__()
        self.classifier = nn.Linear(width, classes)
        self.register_buffer("class_embeddings", torch.zeros(classes, text_width))
        self.temperature, self.top = temperature, top
        self.requires_grad_(False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(pooled) / self.temperature  # (B, C)
        if not self.top:
            return F.softmax(logits, dim=-1) @ self.class_embeddings  # (B, Dt)
        values, index = logits.topk(self.top, dim=-1)  # (B, T)
        weights = F.softmax(values, dim=-1)  # renormalised over the top T
        return torch.einsum("bt,btd->bd", weights, self.class_embeddings[index])  # (B, Dt)


@torch.no_grad()
def embed_class_texts(
    text_tower: nn.Module, tokenizer_json: Path, texts: list[str]
) -> torch.Tensor:
    """(C, Dt) unit embeddings of the class texts by the (pretrained) text tower, cached on
    disk by the tower's weights, the tokenizer and the texts: computing them takes seconds."""
    key = _cache_key(text_tower, tokenizer_json, texts)
    cached = paths.home() / "cache" / "class_texts" / f"{key}.npy"
    if cached.is_file():
        return torch.from_numpy(np.load(cached))
    was_training = text_tower.training
    text_tower.eval()
    ids, mask = TextTokenizer(tokenizer_json, CLASS_TEXT_LENGTH)(texts)
    order = np.argsort(mask.sum(1))  # batches of similar length: little padding to compute
    out = torch.empty(len(texts), text_tower.width)
    for start in range(0, len(texts), 64):
        rows = order[start : start + 64]
        longest = int(mask[rows].sum(1).max())
        part_ids = torch.from_numpy(ids[rows, :longest])
        part_mask = torch.from_numpy(mask[rows, :longest])
        out[torch.from_numpy(rows)] = text_tower(part_ids, part_mask)["pooled"].float()
    text_tower.train(was_training)
    out = F.normalize(out, dim=-1)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp-{id(out)}.npy")
    np.save(tmp, out.numpy())
    tmp.replace(cached)
    return out


def _cache_key(text_tower: nn.Module, tokenizer_json: Path, texts: list[str]) -> str:
    digest = hashlib.sha256(f"{sha256_file(tokenizer_json)}\n{tensor_digest(text_tower)}".encode())
    digest.update(f"{CLASS_TEXT_LENGTH}\n".encode() + "\n".join(texts).encode())
    return digest.hexdigest()[:32]


def conse_basis(dim: int, class_embeddings: torch.Tensor) -> torch.Tensor:
    """(D, Dt) orthonormal rows: the identity when D = Dt, else the class embeddings' top
    principal directions (completed to D rows when there are fewer classes)."""
    width = class_embeddings.shape[1]
    if dim == width:
        return torch.eye(dim)
    if dim > width:
        raise ValueError(f"embed_dim {dim} exceeds the text width {width}: no ConSE start")
    centred = class_embeddings - class_embeddings.mean(0)
    return torch.linalg.svd(centred, full_matrices=True).Vh[:dim]


PROJECTIONS = ("image_proj", "text_proj", "semantic_proj")


@torch.no_grad()
def wise(model: nn.Module, alpha: float) -> None:
    """WiSE-FT (Wortsman et al., CVPR 2022): `model`'s projections become alpha * trained +
    (1 - alpha) * their ConSE start (`conse_start`), in place. The towers are shared and
    frozen, so this is the whole weight-space ensemble of the trained and the zero-shot model."""
    q = conse_basis(model.text_proj.weight.shape[0], model.semantic.class_embeddings.float())
    for name in PROJECTIONS:
        weight = getattr(model, name).weight
        weight.mul_(alpha)
        if name != "image_proj":  # the visual projection starts at zero
            weight.add_((1.0 - alpha) * q.to(weight))


@contextmanager
def wise_mixed(model: nn.Module, alpha: float) -> Iterator[None]:
    """Inside: `model`'s projections are the WiSE-FT mix (`wise`); after: as they were.
    alpha = 1 (or a model without the semantic branch) changes nothing."""
    if alpha >= 1.0 or model.semantic is None:
        yield
        return
    saved = {name: getattr(model, name).weight.detach().clone() for name in PROJECTIONS}
    wise(model, alpha)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                getattr(model, name).weight.copy_(weight)


@torch.no_grad()
def conse_start(
    semantic_proj: nn.Linear,
    text_proj: nn.Linear,
    image_proj: nn.Linear,
    class_embeddings: torch.Tensor,
) -> None:
    """Step 0 = ConSE: the semantic and text projections share one map Q, the visual
    projection starts at zero, so an image embeds as norm(Q s) and a caption as norm(Q t).
    Q is the identity when the joint space is as wide as the text space (ConSE's ranking
    exactly); else the top principal directions of the class embeddings (nearly so)."""
    q = conse_basis(text_proj.weight.shape[0], class_embeddings)  # (D, Dt)
    semantic_proj.weight.copy_(q)
    text_proj.weight.copy_(q)
    nn.init.zeros_(image_proj.weight)
