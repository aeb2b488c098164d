"""Network in Network (Lin, Chen & Yan 2013), built from the paper.

An *mlpconv* block is a k x k convolution followed by two 1x1 convolutions (the
"micro network", a two-layer perceptron shared across positions), each followed by a
ReLU. Blocks are separated by a 3x3 stride-2 max pool (with Caffe's ceil-mode output
size, which halves 32 -> 16 -> 8 as the paper's "downsamples by a factor of two") and
dropout (rate 0.5, "applied on the outputs of all but the last mlpconv layers"). The
last block's last 1x1 convolution outputs one feature map per class, and *global average
pooling* of those maps gives the class scores: there is no fully connected layer.

Two configurations (widths per block, kernel/stride/padding of its first convolution):

* ``nin_cifar10``, the paper's CIFAR-10 network (32x32 input, 10 classes; the widths of
  the authors' published CIFAR-10 model): 5x5 192-160-96 | 5x5 192-192-192 | 3x3
  192-192-classes. 966,986 parameters.
* ``nin``, the ImageNet network (224x224 input, 1000 classes; the authors' published
  ImageNet model, four blocks): 11x11/4 96-96-96 | 5x5 256-256-256 | 3x3 384-384-384 |
  3x3 1024-1024-classes; maps 54 -> 27 -> 13 -> 6 before the global average.

NiN has no torchvision counterpart. Its layers form one torch-style sequence
``features_0 ...`` (``features.0 ...`` in a torch ``nn.Sequential`` named ``features``);
``classifier`` is the parameter-free global average pooling. Parameters use torch's
default initialisation.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (Conv2d, Dropout, MaxPool2d, ReLU, add_sequence, check_nhwc, global_avg_pool,
                            run_sequence)
from jaxconv.registry import ModelInfo, Preprocessing

# One row per mlpconv block: (kernel, stride, padding, (width of the k x k conv, of the
# first 1x1, of the second 1x1)); None = the number of classes.
CIFAR10_CONFIG: tuple = (
    (5, 1, 2, (192, 160, 96)),
    (5, 1, 2, (192, 192, 192)),
    (3, 1, 1, (192, 192, None)),
)
IMAGENET_CONFIG: tuple = (
    (11, 4, 0, (96, 96, 96)),
    (5, 1, 2, (256, 256, 256)),
    (3, 1, 1, (384, 384, 384)),
    (3, 1, 1, (1024, 1024, None)),
)


class NiN(nn.Module):
    config: Sequence[tuple] = CIFAR10_CONFIG
    num_classes: int = 10
    dropout: float = 0.5
    in_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if not self.config:
            raise ValueError("nin: config needs at least one mlpconv block")
        conv = partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        layers = []
        for i, (kernel, stride, padding, widths) in enumerate(self.config):
            if len(widths) != 3:
                raise ValueError(f"nin: an mlpconv block has three widths (k x k, 1x1, 1x1), got {widths}")
            if i:  # between blocks
                layers += [MaxPool2d(3, 2, ceil_mode=True), Dropout(self.dropout)]
            w = [self.num_classes if c is None else c for c in widths]
            layers += [conv(w[0], kernel, stride=stride, padding=padding), ReLU(),
                       conv(w[1], 1), ReLU(), conv(w[2], 1), ReLU()]
        if self.config[-1][3][2] is not None:
            raise ValueError("nin: the last block's last width must be None (one map per class)")
        self.feature_names = add_sequence(self, "features", layers)

    def features(self, x, train: bool = False):
        """The mlpconv blocks; the last outputs one map per class."""
        check_nhwc(x, self.in_channels, "nin")
        return run_sequence(self, self.feature_names, x, train)

    def classifier(self, x, train: bool = False):
        """Global average pooling of the class maps: the class scores (no dense layer)."""
        return global_avg_pool(x)

    def __call__(self, x, train: bool = False):
        return self.classifier(self.features(x, train), train)


nin_cifar10 = partial(NiN, config=CIFAR10_CONFIG)
nin = partial(NiN, config=IMAGENET_CONFIG, num_classes=1000)


def _last_conv(config) -> str:
    """The jaxconv name of the last 1x1 convolution: 6 layers per block, 2 between blocks."""
    return f"features_{6 * len(config) + 2 * (len(config) - 1) - 2}"


# features.N <-> features_N; the head is the last 1x1 convolution (a 4-d kernel, so the
# number of classes is not read from the weights: pass num_classes when it differs).
TORCH_MAPPING_CIFAR10 = TorchMapping(head=_last_conv(CIFAR10_CONFIG))
TORCH_MAPPING_IMAGENET = TorchMapping(head=_last_conv(IMAGENET_CONFIG))

# CIFAR-10 channel statistics (the paper also used global contrast normalisation and
# ZCA whitening, which are not per-channel and are left to the data pipeline)
CIFAR10 = Preprocessing(resize=32, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

MODELS = {
    "nin_cifar10": ModelInfo("nin_cifar10", nin_cifar10, TORCH_MAPPING_CIFAR10, input_size=(32, 32, 3),
                             num_classes=10, preprocessing=CIFAR10),
    "nin": ModelInfo("nin", nin, TORCH_MAPPING_IMAGENET),
}
