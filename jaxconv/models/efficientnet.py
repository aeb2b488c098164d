"""EfficientNet (Tan & Le 2019), EfficientNetV2 (Tan & Le 2021) and EfficientNet-Lite.

torchvision's EfficientNet: ``features.0`` = Conv(3x3, s2) BN SiLU (the stem);
``features.1`` ... ``features.S`` = the stages, each a sequence of blocks; ``features.S+1``
= Conv(1x1) BN SiLU (the head); ``avgpool`` = AdaptiveAvgPool2d(1); ``classifier`` =
Dropout, Linear.

* MBConv (``features.s.b``): ``block.0`` = expand Conv(1x1) BN SiLU (absent when the
  expand ratio is 1), then depthwise Conv(k, stride, groups=C) BN SiLU, then
  squeeze-excitation (1x1 convs ``fc1``/``fc2`` with bias, SiLU inside, squeeze width
  = block input channels // 4), then project Conv(1x1) BN; the residual (stride 1,
  same channels) passes the branch through ``stochastic_depth`` first, whose drop
  probability grows linearly with the block's index: ``p * i / total``.
* FusedMBConv (V2's first stages): ``block.0`` = Conv(k, stride) BN SiLU that also
  expands, ``block.1`` = project Conv(1x1) BN (one Conv(k) BN SiLU when the ratio is 1).
* Compound scaling: from B0's table, a width multiplier rounds every channel count to
  a multiple of 8 (never more than 10 % down, torchvision's ``_make_divisible``) and a
  depth multiplier takes ``ceil(repeats * depth)`` per stage; the head has 4x the last
  stage's channels (V2: 1280).
* BatchNorm: torch's defaults (eps 1e-5, momentum 0.1) for B0-B4; eps 1e-3 and torch
  momentum 0.01 for B5-B7; eps 1e-3 with momentum 0.1 for V2.
* EfficientNet-Lite (Google's TF release for mobile): ReLU6, no squeeze-excitation,
  stem (32) and head (1280) not scaled, nor the repeats of the first and last stage;
  BatchNorm eps 1e-3 (TF momentum 0.99); TensorFlow's SAME padding everywhere, because
  the weights were trained in TensorFlow (it pads (0, 1) where torch pads (1, 1) for a
  3x3 kernel at stride 2 on an even input). Module names are those of torchvision's
  EfficientNet; the released checkpoints' ``_conv_stem``, ``_blocks.N._expand_conv``, ...
  spelling is renamed on import.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Linear, ReLU6, SiLU,
                            SqueezeExcitation, StochasticDepth, add_sequence, check_nhwc,
                            kaiming_normal_fan_out, run_sequence)
from jaxconv.registry import ModelInfo, Preprocessing

ACTIVATIONS = {"silu": SiLU, "relu6": ReLU6}


# ----------------------------------------------------------------------------- scaling

def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), going up one step if that lost more than 10 %."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class Scaling(NamedTuple):
    depth: float
    width: float
    resolution: float


def compound_scaling(phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15) -> Scaling:
    """The compound scaling rule of Tan & Le (2019): depth ``alpha**phi``, width
    ``beta**phi`` and resolution ``gamma**phi`` multipliers (``alpha * beta**2 * gamma**2
    ~ 2``, so each step of ``phi`` about doubles the FLOPs). The published B1-B7 use
    hand-rounded coefficients (:data:`COEFFICIENTS`); either kind goes to
    :func:`scale_stages`."""
    return Scaling(alpha ** phi, beta ** phi, gamma ** phi)


@dataclass(frozen=True)
class Stage:
    """One row of Table 1 (EfficientNet) / Table 4 (V2): ``num_layers`` blocks, the
    first with ``stride`` and ``input_channels``, all with ``out_channels``."""
    block: str            # 'mbconv' or 'fused'
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def scale_stages(stages: Sequence[Stage], width: float = 1.0, depth: float = 1.0,
                 fixed_depth: Sequence[int] = ()) -> tuple[Stage, ...]:
    """Channels ``make_divisible(c * width, 8)`` and repeats ``ceil(n * depth)``, as
    torchvision's ``MBConvConfig`` does; ``fixed_depth`` lists stages whose repeats stay
    (EfficientNet-Lite's first and last). FusedMBConv stages are never scaled (V2 is not
    compound-scaled), as in torchvision."""
    out = []
    for i, s in enumerate(stages):
        if s.block == "fused":
            out.append(s)
            continue
        out.append(replace(s, input_channels=make_divisible(s.input_channels * width),
                           out_channels=make_divisible(s.out_channels * width),
                           num_layers=s.num_layers if i in fixed_depth else int(math.ceil(s.num_layers * depth))))
    return tuple(out)


def _table(block: str, rows) -> tuple[Stage, ...]:
    return tuple(Stage(block if isinstance(r[0], (int, float)) else r[0], *r[-6:]) for r in rows)


# (expand ratio, kernel, stride, input channels, output channels, repeats)
B0_STAGES = _table("mbconv", [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
])
V2_S_STAGES = _table("mbconv", [
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mbconv", 4, 3, 2, 64, 128, 6),
    ("mbconv", 6, 3, 1, 128, 160, 9),
    ("mbconv", 6, 3, 2, 160, 256, 15),
])
V2_M_STAGES = _table("mbconv", [
    ("fused", 1, 3, 1, 24, 24, 3),
    ("fused", 4, 3, 2, 24, 48, 5),
    ("fused", 4, 3, 2, 48, 80, 5),
    ("mbconv", 4, 3, 2, 80, 160, 7),
    ("mbconv", 6, 3, 1, 160, 176, 14),
    ("mbconv", 6, 3, 2, 176, 304, 18),
    ("mbconv", 6, 3, 1, 304, 512, 5),
])
V2_L_STAGES = _table("mbconv", [
    ("fused", 1, 3, 1, 32, 32, 4),
    ("fused", 4, 3, 2, 32, 64, 7),
    ("fused", 4, 3, 2, 64, 96, 7),
    ("mbconv", 4, 3, 2, 96, 192, 10),
    ("mbconv", 6, 3, 1, 192, 224, 19),
    ("mbconv", 6, 3, 2, 224, 384, 25),
    ("mbconv", 6, 3, 1, 384, 640, 7),
])

# name: (width, depth, resolution, dropout), the published coefficients
COEFFICIENTS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5),
}
LITE_COEFFICIENTS = {
    "lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2), "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3), "lite4": (1.4, 1.8, 300, 0.3),
}


# ----------------------------------------------------------------------------- blocks

class _Block(nn.Module):
    in_channels: int
    out_channels: int
    expand_ratio: float
    kernel: int
    stride: int
    stochastic_depth_prob: float = 0.0
    squeeze_excitation: bool = True
    activation: str = "silu"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    tf_padding: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _layers(self):
        conv = partial(Conv2d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=kaiming_normal_fan_out())
        norm = partial(BatchNorm2d, eps=self.bn_eps, momentum=self.bn_momentum, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        pad = lambda k: "SAME" if self.tf_padding else (k - 1) // 2  # noqa: E731
        return conv, norm, ACTIVATIONS[self.activation], pad

    def _residual(self):
        self.use_res_connect = self.stride == 1 and self.in_channels == self.out_channels
        if not 1 <= self.stride <= 2:
            raise ValueError(f"illegal stride value {self.stride}")
        if self.use_res_connect:
            self.stochastic_depth = StochasticDepth(self.stochastic_depth_prob, "row")

    def __call__(self, x, train: bool = False):
        y = x
        for names in self.groups:
            y = run_sequence(self, names, y, train)
        if self.use_res_connect:
            y = self.stochastic_depth(y, train=train) + x
        return y


class MBConv(_Block):
    """Inverted residual: [expand 1x1] -> depthwise kxk -> [squeeze-excitation] -> project 1x1."""

    def setup(self):
        conv, norm, act, pad = self._layers()
        expanded = make_divisible(self.in_channels * self.expand_ratio)
        groups = []
        if expanded != self.in_channels:
            groups.append(add_sequence(self, "block_0", [conv(expanded, 1), norm(), act()]))
        depthwise = partial(Conv2d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=kaiming_normal_fan_out())
        groups.append(add_sequence(self, f"block_{len(groups)}", [
            depthwise(expanded, self.kernel, stride=self.stride, padding=pad(self.kernel), groups=expanded),
            norm(), act()]))
        if self.squeeze_excitation:
            name = f"block_{len(groups)}"
            setattr(self, name, SqueezeExcitation(
                max(1, self.in_channels // 4), activation_layer=SiLU, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=kaiming_normal_fan_out(),
                bias_init=nn.initializers.zeros))
            groups.append((name,))
        groups.append(add_sequence(self, f"block_{len(groups)}", [conv(self.out_channels, 1), norm()]))
        self.groups = tuple(groups)
        self._residual()


class FusedMBConv(_Block):
    """EfficientNetV2's fused block: expand kxk (with the stride) -> project 1x1."""

    def setup(self):
        conv, norm, act, pad = self._layers()
        expanded = make_divisible(self.in_channels * self.expand_ratio)
        k = dict(stride=self.stride, padding=pad(self.kernel))
        if expanded != self.in_channels:
            groups = [add_sequence(self, "block_0", [conv(expanded, self.kernel, **k), norm(), act()]),
                      add_sequence(self, "block_1", [conv(self.out_channels, 1), norm()])]
        else:
            groups = [add_sequence(self, "block_0", [conv(self.out_channels, self.kernel, **k), norm(), act()])]
        self.groups = tuple(groups)
        self._residual()


