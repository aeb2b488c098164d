"""VGG (Simonyan & Zisserman 2014), torchvision's configurations A, B, D and E.

Each 'M' is MaxPool(2, 2); each number a 3x3 convolution with padding 1, followed by
BatchNorm (eps 1e-5) in the ``_bn`` variants, then ReLU. avgpool =
AdaptiveAvgPool2d((7, 7)); classifier = Linear(25088, 4096) ReLU Dropout Linear(4096,
4096) ReLU Dropout Linear(4096, classes): dropout comes *after* the ReLU (AlexNet puts
it before the Linear).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.registry import ModelInfo
from jaxconv.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                            MaxPool2d, ReLU, add_sequence, check_nhwc, kaiming_normal_fan_out,
                            run_sequence)

CONFIGS: dict[str, tuple] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    config: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        # torchvision's init_weights: kaiming-normal (fan_out) convs with zero bias,
        # N(0, 0.01) linears with zero bias, BatchNorm 1 / 0.
        conv = partial(Conv2d, kernel_size=3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=kaiming_normal_fan_out(), bias_init=nn.initializers.zeros)
        linear = partial(Linear, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
        layers = []
        for v in self.config:
            if v == "M":
                layers.append(MaxPool2d(2, 2))
                continue
            layers.append(conv(v))
            if self.batch_norm:
                layers.append(BatchNorm2d(dtype=self.dtype, param_dtype=self.param_dtype))
            layers.append(ReLU())
        self.feature_names = add_sequence(self, "features", layers)
        self.avgpool = AdaptiveAvgPool2d((7, 7))
        self.flatten = Flatten()
        self.classifier_names = add_sequence(self, "classifier", [
            linear(4096), ReLU(), Dropout(self.dropout),
            linear(4096), ReLU(), Dropout(self.dropout),
            linear(self.num_classes),
        ])

    def features(self, x, train: bool = False):
        check_nhwc(x, 3, "vgg")
        return run_sequence(self, self.feature_names, x, train)

    def classifier(self, x, train: bool = False):
        return run_sequence(self, self.classifier_names, x, train)

    def __call__(self, x, train: bool = False):
        x = self.features(x, train)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x, train)


vgg11 = partial(VGG, config=CONFIGS["A"])
vgg11_bn = partial(VGG, config=CONFIGS["A"], batch_norm=True)
vgg13 = partial(VGG, config=CONFIGS["B"])
vgg13_bn = partial(VGG, config=CONFIGS["B"], batch_norm=True)
vgg16 = partial(VGG, config=CONFIGS["D"])
vgg16_bn = partial(VGG, config=CONFIGS["D"], batch_norm=True)
vgg19 = partial(VGG, config=CONFIGS["E"])
vgg19_bn = partial(VGG, config=CONFIGS["E"], batch_norm=True)

# torch key prefix <-> jaxconv module: features.N <-> features_N, classifier.N <->
# classifier_N; the first Linear reads torch's (C, H, W) flatten of the 512x7x7 map.
TORCH_MAPPING = TorchMapping(flatten_linears={"classifier_0": (512, 7, 7)}, head="classifier_6")

MODELS = {name: ModelInfo(name, build, TORCH_MAPPING, torchvision=name) for name, build in [
    ("vgg11", vgg11), ("vgg11_bn", vgg11_bn), ("vgg13", vgg13), ("vgg13_bn", vgg13_bn),
    ("vgg16", vgg16), ("vgg16_bn", vgg16_bn), ("vgg19", vgg19), ("vgg19_bn", vgg19_bn)]}
