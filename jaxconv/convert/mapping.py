"""Strict mapping of torch state_dict keys and layouts onto jaxconv variables.

Every model names its submodules after torchvision's module paths (``features_0`` is
``features.0``, ``layer1_0/downsample_0`` is ``layer1.0.downsample.0``), so a family's
mapping is a small table (:class:`TorchMapping`) beside its model: how a jaxconv module
path spells in torch (the default turns a trailing ``_N`` into ``.N``), which Linear
layers read torch's (C, H, W) flatten, and which layer is the head. The leaves follow
from the kind of layer found in the model's own variables:

============  ====================================  ==================================
layer          torch key                             jaxconv leaf
============  ====================================  ==================================
Conv2d         weight (O, I/groups, kh, kw)          params/kernel (kh, kw, I/groups, O)
               bias                                  params/bias
Linear         weight (out, in)                      params/kernel (in, out) = weight.T
Linear after   weight (out, C*H*W)                   params/kernel (H*W*C, out): rows
a flatten                                            permuted from torch's CHW order
BatchNorm2d    weight, bias                          params/scale, params/bias
               running_mean, running_var             batch_stats/mean, batch_stats/var
               num_batches_tracked                   (read and dropped)
============  ====================================  ==================================

The conversion is strict: every source key is consumed exactly once, every target leaf
assigned exactly once, every shape checked; otherwise one :class:`MappingError` lists
the missing keys, the unexpected keys and the shape mismatches, in model order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np


class MappingError(ValueError):
    """Weights that do not fit the model: missing, unexpected or mis-shaped keys."""


def default_torch_name(path: tuple[str, ...]) -> str:
    """``('layer1_0', 'downsample_0')`` -> ``'layer1.0.downsample.0'``."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


@dataclass(frozen=True)
class TorchMapping:
    """How one family's jaxconv modules correspond to torch's state_dict keys.

    flatten_linears: jaxconv module path ('/'-joined) -> (C, H, W) of the map that torch
        flattens before that Linear.
    head: the jaxconv module path of the final classifier layer (its output size is the
        number of classes, read from the weights when not given).
    torch_name: jaxconv module path tuple -> torch key prefix.
    rename_source: normalises a source key first (e.g. an older checkpoint spelling).
    """
    head: str
    flatten_linears: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    torch_name: Callable[[tuple[str, ...]], str] = default_torch_name
    rename_source: Callable[[str], str] | None = None

    def head_key(self) -> str:
        return self.torch_name(tuple(self.head.split("/"))) + ".weight"


# ----------------------------------------------------------------------------- leaf rules

@dataclass(frozen=True)
class _Rule:
    torch_key: str
    target: tuple[str, ...]           # (collection, *module path, leaf)
    to_jax: Callable[[np.ndarray], np.ndarray]
    torch_shape: tuple[int, ...]      # what the source must hold


def _conv_kernel(w):
    return np.transpose(w, (2, 3, 1, 0))


def _linear_kernel(w):
    return np.transpose(w, (1, 0))


def _flatten_linear_kernel(chw):
    c, h, w_ = chw

    def to_jax(w):
        out = w.shape[0]
        return np.transpose(w.reshape(out, c, h, w_), (2, 3, 1, 0)).reshape(h * w_ * c, out)

    return to_jax


def _identity(w):
    return w


def _module_rules(module_path: tuple[str, ...], params: Mapping, stats: Mapping | None,
                  mapping: TorchMapping) -> list[_Rule]:
    prefix = mapping.torch_name(module_path) + "."
    p = lambda leaf: ("params", *module_path, leaf)  # noqa: E731
    s = lambda leaf: ("batch_stats", *module_path, leaf)  # noqa: E731
    rules = []
    if "scale" in params:  # BatchNorm
        rules += [_Rule(prefix + "weight", p("scale"), _identity, tuple(params["scale"].shape)),
                  _Rule(prefix + "bias", p("bias"), _identity, tuple(params["bias"].shape))]
        if stats is not None:
            rules += [_Rule(prefix + "running_mean", s("mean"), _identity, tuple(stats["mean"].shape)),
                      _Rule(prefix + "running_var", s("var"), _identity, tuple(stats["var"].shape))]
        unknown = set(params) - {"scale", "bias"}
    elif "kernel" in params:
        shape = tuple(params["kernel"].shape)
        if len(shape) == 4:
            kh, kw, i, o = shape
            rules.append(_Rule(prefix + "weight", p("kernel"), _conv_kernel, (o, i, kh, kw)))
        elif len(shape) == 2:
            chw = mapping.flatten_linears.get("/".join(module_path))
            if chw is not None:
                if shape[0] != int(np.prod(chw)):
                    raise MappingError(f"{'/'.join(module_path)}: flatten table says {chw} but the "
                                       f"model's kernel has {shape[0]} inputs")
                rules.append(_Rule(prefix + "weight", p("kernel"), _flatten_linear_kernel(chw),
                                   (shape[1], shape[0])))
            else:
                rules.append(_Rule(prefix + "weight", p("kernel"), _linear_kernel, (shape[1], shape[0])))
        else:
            raise MappingError(f"{'/'.join(module_path)}: no rule for a {len(shape)}-d kernel")
        if "bias" in params:
            rules.append(_Rule(prefix + "bias", p("bias"), _identity, tuple(params["bias"].shape)))
        unknown = set(params) - {"kernel", "bias"}
    else:
        unknown = set(params)
    if unknown:
        raise MappingError(f"{'/'.join(module_path)}: no torch rule for parameters {sorted(unknown)}")
    return rules