# ----------------------------------------------------------------------------- the model

class EfficientNet(nn.Module):
    """EfficientNet V1/V2/Lite from a (scaled) stage table.

    ``stem_channels`` defaults to the first stage's input channels and
    ``head_channels`` to 4x the last stage's output channels, as in torchvision.
    ``bn_momentum`` follows Flax's convention (``1 - torch's``). ``dropout`` (before the
    Linear) defaults to the variant's rate, ``variant_dropout`` (B0 0.2 ... B7 0.5), and
    can be set like torchvision's ``dropout=`` argument.
    """
    stages: Sequence[Stage]
    variant_dropout: float = 0.2
    dropout: float | None = None
    stochastic_depth_prob: float = 0.2
    stem_channels: int | None = None
    head_channels: int | None = None
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    activation: str = "silu"
    squeeze_excitation: bool = True
    tf_padding: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = partial(Conv2d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=kaiming_normal_fan_out())
        norm = partial(BatchNorm2d, eps=self.bn_eps, momentum=self.bn_momentum, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        act = ACTIVATIONS[self.activation]
        stem = self.stem_channels or self.stages[0].input_channels
        self.stem_names = add_sequence(self, "features_0", [
            conv(stem, 3, stride=2, padding="SAME" if self.tf_padding else 1), norm(), act()])
        total = sum(s.num_layers for s in self.stages)
        block_id, channels, names = 0, stem, []
        for s, stage in enumerate(self.stages, start=1):
            block = {"mbconv": MBConv, "fused": FusedMBConv}[stage.block]
            for b in range(stage.num_layers):
                name = f"features_{s}_{b}"
                setattr(self, name, block(
                    in_channels=channels, out_channels=stage.out_channels,
                    expand_ratio=stage.expand_ratio, kernel=stage.kernel,
                    stride=stage.stride if b == 0 else 1,
                    stochastic_depth_prob=self.stochastic_depth_prob * block_id / total,
                    squeeze_excitation=self.squeeze_excitation, activation=self.activation,
                    bn_eps=self.bn_eps, bn_momentum=self.bn_momentum, tf_padding=self.tf_padding,
                    dtype=self.dtype, param_dtype=self.param_dtype))
                names.append(name)
                channels = stage.out_channels
                block_id += 1
        self.block_names = tuple(names)
        head = self.head_channels or 4 * channels
        self.head_names = add_sequence(self, f"features_{len(self.stages) + 1}",
                                       [conv(head, 1), norm(), act()])
        self.avgpool = AdaptiveAvgPool2d(1)
        self.classifier_names = add_sequence(self, "classifier", [
            Dropout(self.variant_dropout if self.dropout is None else self.dropout),
            Linear(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform"),
                   bias_init=nn.initializers.zeros),
        ])

    def features(self, x, train: bool = False):
        check_nhwc(x, 3, "efficientnet")
        x = run_sequence(self, self.stem_names, x, train)
        x = run_sequence(self, self.block_names, x, train)
        return run_sequence(self, self.head_names, x, train)

    def classifier(self, x, train: bool = False):
        return run_sequence(self, self.classifier_names, x, train)

    def __call__(self, x, train: bool = False):
        x = self.features(x, train)
        x = self.avgpool(x)
        return self.classifier(x.reshape(x.shape[0], -1), train)


def efficientnet(width: float = 1.0, depth: float = 1.0, **kwargs) -> EfficientNet:
    """An EfficientNet scaled from B0's table (e.g. with :func:`compound_scaling`'s
    multipliers); B5-B7 also change BatchNorm (pass ``bn_eps``/``bn_momentum``)."""
    return EfficientNet(stages=scale_stages(B0_STAGES, width, depth), **kwargs)


def _b(name: str, **bn):
    width, depth, _, dropout = COEFFICIENTS[name]
    return partial(EfficientNet, stages=scale_stages(B0_STAGES, width, depth), variant_dropout=dropout, **bn)


def _lite(name: str):
    width, depth, _, dropout = LITE_COEFFICIENTS[name]
    stages = scale_stages(B0_STAGES, width, depth, fixed_depth=(0, len(B0_STAGES) - 1))
    return partial(EfficientNet, stages=stages, variant_dropout=dropout, stem_channels=32, head_channels=1280,
                   bn_eps=1e-3, bn_momentum=0.99, activation="relu6", squeeze_excitation=False,
                   tf_padding=True)


_B5_BN = dict(bn_eps=1e-3, bn_momentum=0.99)   # torch: BatchNorm2d(eps=0.001, momentum=0.01)
_V2_BN = dict(bn_eps=1e-3, bn_momentum=0.9)    # torch: BatchNorm2d(eps=1e-3)

efficientnet_b0 = _b("b0")
efficientnet_b1 = _b("b1")
efficientnet_b2 = _b("b2")
efficientnet_b3 = _b("b3")
efficientnet_b4 = _b("b4")
efficientnet_b5 = _b("b5", **_B5_BN)
efficientnet_b6 = _b("b6", **_B5_BN)
efficientnet_b7 = _b("b7", **_B5_BN)
efficientnet_v2_s = partial(EfficientNet, stages=V2_S_STAGES, variant_dropout=0.2, head_channels=1280, **_V2_BN)
efficientnet_v2_m = partial(EfficientNet, stages=V2_M_STAGES, variant_dropout=0.3, head_channels=1280, **_V2_BN)
efficientnet_v2_l = partial(EfficientNet, stages=V2_L_STAGES, variant_dropout=0.4, head_channels=1280, **_V2_BN)
efficientnet_lite0 = _lite("lite0")
efficientnet_lite1 = _lite("lite1")
efficientnet_lite2 = _lite("lite2")
efficientnet_lite3 = _lite("lite3")
efficientnet_lite4 = _lite("lite4")


# ----------------------------------------------------------------------------- torch names

def torch_name(path: tuple[str, ...]) -> str:
    """``('features_2_1', 'block_0_0')`` -> ``'features.2.1.block.0.0'``: every ``_N``
    is torch's ``.N`` (the SE's ``fc1``/``fc2`` keep their names)."""
    return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


TORCH_MAPPING = TorchMapping(head="classifier_1", torch_name=torch_name)

_LITE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2)\.(.+)$")
_LITE_TOP = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_fc": "classifier.1"}


