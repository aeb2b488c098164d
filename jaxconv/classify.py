"""``jaxconv classify IMAGE... --model NAME``: the seed's classification of photos.

For each image it prints a header line (the file name as given) and then the top-k
classes, one a line, ``#k score class-name`` with ``score`` the softmax probability::

    chelsea.png
    #1 0.6180 tabby
    #2 0.2410 tiger cat

Preprocessing is the weights' own (``meta["preprocessing"]``): resize the short side to
``resize`` (Pillow's antialiased bilinear or bicubic filter, as torchvision's PIL path),
center crop ``crop``, scale to [0, 1], subtract ``mean`` and divide by ``std``. With
``--per-image-norm`` the last step is the seed's per-image normalisation instead,
``0.5 + 0.5 * (x - x.mean()) / x.std()`` with the mean and standard deviation taken over
all pixels and channels of each crop (a constant crop becomes 0.5 everywhere).

Test-time augmentation (``--tta``) averages the softmax probabilities of several views of
the image resized to ``resize``: ``none`` the center crop; ``flip`` the center crop and its
mirror image; ``five`` the four corner crops and the center crop; ``ten`` those five and
their horizontal reflections (AlexNet's test-time recipe).

All views of all images go through one jit-compiled function in batches of one fixed
shape (the last batch padded), so a run compiles once.

``--dense`` convolutionizes the model at its input size and runs Overfeat-style dense
prediction (:func:`jaxconv.convolutionize.dense_predict`) over several scales and their
mirror images; it prints the combined scores (the mean over scales of each class's
spatial maximum probability; they need not sum to 1) and writes a heat map PNG of the
top class over the image.

Exit status: 0 when every image was classified, 1 when some image failed (each failure
is printed to stderr with its file name; the other images are still classified), 2 for
a usage error (bad options, unknown model, no weights).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np

TTA = ("none", "flip", "five", "ten")
MAX_HEATMAP_SIDE = 1024   # the heat map PNG's longer side at most (larger photos are shrunk)
MIN_HEATMAP_SIDE = 256    # and at least (smaller images, e.g. 28x28, are enlarged to be seen)


# ----------------------------------------------------------------------------- weights

def _default_classes(name: str, n: int) -> list[str]:
    """Class names for ``n`` outputs of ``name`` when the weights file does not say:
    ImageNet's for 1000, else the default weights' names if they have ``n`` outputs, else
    ``class 0``, ``class 1``..."""
    from jaxconv.pretrained import DEFAULT_WEIGHTS, class_names

    if n == 1000:
        return class_names("imagenet_classes.txt")
    if name in DEFAULT_WEIGHTS:
        classes = class_names(DEFAULT_WEIGHTS[name].classes)
        if len(classes) == n:
            return classes
    return [f"class {i}" for i in range(n)]


def resolve_weights(name: str, weights: str | None = None) -> tuple[Any, dict, dict]:
    """``(model, variables, meta)`` for ``--weights``: None (the model's default
    pretrained weights), a ``.npz`` written by :func:`jaxconv.save_variables`, a torch
    checkpoint file (``.pth``, ``.pt``, ``.bin``: :func:`jaxconv.load_pretrained` with
    ``path=``, which also checks a torchvision file name's hash prefix), or a torchvision
    tag such as ``IMAGENET1K_V1``. ``meta["classes"]`` is always a list (see
    :func:`_default_classes` when the weights do not name their classes). Raises
    ``KeyError``/``FileNotFoundError``/``ValueError`` with a message when nothing usable
    is found."""
    from jaxconv.pretrained import head_outputs, load_pretrained
    from jaxconv.registry import get_model, model_info

    info = model_info(name)  # KeyError for an unknown model, with suggestions
    if weights is None:
        try:
            model, variables, meta = load_pretrained(name)
        except (KeyError, FileNotFoundError) as e:
            reason = e.args[0] if e.args else str(e)
            raise FileNotFoundError(f"no default pretrained weights for {name} are available: {reason}; "
                                    f"or pass --weights (a .npz from jaxconv.save_variables, a .pth "
                                    f"checkpoint or a torchvision tag)") from None
    elif weights.endswith(".npz"):
        from jaxconv.serialization import load_variables

        variables = load_variables(weights)   # FileNotFoundError / ValueError name the file
        try:
            n = head_outputs(name, variables)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{weights}: no '{info.mapping.head}' head in these variables: "
                             f"not weights for {name}?") from e
        model = get_model(name, num_classes=n, **info.weights_options)
        meta = {"preprocessing": info.preprocessing, "classes": None, "weights": weights,
                "description": f"{name} with weights from {weights}"}
    elif os.path.exists(weights) or weights.endswith((".pth", ".pt", ".bin")) or os.sep in weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no such weights file: {weights}")
        model, variables, meta = load_pretrained(name, path=weights)
    else:
        model, variables, meta = load_pretrained(name, weights)
    if not meta.get("classes"):
        meta = {**meta, "classes": _default_classes(name, head_outputs(name, variables))}
    return model, variables, meta


# ----------------------------------------------------------------------------- preprocessing

def resize_short(image, size: int, interpolation: str):
    """torchvision's ``Resize(size)`` on a PIL image: the short side becomes ``size``, the
    long side ``int(size * long / short)``."""
    from PIL import Image

    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    if interpolation not in filters:
        raise ValueError(f"unknown interpolation {interpolation!r}")
    w, h = image.size
    if w <= h:
        new = (size, max(1, int(size * h / w)))
    else:
        new = (max(1, int(size * w / h)), size)
    if Image.MAX_IMAGE_PIXELS and new[0] * new[1] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"a {w}x{h} image with its short side resized to {size} would be {new[0]}x{new[1]}: "
                         f"too elongated (more than PIL.Image.MAX_IMAGE_PIXELS pixels)")
    return image if new == (w, h) else image.resize(new, filters[interpolation])


def to_float(image, channels: int) -> np.ndarray:
    """A PIL image -> (H, W, channels) float32 in [0, 1]."""
    x = np.asarray(image, np.float32) / np.float32(255.0)
    return x[..., None] if x.ndim == 2 else x[..., :channels]


def views(image, preprocessing, channels: int, tta: str = "none") -> np.ndarray:
    """The (V, crop, crop, channels) float [0, 1] views of a loaded PIL image for ``tta``."""
    from jaxconv.data.augment import center_crop, ten_crop

    if tta not in TTA:
        raise ValueError(f"--tta is one of {', '.join(TTA)}, not {tta!r}")
    x = to_float(resize_short(image, preprocessing.resize, preprocessing.interpolation), channels)
    size = (preprocessing.crop, preprocessing.crop)
    if tta in ("none", "flip"):
        center = center_crop(x, size)
        return np.stack([center, center[:, ::-1]] if tta == "flip" else [center])
    crops = ten_crop(x, size)
    return crops[:5] if tta == "five" else crops


def normalize(x: np.ndarray, preprocessing, per_image: bool = False) -> np.ndarray:
    """Normalise [0, 1] images (..., H, W, C): ``(x - mean) / std`` with the weights'
    statistics, or with ``per_image`` the seed's ``0.5 + 0.5 * (x - x.mean()) / x.std()``
    over each image's pixels and channels."""
    x = np.asarray(x, np.float32)
    if per_image:
        axes = (-3, -2, -1)
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return (0.5 + 0.5 * (x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    mean = np.asarray(preprocessing.mean, np.float32)
    std = np.asarray(preprocessing.std, np.float32)
    if mean.size not in (1, x.shape[-1]) or std.size not in (1, x.shape[-1]):
        raise ValueError(f"the weights' normalisation has {mean.size} channels, the images {x.shape[-1]}")
    return (x - mean) / std


# ----------------------------------------------------------------------------- prediction

def batched_probabilities(model, variables, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probabilities (N, classes) of N inputs, in jit-compiled batches of one
    shape: ``min(batch_size, N)`` rows, the last batch padded with zeros."""
    import jax
    import jax.numpy as jnp

    n = len(inputs)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    b = min(batch_size, n)
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype(jnp.float32), axis=-1))
    out = []
    for start in range(0, n, b):
        chunk = inputs[start:start + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(apply(variables, jnp.asarray(chunk)))[:b - pad])
    return np.concatenate(out)


def average_views(probs: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Split (sum(counts), classes) rows by image and average each image's views."""
    bounds = np.cumsum([0, *counts])
    return [probs[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]


def topk_lines(scores: np.ndarray, classes: Sequence[str], k: int) -> list[str]:
    """``#1 0.8123 tabby`` lines, best first (ties in class order)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [f"#{rank} {float(scores[i]):.4f} {classes[i]}" for rank, i in enumerate(order, start=1)]


# ----------------------------------------------------------------------------- dense / heat map

def dense_input(image, preprocessing, channels: int, scales: Sequence[float], per_image: bool) -> np.ndarray:
    """A whole loaded image, shrunk (never enlarged) so that its short side is at most the
    largest scale's, as dense_predict's normalised (H, W, C) input (``per_image``: the
    seed's normalisation over the whole image)."""
    short = int(np.ceil(max(scales) * preprocessing.crop))
    if min(image.size) > short:
        image = resize_short(image, short, preprocessing.interpolation)
    return normalize(to_float(image, channels), preprocessing, per_image)


def _upsample(score_map: np.ndarray, stride: int, size: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """A (h', w') map computed on an image of ``size`` (H, W) -> an ``out`` (H', W') map.

    Cell i's window centre in the input is ``(H - (h' - 1) * stride) / 2 + i * stride``
    (right for both flatten heads, whose window is the input size, and average-pool
    heads, whose cells tile the map); between centres the map is interpolated linearly,
    beyond them held constant."""
    hs, ws = score_map.shape
    (h, w), (oh, ow) = size, out
    cy = ((h - (hs - 1) * stride) / 2 + np.arange(hs) * stride) * (oh / h)
    cx = ((w - (ws - 1) * stride) / 2 + np.arange(ws) * stride) * (ow / w)
    ys, xs = np.arange(oh) + 0.5, np.arange(ow) + 0.5
    rows = np.stack([np.interp(ys, cy, score_map[:, j]) for j in range(ws)], axis=1)   # (oh, ws)
    return np.stack([np.interp(xs, cx, rows[i]) for i in range(oh)])                    # (oh, ow)


def class_heat(prediction, class_index: int, stride: int, out: tuple[int, int]) -> np.ndarray:
    """The mean over scales of one class's probability map, on an ``out`` (H, W) grid."""
    maps = [_upsample(m[..., class_index], stride, size, out) for m, size in zip(prediction.maps, prediction.sizes)]
    return np.mean(maps, axis=0)


def _colormap(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a dark-blue, blue, cyan, yellow, red ramp."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colours = np.array([[0, 0, 96], [0, 64, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], np.float64)
    v = np.clip(v, 0.0, 1.0)
    rgb = np.stack([np.interp(v, stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def heatmap_png(image, prediction, classes: Sequence[str], indices: Sequence[int], stride: int):
    """A PIL image: for each class in ``indices`` a panel with that class's dense score map
    (colour, scaled to its own maximum) blended over the photo and a caption with the class
    name, its combined score and the map's maximum probability; panels side by side."""
    from PIL import Image, ImageDraw

    photo = image.convert("RGB")
    scale = min(1.0, MAX_HEATMAP_SIDE / max(photo.size))
    if max(photo.size) < MIN_HEATMAP_SIDE:
        scale = MIN_HEATMAP_SIDE / max(photo.size)
    if scale != 1.0:
        photo = photo.resize((max(1, round(photo.size[0] * scale)), max(1, round(photo.size[1] * scale))),
                             Image.BILINEAR)
    w, h = photo.size
    base = np.asarray(photo, np.float32)
    font_size = max(12, min(32, w // 24))
    caption_h = font_size + 12
    panels = []
    for c in indices:
        heat = class_heat(prediction, int(c), stride, (h, w))
        peak = float(heat.max())
        colour = _colormap(heat / peak if peak > 0 else heat).astype(np.float32)
        blended = (0.45 * base + 0.55 * colour).clip(0, 255).astype(np.uint8)
        panel = Image.new("RGB", (w, h + caption_h), (255, 255, 255))
        panel.paste(Image.fromarray(blended), (0, caption_h))
        text = f"{classes[c]}  score {prediction.scores[c]:.3f}  (map peak {peak:.2f})"
        ImageDraw.Draw(panel).text((6, 6), text, fill=(0, 0, 0), font=_font(font_size))
        panels.append(panel)
    sheet = Image.new("RGB", (w * len(panels) + 8 * (len(panels) - 1), h + caption_h), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (w + 8), 0))
    return sheet


def write_png(image, path: str, overwrite: bool = False) -> str:
    """Save ``image`` as PNG at ``path``; an existing file is refused (FileExistsError)
    unless ``overwrite``. The file is created exclusively, so two runs never clobber."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    with open(path, "wb" if overwrite else "xb") as f:
        image.save(f, format="PNG")
    return path


def heatmap_path(image_path: str, args) -> str:
    if args.heatmap_out:
        return args.heatmap_out
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(args.out_dir, f"{stem}.heatmap.png")


# ----------------------------------------------------------------------------- the command

def _error(path: str, e: Exception) -> None:
    message = str(e)
    if not message.startswith(path):
        message = f"{path}: {message}"
    print(f"jaxconv classify: error: {message}", file=sys.stderr)


def _check_usage(args) -> None:
    if args.heatmap_out and len(args.images) > 1:
        raise ValueError("--heatmap-out names one file: give one image, or use --out-dir")
    if (args.heatmap_out or args.heatmap_classes != 1) and not args.dense:
        raise ValueError("--heatmap-out and --heatmap-classes go with --dense")
    if args.dense and args.tta != "none":
        raise ValueError("--dense already averages each scale with its mirror image; leave --tta at none")
    if args.dense and not os.path.isdir(args.out_dir):
        raise FileNotFoundError(f"--out-dir {args.out_dir} is not a folder")
    if any(s <= 0 for s in args.scales):
        raise ValueError("--scales must be positive")


def run(args) -> int:
    from jaxconv.images import load_image
    from jaxconv.registry import model_info

    _check_usage(args)
    channels = model_info(args.model).input_size[2]
    model, variables, meta = resolve_weights(args.model, args.weights)
    pre, classes = meta["preprocessing"], meta["classes"]
    k = min(args.topk, len(classes))
    if args.dense:
        return _run_dense(args, model, variables, pre, classes, channels, k)

    # each image becomes its normalised views as soon as it is read (the photo is not kept)
    per_image, ok, failed = [], [], 0
    for path in args.images:
        try:
            image = load_image(path, channels)
            per_image.append(normalize(views(image, pre, channels, args.tta), pre, args.per_image_norm))
            ok.append(path)
        except (ValueError, OSError) as e:   # ImageError is a ValueError
            _error(path, e)
            failed += 1
    if per_image:
        probs = batched_probabilities(model, variables, np.concatenate(per_image), args.batch_size)
        for path, scores in zip(ok, average_views(probs, [len(v) for v in per_image])):
            print(path)
            print("\n".join(topk_lines(scores, classes, k)), flush=True)
    return 1 if failed else 0


def _run_dense(args, model, variables, pre, classes, channels: int, k: int) -> int:
    from jaxconv.convolutionize import convolutionize, dense_predict
    from jaxconv.images import load_image

    input_shape = (pre.crop, pre.crop, channels)
    fcn, fcn_variables = convolutionize(model, variables, input_shape)
    failed = 0
    for path in args.images:
        try:
            image = load_image(path, channels)
            x = dense_input(image, pre, channels, args.scales, args.per_image_norm)
            prediction = dense_predict(fcn, fcn_variables, x, input_shape, scales=tuple(args.scales),
                                       flip=True, reduce=args.reduce)
            order = np.argsort(-prediction.scores, kind="stable")[:args.heatmap_classes]
            sheet = heatmap_png(image, prediction, classes, order, fcn.stride)
            out = write_png(sheet, heatmap_path(path, args), args.overwrite)
        except (ValueError, OSError) as e:   # ImageError, FileExistsError, ...
            _error(path, e)
            failed += 1
            continue
        print(path)
        print("\n".join(topk_lines(prediction.scores, classes, k)))
        print(f"heat map: {out}", flush=True)
    return 1 if failed else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub) -> None:
    from jaxconv.convolutionize import OVERFEAT_SCALES

    p = sub.add_parser("classify", help="classify photos with pretrained weights (top-k, TTA, dense heat maps)",
                       description="Classify images with pretrained weights: the top-k classes of each, "
                                   "one line per class as '#k score class-name' (score: softmax probability).",
                       epilog="exit status: 0 all images classified, 1 some image failed, 2 usage error")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format and mode Pillow reads)")
    p.add_argument("--model", required=True, help="a registered model (jaxconv list)")
    p.add_argument("--weights", help="a torchvision tag (IMAGENET1K_V1), a .pth checkpoint or a .npz from "
                                     "jaxconv.save_variables; default: the model's default pretrained weights")
    p.add_argument("--topk", type=_positive, default=15, help="classes to print per image (default 15)")
    p.add_argument("--tta", choices=TTA, default="none",
                   help="average over: the center crop (none), it and its mirror (flip), 4 corner + center "
                        "crops (five), those and their mirrors (ten)")
    p.add_argument("--per-image-norm", action="store_true",
                   help="normalise each crop as 0.5 + 0.5*(x - x.mean())/x.std() instead of the weights' mean/std")
    p.add_argument("--batch-size", type=_positive, default=32, help="crops per jitted batch (default 32)")
    p.add_argument("--dense", action="store_true",
                   help="convolutionize the model and predict densely over scales and mirrors; writes a heat map PNG")
    p.add_argument("--scales", type=float, nargs="+", default=list(OVERFEAT_SCALES),
                   help="--dense: short side as multiples of the crop size (default: Overfeat's six)")
    p.add_argument("--reduce", choices=("max", "mean"), default="max",
                   help="--dense: pool each scale's map by its spatial max (default) or mean")
    p.add_argument("--heatmap-out", metavar="PATH", help="--dense with one image: the PNG's path")
    p.add_argument("--out-dir", default=".", help="--dense: folder for <image stem>.heatmap.png (default: .)")
    p.add_argument("--heatmap-classes", type=_positive, default=1,
                   help="--dense: panels for the top N classes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing heat map PNG")
    p.set_defaults(func=run)
