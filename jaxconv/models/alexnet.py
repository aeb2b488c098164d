"""AlexNet, torchvision's single-tower variant (Krizhevsky 2014, "One weird trick").

torchvision: features = Conv(64, 11, s4, p2) ReLU MaxPool(3, 2) Conv(192, 5, p2) ReLU
MaxPool(3, 2) Conv(384, 3, p1) ReLU Conv(256, 3, p1) ReLU Conv(256, 3, p1) ReLU
MaxPool(3, 2); avgpool = AdaptiveAvgPool2d((6, 6)); classifier = Dropout Linear(9216,
4096) ReLU Dropout Linear(4096, 4096) ReLU Linear(4096, classes). Dropout comes
*before* each hidden Linear here (VGG puts it after the ReLU).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.registry import ModelInfo
from jaxconv.layers import (AdaptiveAvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU,
                            add_sequence, check_nhwc, run_sequence)


class AlexNet(nn.Module):
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = lambda *a, **k: Conv2d(*a, dtype=self.dtype, param_dtype=self.param_dtype, **k)  # noqa: E731
        linear = lambda n: Linear(n, dtype=self.dtype, param_dtype=self.param_dtype)  # noqa: E731
        self.feature_names = add_sequence(self, "features", [
            conv(64, 11, stride=4, padding=2), ReLU(), MaxPool2d(3, 2),
            conv(192, 5, padding=2), ReLU(), MaxPool2d(3, 2),
            conv(384, 3, padding=1), ReLU(),
            conv(256, 3, padding=1), ReLU(),
            conv(256, 3, padding=1), ReLU(), MaxPool2d(3, 2),
        ])
        self.avgpool = AdaptiveAvgPool2d((6, 6))
        self.flatten = Flatten()
        self.classifier_names = add_sequence(self, "classifier", [
            Dropout(self.dropout), linear(4096), ReLU(),
            Dropout(self.dropout), linear(4096), ReLU(),
            linear(self.num_classes),
        ])

    def features(self, x, train: bool = False):
        check_nhwc(x, 3, "alexnet")
        return run_sequence(self, self.feature_names, x, train)

    def classifier(self, x, train: bool = False):
        return run_sequence(self, self.classifier_names, x, train)

    def __call__(self, x, train: bool = False):
        x = self.features(x, train)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x, train)


# torch key prefix <-> jaxconv module: features.N <-> features_N, classifier.N <->
# classifier_N; the first Linear reads torch's (C, H, W) flatten of the 256x6x6 map.
TORCH_MAPPING = TorchMapping(flatten_linears={"classifier_1": (256, 6, 6)}, head="classifier_6")

MODELS = {"alexnet": ModelInfo("alexnet", AlexNet, TORCH_MAPPING, torchvision="alexnet")}