def lite_checkpoint_renamer(stages: Sequence[Stage]):
    """Source-key renaming for the released EfficientNet-Lite checkpoints
    (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``/``_bn0``/``_depthwise_conv``/
    ``_bn1``/``_project_conv``/``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``) onto
    torchvision's EfficientNet names; other keys pass unchanged."""
    where = [(s, b, stage.expand_ratio != 1) for s, stage in enumerate(stages, start=1)
             for b in range(stage.num_layers)]
    head = f"features.{len(stages) + 1}"

    def rename(key: str) -> str:
        m = _LITE_BLOCK.match(key)
        if m:
            n, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(where):
                return key
            s, b, expands = where[n]
            d = 1 if expands else 0
            sub = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": f"{d}.0", "_bn1": f"{d}.1",
                   "_project_conv": f"{d + 1}.0", "_bn2": f"{d + 1}.1"}[part]
            return f"features.{s}.{b}.block.{sub}.{leaf}"
        top, _, leaf = key.partition(".")
        if top in _LITE_TOP:
            return f"{_LITE_TOP[top]}.{leaf}"
        if top in ("_conv_head", "_bn1"):
            return f"{head}.{0 if top == '_conv_head' else 1}.{leaf}"
        return key

    return rename


def _preprocessing(crop: int, resize: int, interpolation: str = "bicubic", mean=None, std=None):
    extra = {} if mean is None else {"mean": mean, "std": std}
    return Preprocessing(resize=resize, crop=crop, interpolation=interpolation, **extra)


