"""LeNet5 as the seed lecture lists it, for 1x28x28 input and 10 classes.

features = Conv2d(1, 6, 5) ReLU MaxPool2d(2) Conv2d(6, 16, 5) ReLU MaxPool2d(2)
(28 -> 24 -> 12 -> 8 -> 4); classifier = Linear(256, 120) ReLU Linear(120, 84) ReLU
Linear(84, 10), on torch's (C, H, W) = (16, 4, 4) flatten.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.registry import ModelInfo, Preprocessing
from jaxconv.layers import (Conv2d, Flatten, Linear, MaxPool2d, ReLU, add_sequence, check_nhwc,
                            run_sequence)


class LeNet5(nn.Module):
    num_classes: int = 10
    in_channels: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = lambda n: Conv2d(n, 5, dtype=self.dtype, param_dtype=self.param_dtype)  # noqa: E731
        linear = lambda n: Linear(n, dtype=self.dtype, param_dtype=self.param_dtype)  # noqa: E731
        self.feature_names = add_sequence(self, "features", [
            conv(6), ReLU(), MaxPool2d(2),
            conv(16), ReLU(), MaxPool2d(2),
        ])
        self.flatten = Flatten()
        self.classifier_names = add_sequence(self, "classifier", [
            linear(120), ReLU(), linear(84), ReLU(), linear(self.num_classes),
        ])

    def features(self, x, train: bool = False):
        check_nhwc(x, self.in_channels, "lenet5")
        return run_sequence(self, self.feature_names, x, train)

    def classifier(self, x, train: bool = False):
        return run_sequence(self, self.classifier_names, x, train)

    def __call__(self, x, train: bool = False):
        x = self.features(x, train)
        if x.shape[1:3] != (4, 4):
            raise ValueError(f"lenet5 needs 28x28 input (a 4x4 feature map for its 256-input "
                             f"Linear), got input that gives a {x.shape[1]}x{x.shape[2]} map; "
                             f"use jaxconv.convolutionize for larger images")
        return self.classifier(self.flatten(x), train)


# torch key prefix <-> jaxconv module: features.N <-> features_N, classifier.N <->
# classifier_N; the first Linear reads torch's (C, H, W) flatten of the 16x4x4 map.
TORCH_MAPPING = TorchMapping(flatten_linears={"classifier_0": (16, 4, 4)}, head="classifier_4")

# Fashion-MNIST statistics; a 28x28 grayscale image is used as it is.
FASHION_MNIST = Preprocessing(resize=28, crop=28, interpolation="bilinear", mean=(0.2860,), std=(0.3530,))
MODELS = {"lenet5": ModelInfo("lenet5", LeNet5, TORCH_MAPPING, input_size=(28, 28, 1), num_classes=10,
                              preprocessing=FASHION_MNIST)}
