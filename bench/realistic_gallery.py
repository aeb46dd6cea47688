"""Realistic embedding galleries of any size, modelled on real embeddings of real galleries.

    python -m bench.realistic_gallery --real cots-data/real-embeddings/openclipart \
        cots-data/real-embeddings/emoji cots-data/real-embeddings/synthetic --size 1000000

Random unit vectors have no cluster structure and no modality gap, so an index benchmarked on
them says little about a real gallery. This fits a model to real embeddings (index roots that
`cots index build --factory Flat` made with the served bundle: their `image.npy`, `text.npy`
and rows) and samples galleries from it:

- images: a mixture of Gaussians over spherical k-means clusters of the real image vectors,
  each with its weight, mean, top principal directions and an isotropic remainder, sampled
  and normalised;
- captions: for each sampled image, the image plus an offset drawn from its cluster's model
  of the real caption-minus-image offsets (their mean is the modality gap), normalised.

The real items are split by image: the model is fitted on 80%, and the other 20% (their images
and captions, never seen by the fit) are the queries of the other modality. `--size` samples a
gallery and compares it with the real one at the same size, side by side (nearest-neighbour
similarity, cluster sizes, cross-modal top-1 similarity): figures in
bench/results/realistic_gallery.json, pictures in docs/img/realistic_gallery.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.figure import Figure, note
from bench.tables import fmt, table
from index_builder.backends.faiss.store import IndexStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results"
CHUNK = 100_000
BLOCK = 8192


@dataclass
class Real:
    """Real embeddings of one or more galleries: image vectors, caption vectors, the image
    row of each caption, and what a service query needs (caption texts, image files)."""

    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray
    texts: list[str]
    image_files: list[str]

    def subset(self, image_rows: np.ndarray) -> Real:
        """The given images and their captions (caption_image renumbered)."""
        keep = np.isin(self.caption_image, image_rows)
        renumber = np.full(len(self.images), -1)
        renumber[image_rows] = np.arange(len(image_rows))
        return Real(
            self.images[image_rows],
            self.captions[keep],
            renumber[self.caption_image[keep]],
            [t for t, k in zip(self.texts, keep, strict=True) if k],
            [self.image_files[i] for i in image_rows],
        )


def load_real(roots: list[Path]) -> Real:
    """The current version of each index root (built with `--factory Flat`), concatenated."""
    parts = []
    for root in roots:
        index = IndexStore(root).open()
        texts = index.rows("text")
        parts.append(
            (
                index.vectors["image"],
                index.vectors["text"],
                np.array([index.row_of("image", t["image_id"]) for t in texts]),
                [t["text"] for t in texts],
                [item["image"] for item in index.rows("image")],
            )
        )
    offsets = np.cumsum([0] + [len(p[0]) for p in parts])
    return Real(
        np.concatenate([p[0] for p in parts]).astype(np.float32),
        np.concatenate([p[1] for p in parts]).astype(np.float32),
        np.concatenate([p[2] + o for p, o in zip(parts, offsets, strict=False)]),
        [t for p in parts for t in p[3]],
        [f for p in parts for f in p[4]],
    )


def split_real(real: Real, held_out: float = 0.2, seed: int = 0) -> tuple[Real, Real]:
    """(fit, queries): a random `held_out` fraction of the images, with their captions, is
    kept out of the fit."""
    order = np.random.default_rng(seed).permutation(len(real.images))
    cut = int(round(len(order) * (1 - held_out)))
    return real.subset(np.sort(order[:cut])), real.subset(np.sort(order[cut:]))


@dataclass
class Gaussians:
    """Per-cluster low-rank Gaussians over (image, caption) pairs concatenated: mean (C, 2D),
    principal directions (C, R, 2D) with their standard deviations (C, R), and the standard
    deviation left in the other directions, per half (C, 2)."""

    mean: np.ndarray
    basis: np.ndarray
    scale: np.ndarray
    rest: np.ndarray

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = self.basis.shape[1]
        z = rng.standard_normal((len(clusters), r), dtype=np.float32) * self.scale[clusters]
        out = self.mean[clusters]
        for start in range(0, len(clusters), BLOCK):  # bounds the (n, r, 2D) basis gathered
            part = slice(start, start + BLOCK)
            out[part] += np.einsum("nr,nrd->nd", z[part], self.basis[clusters[part]])
        noise = rng.standard_normal(out.shape, dtype=np.float32)
        half = out.shape[1] // 2
        out[:, :half] += noise[:, :half] * self.rest[clusters, :1]
        out[:, half:] += noise[:, half:] * self.rest[clusters, 1:]
        return out


def fit_gaussians(points: np.ndarray, labels: np.ndarray, count: int, rank: int) -> Gaussians:
    """One Gaussian per label over points whose two halves are an image and its caption: mean,
    top `rank` principal directions (fewer for small clusters) and each half's mean variance
    in the remaining directions."""
    dim = points.shape[1]
    mean = np.zeros((count, dim), np.float32)
    basis = np.zeros((count, rank, dim), np.float32)
    scale = np.zeros((count, rank), np.float32)
    rest = np.zeros((count, 2), np.float32)
    for c in range(count):
        members = points[labels == c]
        if len(members) == 0:
            continue
        mean[c] = members.mean(0)
        centred = members - mean[c]
        if len(members) < 2:
            continue
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        r = min(rank, len(sv) - 1)
        basis[c, :r], scale[c, :r] = vt[:r], sv[:r] / np.sqrt(len(members) - 1)
        left = centred - (centred @ vt[:r].T) @ vt[:r]
        var = (left**2).sum(0) / (len(members) - 1)
        rest[c] = np.sqrt([var[: dim // 2].mean(), var[dim // 2 :].mean()])
    spare = rest[:, 0] == 0  # clusters of one: the median remainder
    if (~spare).any():
        rest[spare] = np.median(rest[~spare], axis=0)
    return Gaussians(mean, basis, scale, rest)


@dataclass
class Model:
    """Cluster weights and one Gaussian per cluster over (image, caption) pairs."""

    weights: np.ndarray
    pairs: Gaussians

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """n unit image vectors and one unit caption vector per image."""
        dim = self.pairs.mean.shape[1] // 2
        images = np.empty((n, dim), np.float32)
        captions = np.empty((n, dim), np.float32)
        self.sample_into(images, captions, seed)
        return images, captions

    def sample_into(
        self, images: np.ndarray, captions: np.ndarray, seed: int = 0, progress: bool = False
    ) -> None:
        """Fill `images` and `captions` (equal lengths; memory-mapped files work, so a gallery
        larger than memory is written in bounded memory) chunk by chunk, as `sample` does."""
        rng = np.random.default_rng(seed)
        dim, n = images.shape[1], len(images)
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            clusters = rng.choice(len(self.weights), stop - start, p=self.weights)
            pairs = self.pairs.sample(clusters, rng)
            images[start:stop] = normalise(pairs[:, :dim])
            captions[start:stop] = normalise(pairs[:, dim:])
            if progress and ((stop // CHUNK) % 10 == 0 or stop == n):
                rate = stop / max(time.perf_counter() - started, 1e-9)
                print(f"sampled {stop:,}/{n:,} pairs ({rate:,.0f}/s)", file=sys.stderr)


def shown(path: Path) -> str:
    """A path as recorded in results: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(real: Real, clusters: int, rank: int, seed: int = 0) -> Model:
    """The gallery model of `real` with `clusters` image clusters of up to `rank` directions."""
    kmeans = faiss.Kmeans(
        real.images.shape[1], clusters, niter=25, spherical=True, seed=seed, verbose=False
    )
    kmeans.train(real.images)
    labels = kmeans.index.search(real.images, 1)[1][:, 0]
    weights = np.bincount(labels, minlength=clusters).astype(np.float64)
    pairs = np.hstack([real.images[real.caption_image], real.captions])
    return Model(
        weights / weights.sum(), fit_gaussians(pairs, labels[real.caption_image], clusters, rank)
    )


