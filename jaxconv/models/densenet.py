"""DenseNet-BC (Huang et al. 2016, "Densely Connected Convolutional Networks"), torchvision's.

features: conv0 7x7/2 (no bias) -> norm0 -> ReLU -> pool0 (max 3x3/2, padding 1), then
four dense blocks with a transition (BatchNorm, ReLU, 1x1 conv halving the channels,
avg pool 2x2/2) between them, then norm5. Each dense layer is BatchNorm -> ReLU -> 1x1
conv to ``bn_size * growth_rate`` -> BatchNorm -> ReLU -> 3x3 conv to ``growth_rate``
(dropout ``dropout`` after it, torchvision's ``drop_rate``, 0 by default), and sees the
concatenation of the block input and every earlier layer's output. The head is the
*functional* ReLU after norm5 (not a module in torchvision, so easy to miss), global
average pooling and the Linear ``classifier``. All BatchNorms use eps 1e-5.

``memory_efficient=True`` is torchvision's option of the same name: each dense layer is
wrapped in ``nn.remat`` (``jax.checkpoint``), so that its concatenated input and
bottleneck activations are recomputed on the backward pass instead of stored. It changes
memory, not values or parameters.

Old checkpoints (torchvision's own download files among them) spell the dense layers'
modules ``norm.1`` / ``conv.1`` instead of ``norm1`` / ``conv1``; the importer accepts
both spellings, as torchvision's loader does (``rename_source`` below).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Linear, MaxPool2d, check_nhwc,
                            global_avg_pool)
from jaxconv.registry import ModelInfo

# torchvision's init: kaiming_normal_ (fan_in, gain sqrt(2), not truncated) for convs,
# BatchNorm 1 / 0, Linear bias 0 (its weight keeps torch's default).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
    """norm1 -> relu -> conv1 (1x1) -> norm2 -> relu -> conv2 (3x3) on the concatenation
    of ``inputs`` (the block input and the earlier layers' outputs); returns the
    ``growth_rate`` new channels."""
    growth_rate: int
    bn_size: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        norm = partial(BatchNorm2d, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = partial(Conv2d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=_conv_init)
        self.norm1 = norm()
        self.conv1 = conv(self.bn_size * self.growth_rate, 1)
        self.norm2 = norm()
        self.conv2 = conv(self.growth_rate, 3, padding=1)
        self.drop = Dropout(self.dropout)

    def __call__(self, inputs: Sequence, train: bool = False):
        x = jnp.concatenate(tuple(inputs), axis=-1) if len(inputs) > 1 else inputs[0]
        x = self.conv1(nn.relu(self.norm1(x, train)))
        x = self.conv2(nn.relu(self.norm2(x, train)))
        return self.drop(x, train)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    dropout: float = 0.0
    memory_efficient: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        # nn.remat counts the module itself as argument 0: ``train`` (argument 2) is static
        layer = nn.remat(DenseLayer, static_argnums=(2,)) if self.memory_efficient else DenseLayer
        for i in range(self.num_layers):
            setattr(self, f"denselayer{i + 1}", layer(self.growth_rate, self.bn_size, self.dropout,
                                                      dtype=self.dtype, param_dtype=self.param_dtype))

    def __call__(self, x, train: bool = False):
        features = [x]
        for i in range(self.num_layers):
            features.append(getattr(self, f"denselayer{i + 1}")(tuple(features), train))
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.norm = BatchNorm2d(dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv = Conv2d(self.features, 1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=_conv_init)
        self.pool = AvgPool2d(2, 2)

    def __call__(self, x, train: bool = False):
        return self.pool(self.conv(nn.relu(self.norm(x, train))))


class DenseNet(nn.Module):
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    dropout: float = 0.0
    memory_efficient: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # torch's features.conv0 ... features.norm5 are features_conv0 ... features_norm5 here
        # (``features`` is the trunk method), and torch's ``classifier`` Linear is ``fc``.
        self.features_conv0 = Conv2d(self.num_init_features, 7, stride=2, padding=3, use_bias=False,
                                     kernel_init=_conv_init, **kw)
        self.features_norm0 = BatchNorm2d(**kw)
        self.features_pool0 = MaxPool2d(3, 2, padding=1)
        names, channels = [], self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            setattr(self, f"features_denseblock{i + 1}",
                    DenseBlock(num_layers, self.growth_rate, self.bn_size, self.dropout,
                               self.memory_efficient, **kw))
            names.append(f"features_denseblock{i + 1}")
            channels += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                channels //= 2
                setattr(self, f"features_transition{i + 1}", Transition(channels, **kw))
                names.append(f"features_transition{i + 1}")
        self.block_names = tuple(names)
        self.features_norm5 = BatchNorm2d(**kw)
        self.fc = Linear(self.num_classes, bias_init=nn.initializers.zeros, **kw)

    def features(self, x, train: bool = False):
        """torch's ``model.features``: conv0 ... norm5 (before the functional ReLU)."""
        check_nhwc(x, 3, "densenet")
        x = nn.relu(self.features_norm0(self.features_conv0(x), train))
        x = self.features_pool0(x)
        for name in self.block_names:
            x = getattr(self, name)(x, train=train)
        return self.features_norm5(x, train)

    def feature_map(self, x, train: bool = False):
        """The map the head pools: ``features`` then torchvision's functional ReLU after
        norm5 (what :func:`jaxconv.convolutionize` slides the classifier over)."""
        return nn.relu(self.features(x, train))

    def classifier(self, x, train: bool = False):
        return self.fc(x)

    def __call__(self, x, train: bool = False):
        x = self.feature_map(x, train)  # torchvision's F.relu after norm5
        return self.classifier(global_avg_pool(x), train)


densenet121 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
densenet161 = partial(DenseNet, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
densenet169 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
densenet201 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)


def torch_name(path: tuple[str, ...]) -> str:
    """``('features_denseblock1', 'denselayer2', 'conv1')`` -> ``features.denseblock1.denselayer2.conv1``;
    ``('fc',)`` -> ``classifier``."""
    head, rest = path[0], list(path[1:])
    if head == "fc":
        head = "classifier"
    elif head.startswith("features_"):
        head = "features." + head[len("features_"):]
    return ".".join([head, *rest])


_OLD_SPELLING = re.compile(r"^(.*\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.([A-Za-z_]+)$")


def rename_source(key: str) -> str:
    """The old key spelling ``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight``
    (torchvision's ``_load_state_dict`` does the same); other keys are unchanged."""
    return _OLD_SPELLING.sub(r"\1\2.\3", key)


TORCH_MAPPING = TorchMapping(head="fc", torch_name=torch_name, rename_source=rename_source)

MODELS = {name: ModelInfo(name, build, TORCH_MAPPING, torchvision=name) for name, build in [
    ("densenet121", densenet121), ("densenet161", densenet161), ("densenet169", densenet169),
    ("densenet201", densenet201)]}
