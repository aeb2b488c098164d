"""torch checkpoints -> flax variables: a torch-free ``.pth`` reader and a strict mapping."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jaxconv.convert.mapping import MappingError, TorchMapping, convert_state_dict, default_torch_name
from jaxconv.convert.pth import PthError, read_pth

__all__ = ["MappingError", "PthError", "TorchMapping", "convert_state_dict", "default_torch_name",
           "from_torchvision", "read_pth", "state_dict_as_numpy"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _as_numpy(value, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    if hasattr(value, "__array__") and hasattr(value, "shape"):
        return np.asarray(value)
    raise TypeError(f"weights entry '{key}' is a {type(value).__name__}, not a tensor or array")


def state_dict_as_numpy(source: Any) -> dict[str, np.ndarray]:
    """A flat ``{torch key: numpy array}`` from a path to a ``.pth`` file, a torch
    state_dict or a dict of numpy arrays. A checkpoint that wraps its state_dict under
    'state_dict' / 'model' / 'model_state_dict' is unwrapped, and DataParallel's
    'module.' prefix is removed when every key has it."""
    if isinstance(source, (str, os.PathLike)):
        source = read_pth(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"weights must be a path, a torch state_dict or a dict of arrays, "
                        f"got {type(source).__name__}")
    if not any(hasattr(v, "shape") for v in source.values()):
        inner = [k for k in _WRAPPER_KEYS if isinstance(source.get(k), Mapping)]
        if len(inner) == 1:
            source = source[inner[0]]
    flat = {str(k): _as_numpy(v, str(k)) for k, v in source.items()}
    if flat and all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat


def from_torchvision(name: str, source: Any, **overrides) -> dict[str, Any]:
    """Variables ``{'params': ..., 'batch_stats': ...}`` for ``get_model(name, ...)`` from
    torch weights: a path to a ``.pth`` file, a torch state_dict, or a dict of numpy arrays.

    The number of classes is read from the weights' head unless ``num_classes`` is given;
    other ``overrides`` are passed to the model (they must not change its parameters'
    shapes). Arrays keep the weights' dtype (float64 weights give float64 variables).
    Raises :class:`MappingError` listing every missing, unexpected and mis-shaped key.
    """
    import jax

    from jaxconv.registry import get_model, model_info

    info = model_info(name)
    state_dict = state_dict_as_numpy(source)
    if overrides.get("num_classes") is None:
        head = info.mapping.head_key()
        if info.mapping.rename_source is not None:
            state_dict_keys = {info.mapping.rename_source(k): k for k in state_dict}
            head = state_dict_keys.get(head, head)
        if head in state_dict and state_dict[head].ndim == 2:
            overrides["num_classes"] = int(state_dict[head].shape[0])
    model = get_model(name, **overrides)
    h, w, c = info.input_size
    c = getattr(model, "in_channels", c)  # e.g. a CIFAR ResNet built for 1-channel input
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, h, w, c), np.float32)))
    return convert_state_dict(state_dict, target, info.mapping, model_name=name)