# -- statistics ----------------------------------------------------------------------------------


def nn_similarity(points: np.ndarray) -> np.ndarray:
    """Each point's cosine similarity to its nearest other point."""
    index = faiss.IndexFlatIP(points.shape[1])
    index.add(points)
    return index.search(points, 2)[0][:, 1]


def cluster_sizes(points: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """Sizes of `clusters` spherical k-means clusters, largest first, as fractions."""
    kmeans = faiss.Kmeans(points.shape[1], clusters, niter=20, spherical=True, seed=seed)
    kmeans.train(points)
    labels = kmeans.index.search(points, 1)[1][:, 0]
    return np.sort(np.bincount(labels, minlength=clusters))[::-1] / len(points)


def top1(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Each query's highest cosine similarity in the gallery."""
    return faiss.knn(queries, gallery, 1, faiss.METRIC_INNER_PRODUCT)[0][:, 0]


def summary(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return {f"p{p}": round(float(v), 4) for p, v in zip((5, 25, 50, 75, 95), q, strict=True)}


def compare(real: Real, queries: Real, model: Model, seed: int = 1) -> dict[str, Any]:
    """Real against generated at the real gallery's size (one caption per image, as the
    generator makes them): each statistic's quantiles, and the arrays for the picture."""
    n = len(real.images)
    first = np.unique(real.caption_image, return_index=True)[1]
    real_images, real_captions = real.images, real.captions[first]
    gen_images, gen_captions = model.sample(n, seed)
    stats: dict[str, Any] = {}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "image nearest-neighbour similarity": (
            nn_similarity(real_images),
            nn_similarity(gen_images),
        ),
        "caption nearest-neighbour similarity": (
            nn_similarity(real_captions),
            nn_similarity(gen_captions),
        ),
        "matched image-caption similarity": (
            np.einsum("nd,nd->n", real.images[real.caption_image[first]], real_captions),
            np.einsum("nd,nd->n", gen_images, gen_captions),
        ),
        "held-out caption -> top-1 image similarity": (
            top1(queries.captions, real_images),
            top1(queries.captions, gen_images),
        ),
        "held-out image -> top-1 caption similarity": (
            top1(queries.images, real_captions),
            top1(queries.images, gen_captions),
        ),
    }
    clusters = max(8, n // 200)
    arrays["cluster sizes (fraction, largest first)"] = (
        cluster_sizes(real_images, clusters),
        cluster_sizes(gen_images, clusters),
    )
    for name, (r, g) in arrays.items():
        stats[name] = {"real": summary(r), "generated": summary(g)}
    gap = lambda a, b: float(np.linalg.norm(a.mean(0) - b.mean(0)))  # noqa: E731
    stats["modality gap (distance of the means)"] = {
        "real": round(gap(real_images, real_captions), 4),
        "generated": round(gap(gen_images, gen_captions), 4),
    }
    return {"stats": stats, "arrays": arrays}


def picture(arrays: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, (real, gen)) in zip(axes.ravel(), arrays.items(), strict=True):
        if name.startswith("cluster sizes"):
            ax.plot(real, label="real")
            ax.plot(gen, label="generated")
            ax.set_yscale("log")
            ax.set_xlabel("cluster rank")
        else:
            bins = np.linspace(min(real.min(), gen.min()), max(real.max(), gen.max()), 50)
            ax.hist(real, bins, alpha=0.6, density=True, label="real")
            ax.hist(gen, bins, alpha=0.6, density=True, label="generated")
            ax.set_xlabel("cosine similarity")
        ax.set_title(name, fontsize=10)
        ax.legend()
    fig.suptitle(f"Real embeddings against the generated gallery, both {n:,} items per side")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--size", type=int, default=1_000_000, help="items per generated side")
    parser.add_argument("--out", type=Path, default=RESULTS / "realistic_gallery.json")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs/img/realistic_gallery.png")
    return parser.parse_args(argv)


def fitted(args: argparse.Namespace) -> tuple[Real, Real, Model]:
    """The real embeddings split into fit and query halves, and the model of the fit half."""
    real, queries = split_real(load_real(args.real))
    clusters = args.clusters or max(8, len(real.images) // 20)
    return real, queries, fit(real, clusters, args.rank)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that choose the real embeddings and the model fitted to them."""
    parser.add_argument(
        "--real",
        type=Path,
        nargs="+",
        required=required,
        help="index roots of real galleries embedded by the bundle (`cots index build "
        "--factory Flat`)",
    )
    parser.add_argument("--clusters", type=int, default=0, help="image clusters (0: N/20)")
    parser.add_argument("--rank", type=int, default=16, help="principal directions per cluster")
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "cots-data/cache/realistic",
        help="where generated galleries are kept",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    real, queries, model = fitted(args)
    fit_s = time.perf_counter() - started
    compared = compare(real, queries, model)
    picture(compared["arrays"], args.picture, len(real.images))
    started = time.perf_counter()
    images, captions = model.sample(args.size)
    sample_s = time.perf_counter() - started
    big = {
        "held-out caption -> top-1 image similarity": summary(top1(queries.captions, images)),
        "held-out image -> top-1 caption similarity": summary(top1(queries.images, captions)),
    }
    result = {
        "real": {
            "roots": [str(p) for p in args.real],
            "fit_images": len(real.images),
            "fit_captions": len(real.captions),
            "query_images": len(queries.images),
            "query_captions": len(queries.captions),
        },
        "model": {
            "clusters": len(model.weights),
            "rank": args.rank,
            "fit_seconds": round(fit_s, 1),
        },
        "same_size_comparison": compared["stats"],
        "generated": {"size": args.size, "sample_seconds": round(sample_s, 1), **big},
        "picture": shown(args.picture),
        "command": shlex.join(["python", "-m", "bench.realistic_gallery", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _quantiles(value: Any) -> str:
    """A p5 / p50 / p95 cell from a mapping of quantiles; a scalar as it is."""
    if isinstance(value, dict):
        return " / ".join(fmt(value.get(q)) for q in ("p5", "p50", "p95"))
    return fmt(value)


def gallery_tables(data: dict) -> str:
    """realistic_gallery: the real and the generated gallery at the same size, statistic by
    statistic (p5 / p50 / p95), the model and its counts, then the full-size gallery."""
    real, model, big = data.get("real", {}), data.get("model", {}), data.get("generated", {})
    counts = (
        f"Model: {fmt(model.get('clusters'))} image clusters of rank {fmt(model.get('rank'))}, "
        f"fitted in {fmt(model.get('fit_seconds'))} s on {fmt(real.get('fit_images'))} real "
        f"images and {fmt(real.get('fit_captions'))} captions; held out as queries: "
        f"{fmt(real.get('query_images'))} images, {fmt(real.get('query_captions'))} captions "
        f"(real embeddings: {', '.join(f'`{r}`' for r in real.get('roots', []))})."
    )
    same = [
        {"statistic": name, "real p5 / p50 / p95": _quantiles(pair.get("real"))}
        | {"generated p5 / p50 / p95": _quantiles(pair.get("generated"))}
        for name, pair in data.get("same_size_comparison", {}).items()
    ]
    size = f"{fmt(big.get('size'))} items per side, sampled in {fmt(big.get('sample_seconds'))} s"
    full = [
        {"statistic": name, "generated p5 / p50 / p95": _quantiles(value)}
        for name, value in big.items()
        if isinstance(value, dict)
    ]
    parts = [counts, "Real against generated, both at the real gallery's size:", table(same)]
    parts += [f"The generated gallery at full size ({size}):", table(full)] if full else []
    return "\n\n".join(parts)


REAL_EMBEDDINGS = " ".join(
    f"cots-data/real-embeddings/{name}" for name in ("openclipart", "emoji", "synthetic")
)
FIGURE = Figure(
    "Realistic 1M gallery: real against generated embeddings",
    "realistic_gallery*.json",
    f"python -m bench.realistic_gallery --real {REAL_EMBEDDINGS} --size 1000000",
    note=note("realistic"),
    render=gallery_tables,
)


if __name__ == "__main__":
    sys.exit(main())
