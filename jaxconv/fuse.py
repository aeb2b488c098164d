"""Fold inference-mode BatchNorm into the convolution before it.

``fuse_bn(model, variables)`` returns new variables for the *same* model in which every
``Conv2d -> BatchNorm2d`` pair computes ``conv(x, k * a) + c`` instead of
``(conv(x, k) + b - mean) * a + beta`` with ``a = gamma / sqrt(var + eps)``:

* the convolution's kernel is scaled per output channel: ``k * a`` (HWIO, the output
  channel is the last axis, for grouped and depthwise kernels too); a convolution bias
  becomes ``b * a``;
* the BatchNorm keeps only ``params/bias = beta - mean * a``; its ``scale`` and its
  ``batch_stats`` are removed, and :class:`jaxconv.layers.BatchNorm2d` with such
  variables adds the bias (and refuses ``train=True``).

The folding is computed in float64 and cast back to each variable's dtype. The pairs
are found by tracing the model once (``jax.eval_shape``, nothing is computed): a
BatchNorm is folded when its input is the output of a Conv2d that feeds nothing else
and each of them runs once per pass. So ResNet/ResNeXt, VGG-BN, GoogLeNet and
Inception-v3 (``BasicConv2d``) and EfficientNet fold completely (GoogLeNet's and
Inception-v3's auxiliary heads run only in train mode and keep their BatchNorms).
DenseNet is pre-activation (BatchNorm -> ReLU -> Conv): its stem ``conv0 -> norm0`` and
each layer's bottleneck ``conv1 -> norm2`` fold (59 of densenet121's 121 BatchNorms);
``norm1`` (on the concatenated features), the transitions' ``norm`` and ``norm5``
follow no convolution and stay as they are.
Variables that are already folded are returned unchanged (the transform is idempotent).
The input variables are never modified.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxconv.layers import BatchNorm2d, Conv2d


def conv_bn_pairs(model: nn.Module, variables: Any, sample_shape=(1, 224, 224, 3)):
    """``[(conv_path, bn_path, eps), ...]``: the foldable Conv2d -> BatchNorm2d pairs of
    ``model``, found by tracing ``model.apply(variables, zeros(sample_shape))`` in eval
    mode. Paths are tuples of submodule names (``('layer1_0', 'conv1')``)."""
    conv_out: dict[int, tuple] = {}     # id(output array) -> conv path
    consumers: dict[int, int] = {}      # id(array) -> how many module calls took it as input
    calls: dict[tuple, int] = {}
    candidates = []
    keep = []                           # keeps traced arrays alive so that ids stay unique

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        x = args[0]
        keep.append(x)
        consumers[id(x)] = consumers.get(id(x), 0) + 1
        path = tuple(module.path)
        out = next_fun(*args, **kwargs)
        if isinstance(module, (Conv2d, BatchNorm2d)):
            calls[path] = calls.get(path, 0) + 1
        if isinstance(module, Conv2d):
            keep.append(out)
            conv_out[id(out)] = path
        elif isinstance(module, BatchNorm2d) and id(x) in conv_out:
            candidates.append((conv_out[id(x)], path, float(module.eps), id(x)))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros(sample_shape, jnp.float32)), variables)
    return [(conv, bn, eps) for conv, bn, eps, key in candidates
            if consumers[key] == 1 and calls[conv] == 1 and calls[bn] == 1]


def _copy_dicts(tree):
    """A copy of the nested dicts (leaves shared: arrays are immutable)."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _node(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _prune(tree, path):
    """Delete the dict at ``path`` and any parent left empty."""
    parents = [tree]
    for part in path[:-1]:
        parents.append(parents[-1][part])
    del parents[-1][path[-1]]
    for parent, part in zip(reversed(parents[:-1]), reversed(path[:-1])):
        if parent[part]:
            break
        del parent[part]


def fuse_bn(model: nn.Module, variables: Any, sample_shape=(1, 224, 224, 3)) -> dict:
    """New variables for ``model`` with every foldable BatchNorm folded into the
    convolution before it (inference only; see the module docstring). ``sample_shape``
    is any NHWC input shape the model accepts (e.g. ``(1, 28, 28, 1)`` for LeNet5),
    used to trace the model once; the variables work at every input size."""
    pairs = conv_bn_pairs(model, variables, sample_shape)
    params = variables["params"]
    pairs = [p for p in pairs if "scale" in _node(params, p[1])]   # already folded: skip
    new = _copy_dicts(dict(variables))
    for conv_path, bn_path, eps in pairs:
        conv, bn = _node(new["params"], conv_path), _node(new["params"], bn_path)
        stats = _node(new["batch_stats"], bn_path)
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        alpha = f64(bn["scale"]) / np.sqrt(f64(stats["var"]) + eps)
        conv["kernel"] = jnp.asarray(f64(conv["kernel"]) * alpha, conv["kernel"].dtype)
        if "bias" in conv:
            conv["bias"] = jnp.asarray(f64(conv["bias"]) * alpha, conv["bias"].dtype)
        bias = f64(bn["bias"]) - f64(stats["mean"]) * alpha
        _node(new["params"], bn_path[:-1])[bn_path[-1]] = {"bias": jnp.asarray(bias, bn["bias"].dtype)}
        _prune(new["batch_stats"], bn_path)
    if "batch_stats" in new and not new["batch_stats"]:
        del new["batch_stats"]
    return new