def _is_leaf(x) -> bool:
    return hasattr(x, "shape") and not isinstance(x, Mapping)


def _modules(tree: Mapping, path=()):
    """(module path, {leaf: array}) for every module that owns leaves, in tree order."""
    leaves = {k: v for k, v in tree.items() if _is_leaf(v)}
    if leaves:
        yield path, leaves
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _modules(v, path + (k,))


def rules_for(target: Mapping, mapping: TorchMapping) -> list[_Rule]:
    """The leaf rules for a model whose variables (or their shapes) are ``target``."""
    stats_tree = target.get("batch_stats", {})
    rules = []
    for path, params in _modules(target.get("params", {})):
        stats = stats_tree
        for part in path:
            stats = stats.get(part, {}) if isinstance(stats, Mapping) else {}
        rules += _module_rules(path, params, stats if stats else None, mapping)
    covered = {r.target for r in rules}
    for collection in target:
        if collection == "params":
            continue
        for path, leaves in _modules(target[collection]):
            for leaf in leaves:
                if (collection, *path, leaf) not in covered:
                    raise MappingError(f"no torch rule for {collection}/{'/'.join(path)}/{leaf}")
    return rules


def _short_list(items: list[str], limit: int = 8) -> str:
    text = ", ".join(items[:limit])
    return text + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], target: Mapping, mapping: TorchMapping,
                       model_name: str = "the model") -> dict[str, Any]:
    """Map a torch state_dict (numpy arrays) onto variables shaped like ``target``.

    ``target`` is the model's variables or their shapes (``jax.eval_shape`` of init).
    Returns nested dicts of numpy arrays in the source's dtype.
    """
    if mapping.rename_source is not None:
        renamed: dict[str, np.ndarray] = {}
        for key, value in state_dict.items():
            new = mapping.rename_source(key)
            if new in renamed:
                raise MappingError(f"two source keys map to '{new}' (one is '{key}')")
            renamed[new] = value
        state_dict = renamed
    rules = rules_for(target, mapping)
    missing, mismatched, consumed = [], [], set()
    out: dict[str, Any] = {}
    for rule in rules:
        if rule.torch_key not in state_dict:
            missing.append(rule.torch_key)
            continue
        consumed.add(rule.torch_key)
        value = np.asarray(state_dict[rule.torch_key])
        if value.shape != rule.torch_shape:
            mismatched.append(f"{rule.torch_key}: file has {value.shape}, {model_name} expects "
                              f"{rule.torch_shape}")
            continue
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            mismatched.append(f"{rule.torch_key}: file has dtype {value.dtype}, expected a float tensor")
            continue
        node = out
        for part in rule.target[:-1]:
            node = node.setdefault(part, {})
        node[rule.target[-1]] = np.ascontiguousarray(rule.to_jax(value))
    dropped = {k for k in state_dict if k.endswith(".num_batches_tracked")
               and k[: -len("num_batches_tracked")] + "running_mean" in consumed}
    unexpected = [k for k in state_dict if k not in consumed and k not in dropped]
    if missing or unexpected or mismatched:
        lines = [f"cannot load these weights into {model_name}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatches"]
        if missing:
            lines.append(f"  missing keys (needed by {model_name}, absent from the weights): "
                         f"{_short_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys (in the weights, unused by {model_name}): "
                         f"{_short_list(unexpected)}")
        if mismatched:
            lines.append("  shape mismatches: " + _short_list(mismatched, 5))
        raise MappingError("\n".join(lines))
    return out
