"""The residual family (He et al. 2015 and descendants): ResNet, ResNeXt, Wide ResNet,
the paper's shortcut options A/B/C, plain nets, and the CIFAR ResNets.

torchvision's ImageNet ResNet: conv1 = Conv(64, 7, s2, p3, no bias) bn1 relu maxpool =
MaxPool(3, 2, p1); then four stages ``layer1..layer4`` of blocks at widths 64/128/256/512
(the first block of stages 2-4 has stride 2); avgpool = AdaptiveAvgPool2d((1, 1)); fc =
Linear(512 * expansion, classes). Every convolution is bias-free and followed by a
BatchNorm (eps 1e-5, momentum 0.1).

* ``BasicBlock`` (expansion 1): 3x3 conv (stride s) bn relu 3x3 conv bn, + shortcut, relu.
* ``Bottleneck`` (expansion 4, torchvision's "ResNet V1.5": the stride sits on the 3x3):
  1x1 conv to ``width`` bn relu, 3x3 conv (stride s, ``groups``) bn relu, 1x1 conv to
  4 * planes bn, + shortcut, relu; ``width = planes * width_per_group // 64 * groups``.
  ResNeXt's aggregated pathways are the grouped 3x3 (32x4d: groups 32, 4 channels per
  group); Wide ResNet doubles ``width_per_group`` (128).

Shortcuts (the paper's section 4.1), selectable on every ResNet with ``shortcut``:

* ``'A'``: identity, and where the dimensions increase the input is subsampled with the
  block's stride (``x[:, ::s, ::s]``) and zero channels are appended after the input's
  own (as fb.resnet.torch does): parameter-free.
* ``'B'`` (torchvision's): identity, and a projection (1x1 conv with the block's stride +
  BatchNorm, torch's ``downsample``) where the dimensions change.
* ``'C'``: a projection on every shortcut.
* ``None`` (the default): the paper's choice, ``'B'`` for the ImageNet nets and ``'A'``
  for the CIFAR nets.

``residual=False`` drops the shortcuts altogether: the plain nets ``plain18`` /
``plain34`` of the plain-versus-residual comparison.

The CIFAR ResNets (section 4.2) have a 3x3 conv of 16 channels (stride 1, no max-pool),
three stages of n basic blocks at 16/32/64 channels, global average pooling and a
10-way fc: 6n + 2 layers (n = 3, 5, 7, 9, 18 for resnet20/32/44/56/110), option A.
They take 32x32 input and, with ``in_channels=1``, 28x28 grayscale images too.

Initialisation is torchvision's: kaiming-normal (fan_out) convolutions, BatchNorm 1 / 0,
torch's default for the fc; ``zero_init_residual=True`` starts the last BatchNorm of
every residual branch at scale 0, as torchvision's option does.

Module names mirror torchvision's paths: torch ``layer1.0.downsample.0`` is jaxconv
``layer1_0`` / ``downsample_0``; option A's parameter-free shortcut is ``downsample``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU,
                            check_nhwc, kaiming_normal_fan_out)
from jaxconv.registry import ModelInfo, Preprocessing

SHORTCUTS = ("A", "B", "C")


def shortcut_kind(option: str | None, residual: bool, in_planes: int, out_planes: int, stride: int) -> str:
    """What a block's shortcut is: 'identity', 'projection', 'zero_pad' or 'none'."""
    if not residual:
        return "none"
    if option not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)} (or None for the "
                         f"model's default), got {option!r}")
    changes = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and changes):
        return "projection"
    if option == "A" and changes:
        if out_planes < in_planes:
            raise ValueError(f"shortcut option A cannot reduce channels ({in_planes} -> {out_planes})")
        return "zero_pad"
    return "identity"


