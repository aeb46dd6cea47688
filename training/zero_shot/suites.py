"""The zero-shot suites behind one contract: each resolves its data when built (so a missing
package fails before any bundle runs) and scores the two towers of one bundle."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from index_builder.encoders import Encoders
from index_builder.manifest import image_path, load_records
from index_builder.progress import progress
from training.zero_shot import metrics as M
from training.zero_shot import sources

# Fashion-MNIST labels 0..9, in readable words for the prompt "a photo of a <class>."
FASHION_CLASSES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
PROMPT = "a photo of a {}."


def embed_images(encoders: Encoders, images: Sequence[Image.Image | Path], desc: str) -> np.ndarray:
    """(N, D) unit vectors of decoded images or image files, batch by batch with a progress bar."""
    step = encoders.image.batch_size
    parts = []
    for start in progress(range(0, len(images), step), desc=desc, unit="batch"):
        batch = images[start : start + step]
        if all(isinstance(item, Path) for item in batch):
            parts.append(encoders.image.encode_paths(batch))  # type: ignore[arg-type]
        else:
            parts.append(encoders.image.encode_images(batch))  # type: ignore[arg-type]
    return np.concatenate(parts) if parts else np.zeros((0, encoders.bundle.embed_dim), np.float32)


class Suite(abc.ABC):
    """One zero-shot test: `score` returns flat {metric: number}; `columns` names the ones
    the report shows (key -> label), `headline` the one of the summary table, and `plotted`
    those drawn as percent bars."""

    kind: ClassVar[str]
    description: ClassVar[str]
    columns: ClassVar[dict[str, str]]
    headline: ClassVar[str]
    plotted: ClassVar[tuple[str, ...]]

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What was scored: sizes and where the data came from."""

    @abc.abstractmethod
    def score(self, encoders: Encoders) -> dict[str, Any]:
        """Every figure of this suite for one bundle."""

    def format(self, key: str, metrics: dict[str, Any]) -> str:
        return f"{metrics[key]:.1f}"

    def percent(self, key: str, metrics: dict[str, Any]) -> float:
        return float(metrics[key])


class FashionMNIST(Suite):
    kind = "fashion-mnist"
    description = (
        "Fashion-MNIST test split, a fixed balanced subset (the first images of each class). "
        "Zero-shot classification: each image takes the class of its nearest prompt "
        f"'{PROMPT.format('<class>')}' (accuracy = image-to-text R@1). Text-to-image: the 10 "
        "prompts rank the whole subset; mAP over the full ranking and precision@10. Ties "
        "count as misses."
    )
    columns = {"accuracy": "accuracy", "t2i_map": "t2i mAP", "t2i_p10": "t2i P@10"}
    headline = "accuracy"
    plotted = ("accuracy", "t2i_map", "t2i_p10")

    def __init__(self, name: str, per_class: int = 100) -> None:
        super().__init__(name)
        images, labels = sources.fashion_mnist_test()
        keep = sources.balanced_subset(labels, per_class)
        self.pixels, self.labels, self.per_class = images[keep], labels[keep].astype(int), per_class

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self.labels),
            "per_class": self.per_class,
            "classes": list(FASHION_CLASSES),
            "prompts": [PROMPT.format(c) for c in FASHION_CLASSES],
            "source": str(sources.FASHION_MNIST),
        }

    def score(self, encoders: Encoders) -> dict[str, Any]:
        # 28x28 grey -> RGB; the bundle's own preprocessing resizes it like any image.
        images = [Image.fromarray(p, "L").convert("RGB") for p in self.pixels]
        image_emb = embed_images(encoders, images, f"{self.name} images")  # (N, D)
        prompt_emb = encoders.text.encode([PROMPT.format(c) for c in FASHION_CLASSES])  # (C, D)
        sims = image_emb @ prompt_emb.T  # (N, C)
        classes = np.arange(len(FASHION_CLASSES))
        relevant = self.labels[:, None] == classes[None, :]  # (N, C)
        # Right when the image's own prompt beats every other one (a tie is wrong).
        correct = M.first_relevant_rank(sims, relevant) == 0  # (N,)
        accuracy = 100.0 * float(correct.mean())
        return {
            "accuracy": accuracy,
            "i2t_r1": accuracy,  # zero-shot classification is image-to-text R@1
            "t2i_map": 100.0 * float(M.average_precision(sims.T, relevant.T).mean()),
            "t2i_p10": 100.0 * float(M.precision_at_k(sims.T, relevant.T, 10).mean()),
            "per_class_accuracy": {
                name: 100.0 * float(correct[self.labels == c].mean())
                for c, name in enumerate(FASHION_CLASSES)
            },
        }


class PairedSuite(Suite):
    """Images with captions: recall@K both ways (a hit when the image's own caption, or the
    caption's own image, is in the top K) and RSUM."""

    ks: ClassVar[tuple[int, ...]] = (1, 5, 10)

    def __init__(self, name: str, paths: list[Path], captions: list[str], owners: list[int]):
        super().__init__(name)
        self.paths, self.captions, self.owners = paths, captions, owners

    def score(self, encoders: Encoders) -> dict[str, Any]:
        image_emb = embed_images(encoders, self.paths, f"{self.name} images")
        text_emb = encoders.text.encode(self.captions)
        return M.recall_both_ways(image_emb, text_emb, self.owners, self.ks)


