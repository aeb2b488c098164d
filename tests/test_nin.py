"""Network in Network (Lin et al. 2013) against a torch model built from the paper here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jaxconv
from jaxconv import parity


def mlpconv(cin, widths, kernel, stride=1, padding=0):
    """The paper's mlpconv: a k x k convolution and two 1x1 convolutions, each with ReLU."""
    a, b, c = widths
    return [nn.Conv2d(cin, a, kernel, stride, padding), nn.ReLU(), nn.Conv2d(a, b, 1), nn.ReLU(),
            nn.Conv2d(b, c, 1), nn.ReLU()]


def between():
    """Between blocks: 3x3/2 max pooling (Caffe's ceil-mode size) and dropout."""
    return [nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5)]


class TorchNiN(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))  # global average pooling = the class scores


def torch_nin_cifar10(classes=10):
    return TorchNiN(mlpconv(3, (192, 160, 96), 5, padding=2) + between()
                    + mlpconv(96, (192, 192, 192), 5, padding=2) + between()
                    + mlpconv(192, (192, 192, classes), 3, padding=1))


def torch_nin_imagenet(classes=1000):
    return TorchNiN(mlpconv(3, (96, 96, 96), 11, stride=4) + between()
                    + mlpconv(96, (256, 256, 256), 5, padding=2) + between()
                    + mlpconv(256, (384, 384, 384), 3, padding=1) + between()
                    + mlpconv(384, (1024, 1024, classes), 3, padding=1))


TORCH = {"nin_cifar10": torch_nin_cifar10, "nin": torch_nin_imagenet}
SIZES = {"nin_cifar10": [(32, 32), (33, 45)], "nin": [(224, 224), (131, 99)]}


def reference(name):
    torch.manual_seed(0)
    h, w, c = jaxconv.model_info(name).input_size
    return parity.prepare_reference(TORCH[name](), (2, c, h, w))


@pytest.mark.parametrize("name", ["nin_cifar10", "nin"])
def test_eval_parity(name):
    for result in parity.check_eval(name, reference(name), SIZES[name], batch=1):
        print(result.line())
        assert result.f64_logits <= 1e-9, result.line()
        assert result.worst_intermediate[1] <= 1e-9, result.line()
        assert result.f32_jax <= result.f32_bound, result.line()
        assert len(result.f64_intermediates) >= 20, result.line()


@pytest.mark.parametrize("name", ["nin_cifar10", "nin"])
def test_train_parity(name):
    size = SIZES[name][1]
    errors = parity.check_train(name, reference(name), size, batch=2)
    print(name, errors)
    assert max(errors.values()) <= 1e-9, errors


def paper_parameter_count(blocks, cin=3):
    """Each mlpconv: (k*k*cin + 1) * a + (a + 1) * b + (b + 1) * c; nothing else."""
    total = 0
    for kernel, (a, b, c) in blocks:
        total += (kernel * kernel * cin + 1) * a + (a + 1) * b + (b + 1) * c
        cin = c
    return total


def params_of(name, **overrides):
    model = jaxconv.get_model(name, **overrides)
    h, w, c = jaxconv.model_info(name).input_size
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))["params"]


@pytest.mark.parametrize("name, blocks", [
    ("nin_cifar10", [(5, (192, 160, 96)), (5, (192, 192, 192)), (3, (192, 192, 10))]),
    ("nin", [(11, (96, 96, 96)), (5, (256, 256, 256)), (3, (384, 384, 384)), (3, (1024, 1024, 1000))]),
])
def test_parameter_count_is_the_papers_and_there_is_no_dense_layer(name, blocks):
    params = params_of(name)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == paper_parameter_count(blocks)
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
    assert len(kernels) == 3 * len(blocks)
    assert all(k.ndim == 4 for k in kernels)             # convolutions only: no dense layer
    assert "Linear(" not in jaxconv.summary(name)
    assert sum(p.numel() for p in TORCH[name]().parameters()) == paper_parameter_count(blocks)


@pytest.fixture(scope="module")
def cifar10_model():
    model = jaxconv.get_model("nin_cifar10")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_class_scores_are_the_global_average_of_the_last_maps(cifar10_model):
    model, variables, x = cifar10_model
    maps, scores = jax.jit(lambda v, x: (model.apply(v, x, method=model.features), model.apply(v, x)))(variables, x)
    assert maps.shape == (2, 8, 8, 10)  # 32 -> 16 -> 8: "downsamples by a factor of two"
    np.testing.assert_allclose(scores, maps.mean(axis=(1, 2)), rtol=1e-6)


def test_ceil_mode_pools():
    # floor-mode pools would give 7x7 class maps at 32x32 (CIFAR-10) and 5x5 at 224 (ImageNet)
    for name, size, side in [("nin_cifar10", 32, 8), ("nin", 224, 6)]:
        model = jaxconv.get_model(name)
        x = jnp.zeros((1, size, size, 3))
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        maps = jax.eval_shape(lambda v: model.apply(v, x, method=model.features), variables)
        assert maps.shape[1:3] == (side, side), name


def test_dropout_between_blocks(cifar10_model):
    model, variables, x = cifar10_model
    no_drop = jaxconv.get_model("nin_cifar10", dropout=0.0)

    @jax.jit
    def run(v, key):
        return (model.apply(v, x, train=True, rngs={"dropout": key}),
                no_drop.apply(v, x, train=True), model.apply(v, x))

    (a, plain, evaluated), (b, _, _) = run(variables, jax.random.key(1)), run(variables, jax.random.key(2))
    assert not np.allclose(a, b)                          # dropout draws from the 'dropout' rng
    assert not np.allclose(a, evaluated)
    np.testing.assert_allclose(plain, evaluated, rtol=1e-6)  # and is all that train mode changes
    text = jaxconv.summary("nin_cifar10")
    assert text.count("Dropout(") == 2 and text.count("MaxPool2d(") == 2  # between the 3 blocks
