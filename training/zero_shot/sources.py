"""Where the zero-shot suites find their data: files that installed Debian and Python
packages ship, and the Fashion-MNIST IDX reader. A missing package is a `MissingData`
error that says what to install."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from index_builder.atomic import read_json

HERE = Path(__file__).parent
SKIMAGE_CAPTIONS = HERE / "skimage_captions.json"
PHOTO_QUERIES = HERE / "photo_queries.json"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Where each photo source keeps its pictures, and what to install when it is missing.
APT = {
    "lomiri-wallpapers-16.04": Path("/usr/share/backgrounds"),
    "mate-backgrounds": Path("/usr/share/backgrounds/mate/nature"),
}
PIP = {  # package (as pip spells it) -> (module, folder inside the module)
    "scikit-image": ("skimage", "data"),
    "scikit-learn": ("sklearn", "datasets/images"),
    "matplotlib": ("matplotlib", "mpl-data/sample_data"),
}


class MissingData(FileNotFoundError):
    """A suite's data is not installed; the message names the package to install."""


def apt_hint(package: str) -> str:
    return f"install it with: apt-get install {package} (or deploy/install.sh dev)"


def pip_hint(package: str) -> str:
    return f"install it with: pip install {package} (or pip install 'cots[eval]')"


def package_dir(source: str) -> Path:
    """The folder of pictures that `source` (a key of APT or PIP) installs."""
    if source in APT:
        folder = APT[source]
        if not folder.is_dir():
            raise MissingData(
                f"{folder} is missing: the package {source} is not installed; {apt_hint(source)}"
            )
        return folder
    if source not in PIP:
        raise ValueError(f"unknown photo source {source!r}, expected one of {sorted([*APT, *PIP])}")
    module, inside = PIP[source]
    spec = importlib.util.find_spec(module)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(f"the Python package {source} is not installed; {pip_hint(source)}")
    return Path(next(iter(spec.submodule_search_locations))) / inside


def package_file(source: str, name: str) -> Path:
    path = package_dir(source) / name
    if not path.is_file():
        hint = apt_hint(source) if source in APT else pip_hint(source)
        raise MissingData(f"{path} is missing (this version of {source} lacks it?); {hint}")
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped): big-endian magic, dimensions, uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


def fashion_mnist_test(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images (N, 28, 28) uint8 and their labels (N,) from the Debian
    package dataset-fashion-mnist (in `root`, by default where it installs them)."""
    root = FASHION_MNIST if root is None else root
    files = [root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"]
    for file in files:
        if not file.is_file():
            raise MissingData(
                f"{file} is missing: the Fashion-MNIST test split comes from "
                f"the Debian package dataset-fashion-mnist; "
                f"{apt_hint('dataset-fashion-mnist')}"
            )
    images, labels = (read_idx(file) for file in files)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"{root}: expected (N, 28, 28) images with N labels, got "
            f"{images.shape} and {labels.shape}"
        )
    return images, labels


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` items of each label, in file order: a fixed subset."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    picked = []
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        if len(where) < per_class:
            raise ValueError(f"label {label} has {len(where)} items, fewer than {per_class}")
        picked.append(where[:per_class])
    return np.sort(np.concatenate(picked))


def skimage_photos() -> tuple[list[Path], list[str]]:
    """scikit-image's bundled photographs and the caption written for each."""
    captions = read_json(SKIMAGE_CAPTIONS)["captions"]
    return [package_file("scikit-image", name) for name in captions], list(captions.values())


def photo_folder() -> tuple[list[Path], list[str], list[list[int]]]:
    """The photo folder (paths), the query texts, and each query's right photos (indices)."""
    spec = read_json(PHOTO_QUERIES)
    paths = [package_file(src, name) for src, names in spec["sources"].items() for name in names]
    index = {path.name: i for i, path in enumerate(paths)}
    if len(index) != len(paths):
        raise ValueError(f"{PHOTO_QUERIES}: two photos share a file name")
    answers = []
    for query in spec["queries"]:
        unknown = [name for name in query["answers"] if name not in index]
        if unknown or not query["answers"]:
            raise ValueError(
                f"{PHOTO_QUERIES}: query {query['text']!r} names photos not in "
                f"the folder: {unknown}"
            )
        answers.append([index[name] for name in query["answers"]])
    return paths, [query["text"] for query in spec["queries"]], answers