class ZeroPadShortcut(nn.Module):
    """The paper's option-A shortcut: subsample with ``stride``, append zero channels up
    to ``features``. Parameter-free; torch has no such module."""
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        extra = self.features - x.shape[-1]
        if extra < 0:
            raise ValueError(f"{self.name}: cannot zero-pad {x.shape[-1]} channels to {self.features}")
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))

    def torch_repr(self, in_shape) -> str:
        return f"ZeroPadShortcut({in_shape[-1]} -> {self.features}, stride={self.stride})"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class _Block(nn.Module):
    """What both blocks share: their fields, the shortcut and the summary label.
    ``planes`` sets the output channels (``planes * expansion``), ``shortcut`` the
    paper's option (A, B, C), ``residual=False`` makes the block plain."""
    planes: int
    in_planes: int
    stride: int = 1
    shortcut: str | None = "B"
    residual: bool = True
    groups: int = 1
    base_width: int = 64
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion: ClassVar[int] = 1

    def _make_shortcut(self):
        out = self.planes * self.expansion
        kind = shortcut_kind(self.shortcut, self.residual, self.in_planes, out, self.stride)
        if kind == "projection":
            self.downsample_0 = Conv2d(out, 1, stride=self.stride, use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype, kernel_init=kaiming_normal_fan_out())
            self.downsample_1 = BatchNorm2d(dtype=self.dtype, param_dtype=self.param_dtype)
        elif kind == "zero_pad":
            self.downsample = ZeroPadShortcut(out, self.stride)
        return kind

    def _conv(self, features, kernel, **kw):
        return Conv2d(features, kernel, padding=kernel // 2, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=kaiming_normal_fan_out(), **kw)

    def _norm(self, last: bool = False):
        zero = last and self.zero_init_residual
        return BatchNorm2d(dtype=self.dtype, param_dtype=self.param_dtype,
                           scale_init=nn.initializers.zeros if zero else nn.initializers.ones)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[-1] != self.in_planes:
            raise ValueError(f"{type(self).__name__} {self.name} expects an NHWC map with "
                             f"{self.in_planes} channels, got shape {tuple(x.shape)}")

    def _add_shortcut(self, out, x, train):
        if self.kind == "projection":
            return out + self.downsample_1(self.downsample_0(x, train), train)
        if self.kind == "zero_pad":
            return out + self.downsample(x, train)
        if self.kind == "identity":
            return out + x.astype(out.dtype)
        return out

    def summary_label(self) -> str:
        """How ``jaxconv summary`` names this block on its subtotal line."""
        shortcut = {"none": "no shortcut", "identity": "identity shortcut",
                    "projection": "projection shortcut", "zero_pad": "zero-padding shortcut"}
        kind = shortcut_kind(self.shortcut, self.residual, self.in_planes,
                             self.planes * self.expansion, self.stride)
        return f"{self._describe()}, {shortcut[kind]}"


class BasicBlock(_Block):
    """Two 3x3 convolutions; ``planes`` output channels."""
    expansion: ClassVar[int] = 1

    def setup(self):
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64 "
                             "(use Bottleneck blocks for ResNeXt and Wide ResNet)")
        self.conv1 = self._conv(self.planes, 3, stride=self.stride)
        self.bn1 = self._norm()
        self.conv2 = self._conv(self.planes, 3)
        self.bn2 = self._norm(last=True)
        self.relu = ReLU()
        self.kind = self._make_shortcut()

    def __call__(self, x, train: bool = False):
        self._check_input(x)
        out = self.relu(self.bn1(self.conv1(x, train), train))
        out = self.bn2(self.conv2(out, train), train)
        return self.relu(self._add_shortcut(out, x, train))

    def _describe(self) -> str:
        return f"BasicBlock {self.in_planes}->{self.planes}" + (f"/{self.stride}" if self.stride > 1 else "")


class Bottleneck(_Block):
    """1x1 down to ``width``, grouped 3x3 (with the stride), 1x1 up to ``4 * planes``."""
    expansion: ClassVar[int] = 4

    @property
    def width(self) -> int:
        return self.planes * self.base_width // 64 * self.groups

    def setup(self):
        if self.groups < 1 or self.base_width < 1:
            raise ValueError(f"Bottleneck: groups and width_per_group must be positive, "
                             f"got {self.groups} and {self.base_width}")
        self.conv1 = self._conv(self.width, 1)
        self.bn1 = self._norm()
        self.conv2 = self._conv(self.width, 3, stride=self.stride, groups=self.groups)
        self.bn2 = self._norm()
        self.conv3 = self._conv(self.planes * self.expansion, 1)
        self.bn3 = self._norm(last=True)
        self.relu = ReLU()
        self.kind = self._make_shortcut()

    def __call__(self, x, train: bool = False):
        self._check_input(x)
        out = self.relu(self.bn1(self.conv1(x, train), train))
        out = self.relu(self.bn2(self.conv2(out, train), train))
        out = self.bn3(self.conv3(out, train), train)
        return self.relu(self._add_shortcut(out, x, train))

    def _describe(self) -> str:
        groups = f" ({self.groups} groups)" if self.groups > 1 else ""
        stride = f"/{self.stride}" if self.stride > 1 else ""
        return f"Bottleneck {self.in_planes}->{self.width}{stride}->{self.planes * self.expansion}{groups}"


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A ResNet: a stem, stages of ``block`` (``'basic'`` or ``'bottleneck'``) with
    ``stage_sizes`` blocks at ``stage_widths`` planes (stride 2 from the second stage
    on), global average pooling and an fc.

    ``stem='imagenet'``: 7x7/2 conv and 3x3/2 max-pool (torchvision); ``'cifar'``: one
    3x3/1 conv (the paper's CIFAR nets). See the module docstring for ``shortcut`` and
    ``residual``.
    """
    block: str | type = "basic"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str | None = None
    residual: bool = True
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    num_classes: int = 1000
    in_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        block = BLOCKS.get(self.block) if isinstance(self.block, str) else self.block
        if not (isinstance(block, type) and issubclass(block, _Block)):
            raise ValueError(f"block must be one of {', '.join(BLOCKS)} (or a block class), got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.stage_sizes) != len(self.stage_widths) or min(self.stage_sizes, default=0) < 1:
            raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and stage_widths "
                             f"{tuple(self.stage_widths)} must be equally long, with >= 1 block per stage")
        shortcut = self.shortcut if self.shortcut is not None else ("A" if self.stem == "cifar" else "B")
        shortcut_kind(shortcut, True, 1, 1, 1)  # validates the option
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.stem == "imagenet":
            self.conv1 = Conv2d(self.stem_width, 7, stride=2, padding=3, use_bias=False,
                                kernel_init=kaiming_normal_fan_out(), **dt)
        else:
            self.conv1 = Conv2d(self.stem_width, 3, stride=1, padding=1, use_bias=False,
                                kernel_init=kaiming_normal_fan_out(), **dt)
        self.bn1 = BatchNorm2d(**dt)
        self.relu = ReLU()
        if self.stem == "imagenet":
            self.maxpool = MaxPool2d(3, 2, 1)
        names, in_planes = [], self.stem_width
        for i, (n, planes) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(n):
                name = f"layer{i + 1}_{j}"
                setattr(self, name, block(
                    planes=planes, in_planes=in_planes, stride=2 if i > 0 and j == 0 else 1,
                    shortcut=shortcut, residual=self.residual, groups=self.groups,
                    base_width=self.width_per_group, zero_init_residual=self.zero_init_residual, **dt))
                names.append(name)
                in_planes = planes * block.expansion
        self.block_names = tuple(names)
        self.avgpool = AdaptiveAvgPool2d((1, 1))
        self.flatten = Flatten()
        self.fc = Linear(self.num_classes, **dt)  # torchvision keeps torch's default init here

    def features(self, x, train: bool = False):
        """The convolutional trunk: the last stage's (N, H/32, W/32, C) map (H/4 for CIFAR)."""
        check_nhwc(x, self.in_channels, "resnet")
        x = self.relu(self.bn1(self.conv1(x, train), train))
        if self.stem == "imagenet":
            x = self.maxpool(x)
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return x

    def classifier(self, x, train: bool = False):
        return self.fc(x, train)

    def __call__(self, x, train: bool = False):
        x = self.features(x, train)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x, train)


