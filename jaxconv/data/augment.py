"""Augmentation and evaluation crops in numpy and Pillow.

Every function takes a uint8 or float HWC image; random ones take a
``numpy.random.Generator`` (grain hands one to each record, seeded by the record's
index, so a pipeline is deterministic and resumable). The recipes:

* ``none``      -- the image as it is (resized and center-cropped if its size differs);
* ``flip``      -- random horizontal reflection;
* ``crop-flip`` -- zero-pad by ``size // 8`` (4 for 32x32, 3 for 28x28), random crop back, flip:
                   the small-image recipe of He et al.;
* ``rrc``       -- random-resized crop (scale 0.08-1, aspect 3/4-4/3) and flip (Inception style);
* ``alexnet``   -- Krizhevsky et al.: rescale to 256x256 (short side to 256, center crop),
                   random 224x224 crops with random reflection, and the PCA colour
                   augmentation (alpha ~ N(0, 0.1) along the RGB principal components), with
                   ImageNet's published eigenvalues/vectors or ones computed by
                   :func:`pca_from_images`. Sizes scale with the model's input size.

Evaluation: a center crop (after resizing the short side), or ten crops -- the four
corners and the center, and their reflections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The RGB principal components of ImageNet's training pixels on the [0, 1] scale (as
# published with the fb.resnet.torch / Krizhevsky-style lighting augmentation).
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float32)
RECIPES = ("none", "flip", "crop-flip", "rrc", "alexnet")


def _pil(image: np.ndarray):
    from PIL import Image

    if image.dtype != np.uint8:
        raise TypeError(f"Pillow resizing needs a uint8 image, got {image.dtype}")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(pil, channels: int) -> np.ndarray:
    arr = np.asarray(pil)
    return arr[..., None] if arr.ndim == 2 else arr[..., :channels]


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of a uint8 HWC image to (H, W)."""
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return _array(_pil(image).resize((w, h), Image.BILINEAR), image.shape[-1])


def resize_short(image: np.ndarray, short: int) -> np.ndarray:
    """Resize so that the shorter side is ``short`` (torchvision's ``Resize(int)``)."""
    h, w = image.shape[:2]
    if min(h, w) == short:
        return image
    if h <= w:
        return resize(image, (short, max(1, int(short * w / h))))
    return resize(image, (max(1, int(short * h / w)), short))


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's CenterCrop (zero-padding first if the image is smaller)."""
    th, tw = size
    h, w = image.shape[:2]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return image[top:top + th, left:left + tw]


def random_crop(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    th, tw = size
    h, w = image.shape[:2]
    if h < th or w < tw:
        raise ValueError(f"cannot crop {th}x{tw} out of a {h}x{w} image")
    top, left = int(rng.integers(h - th + 1)), int(rng.integers(w - tw + 1))
    return image[top:top + th, left:left + tw]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad by ``pad`` on every side and crop a random window of the original size."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return random_crop(padded, image.shape[:2], rng)


def random_resized_crop(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """A random area fraction and aspect ratio, resized to ``size`` (torchvision's algorithm)."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            return resize(image[top:top + ch, left:left + cw], size)
    # fall back to a center crop of the clamped aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return resize(center_crop(image, (ch, cw)), size)


def pca_from_images(images: np.ndarray | Sequence[np.ndarray], max_pixels: int = 1_000_000,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance of ``images``
    on the [0, 1] scale -- Krizhevsky et al.'s PCA over the training set's pixels."""
    pixels = np.concatenate([np.asarray(im).reshape(-1, np.asarray(im).shape[-1]) for im in images])
    if pixels.shape[-1] != 3:
        raise ValueError(f"PCA colour augmentation needs RGB images, got {pixels.shape[-1]} channels")
    if len(pixels) > max_pixels:
        pixels = pixels[np.random.default_rng(seed).choice(len(pixels), max_pixels, replace=False)]
    pixels = pixels.astype(np.float64) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels, rowvar=False))
    order = np.argsort(eigval)[::-1]
    return eigval[order].astype(np.float32), eigvec[:, order].astype(np.float32)


