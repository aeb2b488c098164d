"""``convolutionize``: the pure dense -> convolution rewrite, for dense (Overfeat) prediction.

Every jaxconv classifier computes ``classifier(pool(feature_map(x)))``: a convolutional
trunk, a pooling step, then a head of Linear layers and parameter-free layers (ReLU,
Dropout, ...). :func:`convolutionize` traces the model once at ``input_shape``, reads
which head it has, and returns a new ``(model, variables)`` pair that slides the head
over the trunk's map:

* a *flatten* head (LeNet5, AlexNet, VGG): the first Linear reads the whole (h, w, C)
  map at ``input_shape`` and becomes an h x w convolution (AlexNet fc6: 6x6x256 -> 4096;
  VGG fc6: 7x7x512 -> 4096; LeNet5: 4x4x16 -> 120); the adaptive average pool, the
  identity at the native size, is dropped so that a larger input slides the whole head;
* a *global-average-pool* head (ResNet, DenseNet, GoogLeNet, Inception, EfficientNet):
  the map is kept and the Linear becomes a 1x1 convolution applied before the averaging
  (if the last layer is linear, the averaging can be done first or last);
* a head that is already convolutional (NiN): the class maps are the trunk's output.

Later Linears become 1x1 convolutions; dropout and activations stay as they are.
``average=True`` gives the averaged form (the mean over the map, as (N, 1, 1, classes)).
The variables passed in are never modified; the trunk's arrays are shared, the head's
kernels are new arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxconv import layers

_PARAMETER_FREE = (layers.ReLU, layers.Dropout, layers.Flatten)


def _parameter_free_layers() -> tuple[type, ...]:
    """Layers a head may contain that act per position (activations and dropout)."""
    extra = tuple(getattr(layers, n) for n in ("ReLU6", "SiLU", "Sigmoid") if hasattr(layers, n))
    return _PARAMETER_FREE + extra


class ConvolutionizeError(ValueError):
    """The model's head cannot be rewritten as convolutions; the message says why."""


@dataclass(frozen=True)
class HeadConv:
    """A Linear of the head, as a convolution of ``kernel_size`` with ``features`` outputs."""
    features: int
    kernel_size: tuple[int, int]
    use_bias: bool


class FullyConvolutional(nn.Module):
    """A classifier's trunk followed by its head as convolutions: class-score maps.

    ``backbone`` is the original model (its variables live under ``backbone``);
    ``head`` the rewritten head (``HeadConv`` entries become ``head_i`` convolutions,
    other entries are the original parameter-free layers). ``stride`` is the trunk's
    total stride: one step in the output map is ``stride`` input pixels.
    """
    backbone: nn.Module
    head: Sequence[Any]
    map_method: str = "features"
    average: bool = False
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = getattr(self.backbone, self.map_method)(x, train)
        dtype = getattr(self.backbone, "dtype", jnp.float32)
        param_dtype = getattr(self.backbone, "param_dtype", jnp.float32)
        for i, step in enumerate(self.head):
            if isinstance(step, HeadConv):
                if x.shape[1] < step.kernel_size[0] or x.shape[2] < step.kernel_size[1]:
                    raise ValueError(f"the input gives a {x.shape[1]}x{x.shape[2]} map, smaller than "
                                     f"the {step.kernel_size[0]}x{step.kernel_size[1]} head: use an "
                                     f"input at least as large as the convolutionized input_shape")
                x = layers.Conv2d(step.features, step.kernel_size, use_bias=step.use_bias, dtype=dtype,
                                  param_dtype=param_dtype, name=f"head_{i}")(x)
            else:
                x = step(x, train=train)
        if self.average:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x