# ----------------------------------------------------------------------------- variants

# The variants: a stage table each (blocks per stage; widths 64/128/256/512 x expansion).
resnet18 = partial(ResNet, block="basic", stage_sizes=(2, 2, 2, 2))
resnet34 = partial(ResNet, block="basic", stage_sizes=(3, 4, 6, 3))
resnet50 = partial(ResNet, block="bottleneck", stage_sizes=(3, 4, 6, 3))
resnet101 = partial(ResNet, block="bottleneck", stage_sizes=(3, 4, 23, 3))
resnet152 = partial(ResNet, block="bottleneck", stage_sizes=(3, 8, 36, 3))
resnext50_32x4d = partial(resnet50, groups=32, width_per_group=4)
resnext101_32x8d = partial(resnet101, groups=32, width_per_group=8)
resnext101_64x4d = partial(resnet101, groups=64, width_per_group=4)
wide_resnet50_2 = partial(resnet50, width_per_group=128)
wide_resnet101_2 = partial(resnet101, width_per_group=128)

plain18 = partial(resnet18, residual=False)
plain34 = partial(resnet34, residual=False)

# The CIFAR nets: 6n + 2 layers, n basic blocks at 16/32/64 channels per stage.
cifar_resnet = partial(ResNet, block="basic", stage_widths=(16, 32, 64), stem="cifar", stem_width=16)
resnet20 = partial(cifar_resnet, stage_sizes=(3, 3, 3))
resnet32 = partial(cifar_resnet, stage_sizes=(5, 5, 5))
resnet44 = partial(cifar_resnet, stage_sizes=(7, 7, 7))
resnet56 = partial(cifar_resnet, stage_sizes=(9, 9, 9))
resnet110 = partial(cifar_resnet, stage_sizes=(18, 18, 18))

# torch key prefix <-> jaxconv module: conv1, bn1, fc as they are; layerS.B.convK <->
# layerS_B/convK; layerS.B.downsample.{0,1} <-> layerS_B/downsample_{0,1}. The default
# rule (a trailing _N becomes .N) spells all of them.
TORCH_MAPPING = TorchMapping(head="fc")

# torchvision's default weights: V1 (resize 256) for resnet18/34, resize 232 for the rest.
RESIZE_232 = Preprocessing(resize=232)
CIFAR10 = Preprocessing(resize=32, crop=32, interpolation="bilinear",
                        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

MODELS = {
    **{name: ModelInfo(name, globals()[name], TORCH_MAPPING, torchvision=name,
                       preprocessing=RESIZE_232 if name not in ("resnet18", "resnet34") else Preprocessing())
       for name in TORCHVISION},
    "plain18": ModelInfo("plain18", plain18, TORCH_MAPPING),
    "plain34": ModelInfo("plain34", plain34, TORCH_MAPPING),
    **{name: ModelInfo(name, globals()[name], TORCH_MAPPING, input_size=(32, 32, 3), num_classes=10,
                       preprocessing=CIFAR10)
       for name in CIFAR},
}
