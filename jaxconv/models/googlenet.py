"""GoogLeNet (Szegedy et al. 2014, "Going deeper with convolutions"), torchvision's.

torchvision's variant, which is what its ImageNet weights need:

* every convolution is a ``BasicConv2d``: Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU;
* the stride-2 max pools use ``ceil_mode=True`` (112 -> 56 -> 28 -> 14 -> 7 at 224),
  and so does the 3x3 stride-1 pool of each inception module's pool branch;
* the "5x5" branch is a 3x3 convolution (torchvision issue #906; the weights have it);
* ``transform_input`` turns input normalised with ImageNet's mean/std into the
  ``(x - 0.5) / 0.5`` normalisation the ported weights were trained with. It is off by
  default (as in ``torchvision.models.googlenet(weights=None)``) and torchvision turns it
  on when it loads its ImageNet weights: ``MODELS['googlenet'].weights_options``;
* two auxiliary heads ``aux1`` (after inception4a) and ``aux2`` (after inception4d):
  adaptive average pool to 4x4, BasicConv2d 1x1 to 128, Linear(2048, 1024), ReLU,
  Dropout(0.7), Linear(1024, classes). With ``aux_logits=True`` (the default) they are
  built, and in train mode the model returns ``GoogLeNetOutputs(logits, aux_logits2,
  aux_logits1)`` in torchvision's order; in eval mode it returns the logits only;
* global average pool, Dropout(0.2), Linear(1024, classes).

:func:`googlenet_loss` is the paper's training loss: cross-entropy of the main head plus
0.3 times that of each auxiliary head.

This file also holds what Inception-v3 shares with GoogLeNet: :class:`BasicConv2d` and
:func:`transform_input`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxconv.convert.mapping import TorchMapping
from jaxconv.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                            check_nhwc, fan_out, torch_trunc_normal)
from jaxconv.registry import ModelInfo

# (mean, std) of the ImageNet normalisation -> (0.5, 0.5): x * std / 0.5 + (mean - 0.5) / 0.5
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def transform_input(x):
    """torchvision's ``_transform_input`` on an NHWC batch: input normalised with
    ImageNet's mean/std becomes input normalised with mean 0.5 and std 0.5."""
    scale = jnp.asarray([s / 0.5 for s in _IMAGENET_STD], x.dtype)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], x.dtype)
    return x * scale + shift


class BasicConv2d(nn.Module):
    """torchvision's Inception ``BasicConv2d``: Conv2d(bias=False) -> BatchNorm2d(eps=1e-3) -> ReLU."""
    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Any = 0
    init_std: float = 0.01     # torchvision's init_weights: trunc_normal_(std, a=-2, b=2)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.conv = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=False,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=torch_trunc_normal(self.init_std))
        self.bn = BatchNorm2d(eps=1e-3, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, train: bool = False):
        return nn.relu(self.bn(self.conv(x), train))


class Inception(nn.Module):
    """One inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 ("5x5") | maxpool(3, 1, ceil) -> 1x1."""
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        self.branch1 = conv(self.ch1x1, 1)
        self.branch2_0 = conv(self.ch3x3red, 1)
        self.branch2_1 = conv(self.ch3x3, 3, padding=1)
        self.branch3_0 = conv(self.ch5x5red, 1)
        self.branch3_1 = conv(self.ch5x5, 3, padding=1)  # torchvision's 3x3 (issue #906)
        self.branch4_0 = MaxPool2d(3, 1, padding=1, ceil_mode=True)
        self.branch4_1 = conv(self.pool_proj, 1)

    def __call__(self, x, train: bool = False):
        x = fan_out(x)
        return jnp.concatenate([
            self.branch1(x, train),
            self.branch2_1(self.branch2_0(x, train), train),
            self.branch3_1(self.branch3_0(x, train), train),
            self.branch4_1(self.branch4_0(x), train),
        ], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary head: adaptive avg pool 4x4, 1x1 conv to 128, Linear 2048 -> 1024, ReLU,
    dropout, Linear -> classes."""
    num_classes: int
    dropout: float = 0.7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        linear = partial(Linear, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_trunc_normal(0.01))
        self.pool = AdaptiveAvgPool2d((4, 4))
        self.conv = BasicConv2d(128, 1, dtype=self.dtype, param_dtype=self.param_dtype)
        self.flatten = Flatten()
        self.fc1 = linear(1024)
        self.drop = Dropout(self.dropout)
        self.fc2 = linear(self.num_classes)

    def __call__(self, x, train: bool = False):
        x = self.flatten(self.conv(self.pool(x), train))
        x = self.drop(nn.relu(self.fc1(x)), train)
        return self.fc2(x)


class GoogLeNetOutputs(NamedTuple):
    """Train-mode output with auxiliary heads, in torchvision's order."""
    logits: jax.Array
    aux_logits2: jax.Array
    aux_logits1: jax.Array


# (name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj); 'M' = MaxPool(3 or 2, 2, ceil)
INCEPTION_CONFIG: tuple = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("maxpool3", 3),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("maxpool4", 2),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
_AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}


