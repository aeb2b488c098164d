"""Inception-v3 (Szegedy et al. 2015, "Rethinking the Inception Architecture"), torchvision's.

299x299 input by default (at least 75x75). Every convolution is GoogLeNet's
``BasicConv2d`` (no bias, BatchNorm eps 1e-3, ReLU); the stem's max pools and the
grid-reduction pools are floor-mode 3x3 stride 2; the pool branch of the A, C and E
modules is ``avg_pool2d(3, 1, padding=1)`` with torch's default ``count_include_pad=True``.

``AuxLogits`` (after Mixed_6e): avg_pool2d(5, 3), BasicConv2d 1x1 to 128, BasicConv2d 5x5
to 768, adaptive average pool, Linear(768, classes). With ``aux_logits=True`` (the
default) the model returns ``InceptionOutputs(logits, aux_logits)`` in train mode and
the logits alone in eval mode, as torchvision does. The head is average pool, Dropout(0.5),
Linear(2048, classes). ``transform_input`` is as GoogLeNet's (off by default; torchvision
switches it on for its ImageNet weights: ``MODELS['inception_v3'].weights_options``).

torchvision's init_weights: truncated normal (absolute bounds +-2) with std 0.1, except
AuxLogits.conv1 (0.01) and AuxLogits.fc (0.001).

Submodule names are torchvision's literal names (``Conv2d_1a_3x3``, ``Mixed_5b``,
``branch3x3_1``): the torch key is the path joined with dots, no index rewriting.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (AvgPool2d, Dropout, Flatten, Linear, MaxPool2d, check_nhwc, global_avg_pool,
                            torch_trunc_normal)
from jaxconv.models.googlenet import BasicConv2d, auxiliary_loss, transform_input
from jaxconv.registry import ModelInfo, Preprocessing


class _Block(nn.Module):
    """Common fields of the inception modules; ``_conv`` builds a BasicConv2d (std 0.1)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _conv(self, features, kernel_size, stride=1, padding=0, init_std=0.1):
        return BasicConv2d(features, kernel_size, stride, padding, init_std=init_std,
                           dtype=self.dtype, param_dtype=self.param_dtype)


class InceptionA(_Block):
    pool_features: int = 32

    def setup(self):
        self.branch1x1 = self._conv(64, 1)
        self.branch5x5_1 = self._conv(48, 1)
        self.branch5x5_2 = self._conv(64, 5, padding=2)
        self.branch3x3dbl_1 = self._conv(64, 1)
        self.branch3x3dbl_2 = self._conv(96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv(96, 3, padding=1)
        self.pool = AvgPool2d(3, 1, padding=1)
        self.branch_pool = self._conv(self.pool_features, 1)

    def __call__(self, x, train: bool = False):
        b5 = self.branch5x5_2(self.branch5x5_1(x, train), train)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train), train)
        return jnp.concatenate([self.branch1x1(x, train), b5, b3, self.branch_pool(self.pool(x), train)], -1)


class InceptionB(_Block):
    def setup(self):
        self.branch3x3 = self._conv(384, 3, stride=2)
        self.branch3x3dbl_1 = self._conv(64, 1)
        self.branch3x3dbl_2 = self._conv(96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv(96, 3, stride=2)
        self.pool = MaxPool2d(3, 2)

    def __call__(self, x, train: bool = False):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train), train)
        return jnp.concatenate([self.branch3x3(x, train), b3, self.pool(x)], -1)


