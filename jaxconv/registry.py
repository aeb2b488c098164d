"""Model registry: name -> builder, torchvision name, default input size, preprocessing.

Each family file in ``jaxconv/models`` declares its variants in a ``MODELS`` table
(``name -> ModelInfo``); this module gathers them from every module of that package. Names are torchvision's wherever
torchvision has the model.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping

@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect: resize the short side, center-crop, normalise [0, 1] RGB."""
    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


IMAGENET = Preprocessing()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[..., nn.Module]
    mapping: TorchMapping
    input_size: tuple[int, int, int] = (224, 224, 3)   # (H, W, C)
    num_classes: int = 1000
    torchvision: str | None = None                       # torchvision's builder name, if any
    preprocessing: Preprocessing = field(default=IMAGENET)
    # model options that torchvision's published weights are built with and that a
    # loader of those weights must pass to get_model (googlenet and inception_v3:
    # transform_input=True, which torchvision's builders switch on for their weights)
    weights_options: dict[str, Any] = field(default_factory=dict)


@functools.cache
def _models() -> dict[str, ModelInfo]:
    import jaxconv.models

    table: dict[str, ModelInfo] = {}
    for family in sorted(m.name for m in pkgutil.iter_modules(jaxconv.models.__path__)):
        module = importlib.import_module(f"jaxconv.models.{family}")
        for name, info in getattr(module, "MODELS", {}).items():
            if name in table:
                raise RuntimeError(f"model '{name}' registered twice")
            table[name] = info
    return table


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_models())


def model_info(name: str) -> ModelInfo:
    try:
        return _models()[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see jaxconv.list_models()"
        raise KeyError(f"unknown model '{name}'{hint}") from None


def _options(build: Callable) -> list[str]:
    cls = build.func if hasattr(build, "func") else build
    fixed = set(getattr(build, "keywords", {}) or {})
    if inspect.isclass(cls) and issubclass(cls, nn.Module):
        return [f.name for f in fields(cls) if f.init and f.name not in ("parent", "name") and f.name not in fixed]
    return [p for p in inspect.signature(cls).parameters if p not in fixed]


def get_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """A ``flax.linen`` module for ``name``.

    ``num_classes`` defaults to the model's own (1000 for ImageNet models, 10 for
    lenet5). ``overrides`` set the model's fields, e.g. ``dtype=jnp.bfloat16`` for mixed
    precision or ``dtype=jnp.float64, param_dtype=jnp.float64`` (under jax_enable_x64)
    for the exact parity check; an unknown field raises an error listing the valid ones.
    """
    info = model_info(name)
    options = _options(info.build)
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise TypeError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                        f"options: {', '.join(o for o in options if o != 'num_classes')}")
    return info.build(num_classes=num_classes or info.num_classes, **overrides)