class GoogLeNet(nn.Module):
    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.2
    dropout_aux: float = 0.7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv1 = conv(64, 7, stride=2, padding=3)
        self.maxpool1 = MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = conv(64, 1)
        self.conv3 = conv(192, 3, padding=1)
        self.maxpool2 = MaxPool2d(3, 2, ceil_mode=True)
        names = []
        for name, *spec in INCEPTION_CONFIG:
            if name.startswith("maxpool"):
                setattr(self, name, MaxPool2d(spec[0], 2, ceil_mode=True))
            else:
                setattr(self, name, Inception(*spec, dtype=self.dtype, param_dtype=self.param_dtype))
            names.append(name)
        self.block_names = tuple(names)
        if self.aux_logits:
            aux = partial(InceptionAux, self.num_classes, self.dropout_aux, dtype=self.dtype,
                          param_dtype=self.param_dtype)
            self.aux1 = aux()
            self.aux2 = aux()
        self.avgpool = AdaptiveAvgPool2d((1, 1))
        self.flatten = Flatten()
        self.drop = Dropout(self.dropout)
        self.fc = Linear(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_trunc_normal(0.01))

    def _trunk(self, x, train: bool, with_aux: bool):
        check_nhwc(x, 3, "googlenet")
        if self.transform_input:
            x = transform_input(x)
        x = self.conv1(x, train)
        x = self.maxpool1(x)
        x = self.conv3(self.conv2(x, train), train)
        x = self.maxpool2(x)
        aux = {}
        for name in self.block_names:
            x = getattr(self, name)(x, train=train)
            if with_aux and name in _AUX_AFTER:
                aux[_AUX_AFTER[name]] = getattr(self, _AUX_AFTER[name])(x, train)
        return x, aux

    def features(self, x, train: bool = False):
        """The convolutional trunk (transform_input included): N x H/32 x W/32 x 1024."""
        return self._trunk(x, train, with_aux=False)[0]

    def classifier(self, x, train: bool = False):
        """Dropout and the final Linear on the pooled, flattened features."""
        return self.fc(self.drop(x, train))

    def __call__(self, x, train: bool = False):
        # the auxiliary heads run in train mode, and at initialisation so that their
        # parameters exist whatever mode init is called in
        with_aux = self.aux_logits and (train or self.is_initializing())
        x, aux = self._trunk(x, train, with_aux)
        logits = self.classifier(self.flatten(self.avgpool(x)), train)
        if self.aux_logits and train:
            return GoogLeNetOutputs(logits, aux["aux2"], aux["aux1"])
        return logits


def auxiliary_loss(outputs, labels, aux_weight: float) -> jax.Array:
    """Mean cross-entropy of the main logits plus ``aux_weight`` times that of every
    auxiliary head. ``outputs`` is a model's output (logits, or a NamedTuple whose first
    entry is the logits and whose other entries are auxiliary logits); ``labels`` are
    integer classes (N,) or target distributions (N, classes)."""
    heads = list(outputs) if isinstance(outputs, tuple) else [outputs]
    labels = jnp.asarray(labels)
    if labels.ndim not in (1, 2):
        raise ValueError(f"labels must be integer classes (N,) or distributions (N, C), got shape {labels.shape}")

    def ce(logits):
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {logits.shape[0]}")
        if labels.ndim == 1:
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"1-d labels must be integer classes, got dtype {labels.dtype}")
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return optax.softmax_cross_entropy(logits, labels.astype(logits.dtype)).mean()

    loss = ce(heads[0])
    for aux in heads[1:]:
        if aux is not None:
            loss = loss + aux_weight * ce(aux)
    return loss


def googlenet_loss(outputs, labels, aux_weight: float = 0.3) -> jax.Array:
    """GoogLeNet's training loss (Szegedy et al. 2014): cross-entropy of the main head
    plus 0.3 x the cross-entropy of each auxiliary head (aux1 and aux2). Takes the
    model's output as it comes: ``GoogLeNetOutputs`` in train mode with aux heads, or
    plain logits (then it is the plain cross-entropy)."""
    return auxiliary_loss(outputs, labels, aux_weight)


googlenet = GoogLeNet

# torch key prefix <-> jaxconv module: conv1.conv <-> conv1/conv, inception3a.branch2.0 <->
# inception3a/branch2_0 (the default trailing _N -> .N), aux1.fc1 <-> aux1/fc1, whose
# Linear reads torch's (C, H, W) flatten of the 128x4x4 map.
TORCH_MAPPING = TorchMapping(head="fc", flatten_linears={"aux1/fc1": (128, 4, 4), "aux2/fc1": (128, 4, 4)})

MODELS = {"googlenet": ModelInfo("googlenet", googlenet, TORCH_MAPPING, torchvision="googlenet",
                                 weights_options={"transform_input": True})}