def _trace(model: nn.Module, input_shape: tuple[int, int, int], map_method: str):
    """Abstractly run the model: the map's shape, the head's input shape and the head's
    layers, in order."""
    record: dict[str, Any] = {"head": []}
    depth = {"classifier": 0}

    def interceptor(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        is_root = not isinstance(module.parent, nn.Module)
        if is_root and method == "classifier":
            record["head_in"] = tuple(args[0].shape)
            depth["classifier"] += 1
        try:
            out = next_fun(*args, **kwargs)
        finally:
            if is_root and method == "classifier":
                depth["classifier"] -= 1
        if is_root and method == map_method:
            record.setdefault("map", tuple(out.shape))
        if depth["classifier"] and method == "__call__" and not is_root and hasattr(module, "torch_repr"):
            if isinstance(module.parent, nn.Module) and not isinstance(module.parent.parent, nn.Module):
                record["head"].append((tuple(module.path), module, tuple(args[0].shape)))
        return out

    def run():
        x = jnp.zeros((1, *input_shape), jnp.float32)
        variables = model.init(jax.random.key(0), x)
        if "map" not in record:  # __call__ did not go through the map method
            model.apply(variables, x, method=map_method)
        return variables

    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(run)
    if "map" not in record or "head_in" not in record:
        raise ConvolutionizeError(f"{type(model).__name__} has no '{map_method}' / 'classifier' methods "
                                  f"to split into trunk and head")
    return record, shapes


def _stride(model, shapes, input_shape, map_method, map_height: int) -> int:
    """The trunk's total stride, measured: input pixels per step of the map (``map_height``
    is the map's height at ``input_shape``)."""
    h, w, c = input_shape
    grow = 128
    x = jnp.zeros((1, h + grow, w, c), jnp.float32)
    large = jax.eval_shape(lambda v: model.apply(v, x, method=map_method), shapes).shape[1]
    return 1 if large == map_height else int(round(grow / (large - map_height)))


def convolutionize(model: nn.Module, variables: Any, input_shape: tuple[int, int, int],
                   average: bool = False) -> tuple[FullyConvolutional, dict]:
    """Rewrite ``model``'s dense head as convolutions, for inputs of at least ``input_shape``.

    Returns ``(fcn_model, fcn_variables)``: ``fcn_model.apply(fcn_variables, x)`` gives
    class-score maps ``(N, h', w', classes)``; at ``input_shape`` the map is 1x1 (flatten
    heads) or the trunk's map (average-pool heads, whose mean is the logits). With
    ``average=True`` the map is averaged: ``(N, 1, 1, classes)``. ``variables`` are left
    untouched. Raises :class:`ConvolutionizeError` naming what cannot be rewritten.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
    map_method = "feature_map" if hasattr(model, "feature_map") else "features"
    record, shapes = _trace(model, input_shape, map_method)
    _, mh, mw, mc = record["map"]
    head_in = record["head_in"]
    allowed = _parameter_free_layers()
    params = variables["params"]

    steps: list[Any] = []
    new_params: dict[str, Any] = {}
    drop: set[str] = set()
    seen_linear = False
    if len(head_in) == 4:  # the head pools the map itself (NiN): already convolutional
        if record["head"]:
            names = ", ".join("/".join(p) for p, _, _ in record["head"])
            raise ConvolutionizeError(f"cannot rewrite a head with layers ({names}) that act on the map")
    else:
        features_in = head_in[1]
        if features_in == mc:
            kind = "average"
        elif features_in == mh * mw * mc:
            kind = "flatten"
        else:
            raise ConvolutionizeError(
                f"the head reads {features_in} features but the trunk gives a {mh}x{mw}x{mc} map at "
                f"input_shape {input_shape}: the pooling between them is not the identity there; "
                f"convolutionize at the size the classifier was built for")
        for path, module, in_shape in record["head"]:
            name = "/".join(path)
            if isinstance(module, layers.Linear):
                # jnp (not np) so that convolutionize also runs on abstract variables (jax.eval_shape)
                kernel = _get(params, path)["kernel"]
                if not seen_linear and kind == "flatten":
                    kernel = jnp.reshape(kernel, (mh, mw, mc, kernel.shape[-1]))
                    size = (mh, mw)
                else:
                    kernel = jnp.reshape(kernel, (1, 1, *kernel.shape))
                    size = (1, 1)
                index = len(steps)
                steps.append(HeadConv(module.features, size, module.use_bias))
                new_params[f"head_{index}"] = {"kernel": kernel}
                if module.use_bias:
                    new_params[f"head_{index}"]["bias"] = jnp.asarray(_get(params, path)["bias"])
                drop.add(path[0])
                seen_linear = True
            elif isinstance(module, layers.Flatten):
                continue
            elif isinstance(module, allowed):
                steps.append(module.clone(parent=None, name=None))
            else:
                raise ConvolutionizeError(f"cannot rewrite {type(module).__name__} ({name}) in the head of "
                                          f"{type(model).__name__}: only Linear, activation and dropout "
                                          f"layers can slide over a map")
        if not seen_linear:
            raise ConvolutionizeError(f"the head of {type(model).__name__} has no Linear layer to rewrite")
    backbone_params = {k: v for k, v in params.items() if k not in drop}
    fcn_variables = {k: v for k, v in variables.items() if k != "params"}
    fcn_variables = {k: {"backbone": v} for k, v in fcn_variables.items()}
    fcn_variables["params"] = {"backbone": backbone_params, **new_params}
    fcn = FullyConvolutional(backbone=model, head=tuple(steps), map_method=map_method, average=average,
                             stride=_stride(model, shapes, input_shape, map_method, mh))
    return fcn, fcn_variables


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- dense evaluation

OVERFEAT_SCALES = (1.0, 1.15, 1.3, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class DensePrediction:
    """Overfeat-style dense prediction of one image.

    maps: per scale, the (h', w', classes) map of class probabilities (softmax at each
        position), averaged with the horizontally flipped pass when ``flip`` was on.
    per_scale: per scale, the (classes,) spatial max (or mean) of its map.
    scores: (classes,) the mean of ``per_scale`` over the scales: the prediction.
    """
    sizes: tuple[tuple[int, int], ...]
    maps: tuple[np.ndarray, ...]
    per_scale: np.ndarray
    scores: np.ndarray

    def topk(self, k: int = 5) -> list[tuple[int, float]]:
        order = np.argsort(-self.scores)[:k]
        return [(int(i), float(self.scores[i])) for i in order]


@partial(jax.jit, static_argnums=0)
def _class_probabilities(fcn_model, fcn_variables, x):
    """Softmax class maps; jitted once per (model, input shape), reused across images."""
    return jax.nn.softmax(fcn_model.apply(fcn_variables, x).astype(jnp.float32), axis=-1)


def dense_predict(fcn_model: FullyConvolutional, fcn_variables: Any, image, input_shape,
                  scales: Sequence[float] = OVERFEAT_SCALES, flip: bool = True,
                  reduce: str = "max") -> DensePrediction:
    """Dense prediction over several scales and their horizontal flips.

    ``image`` is one preprocessed (normalised) image ``(H, W, C)``; at scale ``s`` it is
    resized (bilinear, antialiased) so that its short side is ``s`` times the short side
    of ``input_shape`` (never smaller than ``input_shape``), and the convolutionized model
    gives a class map there. ``reduce`` ('max' or 'mean') pools each scale's map into
    class scores; the prediction is their mean over the scales.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"dense_predict takes one (H, W, C) image, got shape {image.shape}")
    h0, w0 = int(input_shape[0]), int(input_shape[1])
    short = min(image.shape[:2])
    sizes, maps, per_scale = [], [], []
    for s in scales:
        factor = s * min(h0, w0) / short
        h = max(h0, int(round(image.shape[0] * factor)))
        w = max(w0, int(round(image.shape[1] * factor)))
        x = jax.image.resize(jnp.asarray(image), (h, w, image.shape[2]), "linear", antialias=True)[None]
        batch = jnp.concatenate([x, x[:, :, ::-1]]) if flip else x
        probs = np.asarray(_class_probabilities(fcn_model, fcn_variables, batch))
        class_map = (probs[0] + probs[1][:, ::-1]) / 2 if flip else probs[0]
        sizes.append((h, w))
        maps.append(class_map)
        per_scale.append(class_map.max(axis=(0, 1)) if reduce == "max" else class_map.mean(axis=(0, 1)))
    per_scale_arr = np.stack(per_scale)
    return DensePrediction(tuple(sizes), tuple(maps), per_scale_arr, per_scale_arr.mean(axis=0))