# torchvision's default weights' presets (crop, resize, interpolation)
_TV_PRESETS = {
    "efficientnet_b0": (224, 256, "bicubic"), "efficientnet_b1": (240, 255, "bilinear"),
    "efficientnet_b2": (288, 288, "bicubic"), "efficientnet_b3": (300, 320, "bicubic"),
    "efficientnet_b4": (380, 384, "bicubic"), "efficientnet_b5": (456, 456, "bicubic"),
    "efficientnet_b6": (528, 528, "bicubic"), "efficientnet_b7": (600, 600, "bicubic"),
    "efficientnet_v2_s": (384, 384, "bilinear"), "efficientnet_v2_m": (480, 480, "bilinear"),
    "efficientnet_v2_l": (480, 480, "bicubic", (0.5,) * 3, (0.5,) * 3),
}

MODELS = {name: ModelInfo(name, globals()[name], TORCH_MAPPING, input_size=(p[0], p[0], 3),
                          torchvision=name, preprocessing=_preprocessing(*p))
          for name, p in _TV_PRESETS.items()}

# EfficientNet-Lite: no torchvision counterpart; TF's evaluation preset (bicubic resize
# to size + 32, center crop, [-1, 1] input) and the lite checkpoints' key spelling.
for _name, (_w, _d, _size, _) in LITE_COEFFICIENTS.items():
    _name = f"efficientnet_{_name}"
    _stages = globals()[_name].keywords["stages"]
    MODELS[_name] = ModelInfo(
        _name, globals()[_name],
        TorchMapping(head="classifier_1", torch_name=torch_name, rename_source=lite_checkpoint_renamer(_stages)),
        input_size=(_size, _size, 3),
        preprocessing=_preprocessing(_size, _size + 32, "bicubic", (0.5,) * 3, (0.5,) * 3))