class SkimagePhotos(PairedSuite):
    kind = "skimage"
    description = (
        "scikit-image's bundled photographs, one hand-written caption each "
        "(training/zero_shot/skimage_captions.json): recall@1/5 both ways and their sum."
    )
    ks = (1, 5)
    columns = {
        "i2t_r1": "i2t R@1",
        "i2t_r5": "i2t R@5",
        "t2i_r1": "t2i R@1",
        "t2i_r5": "t2i R@5",
        "rsum": "RSUM",
    }
    headline = "rsum"
    plotted = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")

    def __init__(self, name: str) -> None:
        paths, captions = sources.skimage_photos()
        super().__init__(name, paths, captions, list(range(len(paths))))

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self.paths),
            "captions": dict(zip([p.name for p in self.paths], self.captions, strict=True)),
        }


class Gallery(PairedSuite):
    kind = "gallery"
    description = (
        "A dataset directory (cots data manifest): image-to-text R@K counts a hit when any "
        "caption of the image is in the top K, text-to-image when the caption's image is."
    )
    columns = {f"{d}_r{k}": f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
        "rsum": "RSUM"
    }
    headline = "rsum"
    plotted = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))

    def __init__(self, name: str, dataset: Path, split: str = "all") -> None:
        records = load_records(dataset, None if split == "all" else split)
        if not records:
            raise ValueError(f"split {split!r} of {dataset} has no records")
        paths = [image_path(dataset, r) for r in records]
        captions = [c for r in records for c in r.captions]
        owners = [i for i, r in enumerate(records) for _ in r.captions]
        super().__init__(name, paths, captions, owners)
        self.dataset, self.split = dataset, split

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": str(self.dataset),
            "split": self.split,
            "images": len(self.paths),
            "captions": len(self.captions),
        }


class PhotoFolder(Suite):
    kind = "photos"
    description = (
        "A folder of real photographs from installed packages (scikit-image, scikit-learn, "
        "matplotlib, lomiri-wallpapers-16.04, mate-backgrounds) searched by text queries with "
        "known right photos (training/zero_shot/photo_queries.json): how many queries have a "
        "right photo at rank 1 and in the top 10, and the mean reciprocal rank of the first one."
    )
    columns = {"r1_hits": "right at 1", "r10_hits": "right in top 10", "mrr": "MRR"}
    headline = "r1_hits"
    plotted = ("r1_hits", "r10_hits", "mrr")

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.paths, self.queries, self.answers = sources.photo_folder()

    def describe(self) -> dict[str, Any]:
        return {
            "photos": len(self.paths),
            "queries": {
                q: [self.paths[i].name for i in a]
                for q, a in zip(self.queries, self.answers, strict=True)
            },
        }

    def score(self, encoders: Encoders) -> dict[str, Any]:
        image_emb = embed_images(encoders, self.paths, f"{self.name} photos")  # (G, D)
        sims = encoders.text.encode(self.queries) @ image_emb.T  # (Q, G)
        relevant = np.zeros(sims.shape, bool)
        for q, answers in enumerate(self.answers):
            relevant[q, answers] = True
        ranks = M.first_relevant_rank(sims, relevant)
        return {
            "r1_hits": M.hits_at(ranks, 1),
            "r10_hits": M.hits_at(ranks, 10),
            "queries": len(ranks),
            "mrr": M.mean_reciprocal_rank(ranks),
            "first_right_rank": {q: int(r) + 1 for q, r in zip(self.queries, ranks, strict=True)},
        }

    def format(self, key: str, metrics: dict[str, Any]) -> str:
        if key == "mrr":
            return f"{metrics[key]:.3f}"
        return f"{metrics[key]}/{metrics['queries']}"

    def percent(self, key: str, metrics: dict[str, Any]) -> float:
        if key == "mrr":
            return 100.0 * metrics[key]
        return 100.0 * metrics[key] / metrics["queries"]


BUILT_IN = {"fashion-mnist": FashionMNIST, "skimage": SkimagePhotos, "photos": PhotoFolder}
KINDS = (*BUILT_IN, "gallery")


def build_suites(
    kinds: Sequence[str],
    data: Sequence[tuple[str, Path]] = (),
    split: str = "all",
    per_class: int = 100,
) -> list[Suite]:
    """The suites to run, their data resolved (a missing package fails here). `gallery`
    becomes one suite per dataset, named `gallery:NAME`."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown suites {unknown}, expected some of {list(KINDS)}")
    if "gallery" in kinds and not data:
        raise ValueError("the gallery suite needs a dataset: --data NAME=DIR")
    if data and "gallery" not in kinds:
        raise ValueError("--data was given but 'gallery' is not among the suites")
    built: list[Suite] = []
    for kind in dict.fromkeys(kinds):
        if kind == "fashion-mnist":
            built.append(FashionMNIST(kind, per_class))
        elif kind == "gallery":
            built += [Gallery(f"gallery:{name}", path, split) for name, path in data]
        else:
            built.append(BUILT_IN[kind](kind))
    return built
