"""Datasets: Fashion-MNIST (gzipped IDX), an image-folder layout, and synthetic data.

A dataset is a random-access source of ``(image, label)`` records -- ``image`` a uint8
HWC numpy array, ``label`` an int -- plus what the pipeline needs to know about it
(:class:`Dataset`). Sources are plain sequences (``len`` and ``[i]``), which is what
``grain.MapDataset.source`` takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jaxconv.data.idx import IdxError, read_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# per-pixel statistics of the Fashion-MNIST training images on the [0, 1] scale
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Dataset:
    """A split of a dataset: the records and their description."""
    name: str
    split: str
    source: Sequence[Any]
    num_classes: int
    channels: int
    image_size: tuple[int, int] | None          # fixed (H, W), or None when sizes vary
    mean: tuple[float, ...] | None = None       # normalisation on the [0, 1] scale, if the data defines it
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.source)


class ArraySource:
    """Records from in-memory arrays: ``images`` uint8 (N, H, W, C), ``labels`` (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _find(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {data_dir}; install the dataset with "
        f"`{FASHION_MNIST_INSTALL}` (it puts the gzipped IDX files in {FASHION_MNIST_DIR}) "
        f"or point --data-dir at a directory holding them")


def fashion_mnist(split: str = "train", data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST from its four gzipped IDX files (``split`` is 'train' or 'test')."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    data_dir = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Fashion-MNIST directory {data_dir} does not exist; install the dataset "
                                f"with `{FASHION_MNIST_INSTALL}` or pass --data-dir")
    image_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
    label_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path, dtype=np.uint8, shape=(None, 28, 28))
    labels = read_idx(label_path, dtype=np.uint8, shape=(None,))
    if len(images) != len(labels):
        raise IdxError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= 10:
        raise IdxError(f"{label_path}: label {int(labels.max())} out of range for 10 classes")
    return Dataset("fashion-mnist", split, ArraySource(images[..., None], labels), num_classes=10,
                   channels=1, image_size=(28, 28), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                   class_names=FASHION_MNIST_CLASSES)


class SyntheticSource:
    """Deterministic random images whose label shifts their mean (so a model can learn them)."""

    def __init__(self, n: int, size: tuple[int, int], channels: int, num_classes: int, seed: int = 0):
        self.n, self.size, self.channels, self.num_classes, self.seed = n, size, channels, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        base = 40 + 175 * label / max(self.num_classes - 1, 1)
        image = rng.normal(base, 40.0, size=(*self.size, self.channels))
        return np.clip(image, 0, 255).astype(np.uint8), label


def synthetic(split: str = "train", *, n: int | None = None, n_test: int = 128, size: tuple[int, int] = (28, 28),
              channels: int = 1, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random images for smoke tests: ``n`` training records (default 512), ``n_test`` test ones."""
    n = (n if n is not None else 512) if split == "train" else n_test
    seed = seed * 2 + (split != "train")
    return Dataset("synthetic", split, SyntheticSource(n, tuple(size), channels, num_classes, seed),
                   num_classes=num_classes, channels=channels, image_size=tuple(size),
                   mean=(0.5,) * channels, std=(0.25,) * channels)


class ImageFolderSource:
    """``root/<class>/<image>`` files, classes in sorted order, images decoded with Pillow."""

    def __init__(self, root: str, channels: int = 3, classes: Sequence[str] | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if classes is not None:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{root}: class directories {extra} are not among the training classes")
        self.classes = tuple(classes if classes is not None else found)
        if not self.classes:
            raise ValueError(f"{root}: no class directories (expected root/<class>/<image files>)")
        self.files: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            directory = os.path.join(root, cls)
            if not os.path.isdir(directory):
                continue
            for dirpath, _, names in sorted(os.walk(directory, followlinks=True)):
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append((os.path.join(dirpath, name), label))
        if not self.files:
            raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under its class directories")
        self.root, self.channels = root, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.files[index]
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
        return (image[..., None] if image.ndim == 2 else image), label


def image_folder(root: str, split: str = "train", *, channels: int = 3) -> Dataset:
    """An ImageNet-style layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or, when
    ``root`` has no train/val subdirectories, ``root/<class>/*`` for every split)."""
    sub = {"train": ("train",), "test": ("val", "test"), "val": ("val", "test")}.get(split, (split,))
    train_dir = os.path.join(root, "train")
    split_dir = next((os.path.join(root, s) for s in sub if os.path.isdir(os.path.join(root, s))), None)
    if split_dir is None:
        if os.path.isdir(train_dir):
            raise FileNotFoundError(f"{root} has no {' or '.join(sub)} directory for the {split!r} split")
        split_dir = root
    classes = None
    if split != "train" and os.path.isdir(train_dir) and split_dir != train_dir:
        classes = ImageFolderSource(train_dir, channels).classes
    src = ImageFolderSource(split_dir, channels, classes)
    return Dataset(f"folder:{os.path.abspath(root)}", split, src, num_classes=len(src.classes),
                   channels=channels, image_size=None, class_names=src.classes)


DATASETS = ("fashion-mnist", "synthetic", "folder")


def get_dataset(name: str, split: str = "train", *, data_dir: str | None = None, **options) -> Dataset:
    """``name``: 'fashion-mnist', 'synthetic', 'folder' (with ``data_dir``), or a directory path
    (an image folder)."""
    if name == "fashion-mnist":
        return fashion_mnist(split, data_dir)
    if name == "synthetic":
        return synthetic(split, **options)
    if name == "folder" or (name not in DATASETS and os.path.isdir(name)):
        root = data_dir if name == "folder" else name
        if not root:
            raise ValueError("the 'folder' dataset needs --data-dir ROOT (ROOT/train/<class>/..., ROOT/val/<class>/...)")
        return image_folder(root, split, **options)
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or an image-folder path")