class InceptionC(_Block):
    channels_7x7: int = 128

    def setup(self):
        c7 = self.channels_7x7
        self.branch1x1 = self._conv(192, 1)
        self.branch7x7_1 = self._conv(c7, 1)
        self.branch7x7_2 = self._conv(c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = self._conv(192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = self._conv(c7, 1)
        self.branch7x7dbl_2 = self._conv(c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = self._conv(c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = self._conv(c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = self._conv(192, (1, 7), padding=(0, 3))
        self.pool = AvgPool2d(3, 1, padding=1)
        self.branch_pool = self._conv(192, 1)

    def __call__(self, x, train: bool = False):
        b7 = x
        for i in range(1, 4):
            b7 = getattr(self, f"branch7x7_{i}")(b7, train)
        b7dbl = x
        for i in range(1, 6):
            b7dbl = getattr(self, f"branch7x7dbl_{i}")(b7dbl, train)
        return jnp.concatenate([self.branch1x1(x, train), b7, b7dbl, self.branch_pool(self.pool(x), train)], -1)


class InceptionD(_Block):
    def setup(self):
        self.branch3x3_1 = self._conv(192, 1)
        self.branch3x3_2 = self._conv(320, 3, stride=2)
        self.branch7x7x3_1 = self._conv(192, 1)
        self.branch7x7x3_2 = self._conv(192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = self._conv(192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = self._conv(192, 3, stride=2)
        self.pool = MaxPool2d(3, 2)

    def __call__(self, x, train: bool = False):
        b3 = self.branch3x3_2(self.branch3x3_1(x, train), train)
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7, train)
        return jnp.concatenate([b3, b7, self.pool(x)], -1)


class InceptionE(_Block):
    def setup(self):
        self.branch1x1 = self._conv(320, 1)
        self.branch3x3_1 = self._conv(384, 1)
        self.branch3x3_2a = self._conv(384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = self._conv(384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = self._conv(448, 1)
        self.branch3x3dbl_2 = self._conv(384, 3, padding=1)
        self.branch3x3dbl_3a = self._conv(384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = self._conv(384, (3, 1), padding=(1, 0))
        self.pool = AvgPool2d(3, 1, padding=1)
        self.branch_pool = self._conv(192, 1)

    def __call__(self, x, train: bool = False):
        b3 = self.branch3x3_1(x, train)
        b3 = jnp.concatenate([self.branch3x3_2a(b3, train), self.branch3x3_2b(b3, train)], -1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train)
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd, train), self.branch3x3dbl_3b(bd, train)], -1)
        return jnp.concatenate([self.branch1x1(x, train), b3, bd, self.branch_pool(self.pool(x), train)], -1)


class InceptionAux(_Block):
    num_classes: int = 1000

    def setup(self):
        self.pool = AvgPool2d(5, 3)
        self.conv0 = self._conv(128, 1)
        self.conv1 = self._conv(768, 5, init_std=0.01)
        self.fc = Linear(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_trunc_normal(0.001))

    def __call__(self, x, train: bool = False):
        x = self.conv1(self.conv0(self.pool(x), train), train)
        return self.fc(global_avg_pool(x))


class InceptionOutputs(NamedTuple):
    """Train-mode output with the auxiliary head, in torchvision's order."""
    logits: jax.Array
    aux_logits: jax.Array


# (name, block, option); the stem is listed in Inception3.setup
MIXED_CONFIG: tuple = (
    ("Mixed_5b", InceptionA, {"pool_features": 32}),
    ("Mixed_5c", InceptionA, {"pool_features": 64}),
    ("Mixed_5d", InceptionA, {"pool_features": 64}),
    ("Mixed_6a", InceptionB, {}),
    ("Mixed_6b", InceptionC, {"channels_7x7": 128}),
    ("Mixed_6c", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6d", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6e", InceptionC, {"channels_7x7": 192}),
    ("Mixed_7a", InceptionD, {}),
    ("Mixed_7b", InceptionE, {}),
    ("Mixed_7c", InceptionE, {}),
)


class Inception3(nn.Module):
    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = partial(BasicConv2d, init_std=0.1, dtype=self.dtype, param_dtype=self.param_dtype)
        self.Conv2d_1a_3x3 = conv(32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 3)
        self.Conv2d_2b_3x3 = conv(64, 3, padding=1)
        self.maxpool1 = MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = conv(80, 1)
        self.Conv2d_4a_3x3 = conv(192, 3)
        self.maxpool2 = MaxPool2d(3, 2)
        self.stem_names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                           "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")
        for name, block, options in MIXED_CONFIG:
            setattr(self, name, block(dtype=self.dtype, param_dtype=self.param_dtype, **options))
        if self.aux_logits:
            self.AuxLogits = InceptionAux(num_classes=self.num_classes, dtype=self.dtype,
                                          param_dtype=self.param_dtype)
        self.drop = Dropout(self.dropout)
        self.flatten = Flatten()
        self.fc = Linear(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_trunc_normal(0.1))

    def _trunk(self, x, train: bool, with_aux: bool):
        check_nhwc(x, 3, "inception_v3")
        if self.transform_input:
            x = transform_input(x)
        for name in self.stem_names:
            x = getattr(self, name)(x, train=train)
        aux = None
        for name, _, _ in MIXED_CONFIG:
            x = getattr(self, name)(x, train)
            if with_aux and name == "Mixed_6e":
                aux = self.AuxLogits(x, train)
        return x, aux

    def features(self, x, train: bool = False):
        """The convolutional trunk (transform_input included): N x 8 x 8 x 2048 at 299."""
        return self._trunk(x, train, with_aux=False)[0]

    def classifier(self, x, train: bool = False):
        """Dropout and the final Linear on the pooled features."""
        return self.fc(self.drop(x, train))

    def __call__(self, x, train: bool = False):
        # AuxLogits runs in train mode, and at initialisation so that its parameters exist
        with_aux = self.aux_logits and (train or self.is_initializing())
        x, aux = self._trunk(x, train, with_aux)
        logits = self.classifier(global_avg_pool(x), train)
        if self.aux_logits and train:
            return InceptionOutputs(logits, aux)
        return logits


def inception_v3_loss(outputs, labels, aux_weight: float = 0.4):
    """Cross-entropy of the main head plus 0.4 x that of AuxLogits, the weighting of
    torchvision's reference training recipe for inception_v3 (plain cross-entropy when
    ``outputs`` are logits alone)."""
    return auxiliary_loss(outputs, labels, aux_weight)


inception_v3 = Inception3


def torch_name(path: tuple[str, ...]) -> str:
    """torchvision's Inception-v3 names are literal (``branch3x3_1`` is not an index)."""
    return ".".join(path)


TORCH_MAPPING = TorchMapping(head="fc", torch_name=torch_name)

# torchvision's Inception_V3_Weights: resize 342, crop 299, bilinear, ImageNet mean/std
INCEPTION_PREPROCESSING = Preprocessing(resize=342, crop=299)
MODELS = {"inception_v3": ModelInfo("inception_v3", inception_v3, TORCH_MAPPING, input_size=(299, 299, 3),
                                    torchvision="inception_v3", preprocessing=INCEPTION_PREPROCESSING,
                                    weights_options={"transform_input": True})}