def pca_lighting(image: np.ndarray, rng: np.random.Generator, alphastd: float = 0.1,
                 eigval: np.ndarray = IMAGENET_EIGVAL, eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Add ``eigvec @ (alpha * eigval)`` to every pixel of a float [0, 1] RGB image,
    ``alpha ~ N(0, alphastd)`` drawn once per image."""
    if alphastd <= 0:
        return image
    alpha = rng.normal(0.0, alphastd, size=3).astype(np.float32)
    return image + (eigvec @ (alpha * eigval)).astype(image.dtype)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.size not in (1, image.shape[-1]):
        raise ValueError(f"normalisation for {mean.size} channels applied to a {image.shape[-1]}-channel image")
    return (image - mean) / std


def ten_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(10, h, w, C): the four corners, the center, then the same five reflected."""
    th, tw = size
    h, w = image.shape[:2]
    if h < th or w < tw:
        raise ValueError(f"cannot take {th}x{tw} crops of a {h}x{w} image")
    crops = [image[:th, :tw], image[:th, w - tw:], image[h - th:, :tw], image[h - th:, w - tw:],
             center_crop(image, size)]
    return np.stack(crops + [c[:, ::-1] for c in crops])


@dataclass(frozen=True)
class TrainTransform:
    """``(uint8 image, label), rng -> (float32 normalised image, label)`` for a recipe."""
    recipe: str
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None          # the short side before cropping (alexnet: 256 for 224)
    eigval: tuple[float, ...] = tuple(IMAGENET_EIGVAL.tolist())
    eigvec: tuple[tuple[float, ...], ...] = tuple(map(tuple, IMAGENET_EIGVEC.tolist()))
    alphastd: float = 0.1

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown augmentation {self.recipe!r}; choose from {', '.join(RECIPES)}")

    def __call__(self, record, rng: np.random.Generator):
        image, label = record
        size = tuple(self.size)
        if self.recipe == "rrc":
            image = random_flip(random_resized_crop(image, size, rng), rng)
        elif self.recipe == "alexnet":
            big = self.resize or int(round(size[0] * 256 / 224))
            image = center_crop(resize_short(image, big), (big, big * size[1] // size[0]))
            image = random_flip(random_crop(image, size, rng), rng)
        else:
            if image.shape[:2] != size:
                image = center_crop(resize_short(image, self.resize or min(size)), size)
            if self.recipe == "crop-flip":
                image = random_flip(pad_crop(image, max(1, size[0] // 8), rng), rng)
            elif self.recipe == "flip":
                image = random_flip(image, rng)
        x = to_float(np.ascontiguousarray(image))
        if self.recipe == "alexnet" and x.shape[-1] == 3:
            x = pca_lighting(x, rng, self.alphastd, np.asarray(self.eigval, np.float32),
                             np.asarray(self.eigvec, np.float32))
        return normalize(x, self.mean, self.std), np.int32(label)


    def can_batch(self, image_shape) -> bool:
        """Whether :meth:`batch` handles images of ``image_shape`` (H, W, C): the recipes
        ``none``, ``flip`` and ``crop-flip`` on images that already have the model's size."""
        return self.recipe in ("none", "flip", "crop-flip") and tuple(image_shape[:2]) == tuple(self.size)

    def batch(self, images: np.ndarray, rng: np.random.Generator, offset: int = 0,
              total: int | None = None) -> np.ndarray:
        """The recipe on a whole uint8 batch (N, H, W, C) at once, vectorised: float32,
        normalised. The random draws are made for ``total`` records (default N) and
        records ``[offset, offset + N)`` of them are used, so a process that holds one
        slice of a global batch draws what a single process holding all of it would."""
        n, h, w, c = images.shape
        if not self.can_batch(images.shape[1:]):
            raise ValueError(f"the {self.recipe!r} recipe on {h}x{w} images (model size {self.size}) "
                             f"has no batched form; use the per-image transform")
        total = n if total is None else total
        if not 0 <= offset <= total - n:
            raise ValueError(f"records [{offset}, {offset + n}) are not inside a batch of {total}")
        pad = max(1, h // 8) if self.recipe == "crop-flip" else 0
        tops = lefts = np.full(total, pad)
        flips = np.zeros(total, bool)
        if self.recipe == "crop-flip":
            tops = rng.integers(0, 2 * pad + 1, size=total)
            lefts = rng.integers(0, 2 * pad + 1, size=total)
        if self.recipe in ("flip", "crop-flip"):
            flips = rng.random(total) < 0.5
        tops, lefts, flips = (a[offset:offset + n] for a in (tops, lefts, flips))
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
        rows = tops[:, None] + np.arange(h)                                     # (N, H)
        cols = lefts[:, None] + np.where(flips[:, None], np.arange(w)[::-1], np.arange(w))   # (N, W)
        out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]        # (N, H, W, C)
        return _normalize_uint8(out, self.mean, self.std)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to ``resize``, then a center crop of ``size`` or ten crops."""
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    crops: str = "center"              # 'center' or 'ten'

    def __call__(self, record):
        image, label = record
        size = tuple(self.size)
        if image.shape[:2] != size or self.crops == "ten":
            image = resize_short(image, self.resize or min(size))
        if self.crops == "ten":
            return normalize(to_float(ten_crop(image, size)), self.mean, self.std), np.int32(label)
        if self.crops != "center":
            raise ValueError(f"unknown evaluation crop {self.crops!r}: 'center' or 'ten'")
        return normalize(to_float(np.ascontiguousarray(center_crop(image, size))), self.mean, self.std), \
            np.int32(label)

    def can_batch(self, image_shape) -> bool:
        """Whether :meth:`batch` handles images of ``image_shape``: a center crop of images
        that already have the model's size (nothing to do but normalise)."""
        return self.crops == "center" and tuple(image_shape[:2]) == tuple(self.size)

    def batch(self, images: np.ndarray) -> np.ndarray:
        """A uint8 batch (N, H, W, C) of the model's size -> normalised float32, at once."""
        if not self.can_batch(images.shape[1:]):
            raise ValueError(f"no batched evaluation transform for {images.shape[1:3]} images "
                             f"(model size {self.size}, crops {self.crops!r})")
        return _normalize_uint8(images, self.mean, self.std)


def _normalize_uint8(images: np.ndarray, mean, std) -> np.ndarray:
    """``normalize(to_float(images))`` for a uint8 batch (N, H, W, C), through a 256-entry
    table per channel (the same float32 arithmetic, once per value instead of per pixel)."""
    c = images.shape[-1]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.size not in (1, c):
        raise ValueError(f"normalisation for {mean.size} channels applied to a {c}-channel image")
    table = (np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)
             - mean.reshape(1, -1)) / std.reshape(1, -1)                     # (256, 1 or C)
    if table.shape[1] == 1:
        return table[:, 0][images]
    return table[images, np.arange(c)]
