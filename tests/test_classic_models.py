"""LeNet5, AlexNet and VGG against torch, by the parity protocol of shared/DESIGN.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxconv
from jaxconv import parity

VGGS = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


class TorchLeNet5(torch.nn.Module):
    """LeNet5 as the seed lecture lists it."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(256, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
            torch.nn.Linear(84, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def reference(name):
    torch.manual_seed(0)
    model = TorchLeNet5() if name == "lenet5" else parity.torchvision_model(name)
    h, w, c = jaxconv.model_info(name).input_size
    calibration = (4, c, 64, 64) if name.startswith("vgg") else (4, c, h, w)
    return parity.prepare_reference(model, calibration)


def assert_parity(result):
    where, worst = result.worst_intermediate
    assert result.f64_logits <= 1e-9, result.line()
    assert worst <= 1e-9, f"first bad layer {where}: {result.line()}"
    assert result.f32_jax <= result.f32_bound, result.line()


@pytest.mark.parametrize("name", ["lenet5", "alexnet"] + VGGS)
def test_eval_parity(name):
    ref = reference(name)
    h, w, _ = jaxconv.model_info(name).input_size
    # the default size and an odd one that torchvision accepts (lenet5 takes only 28x28);
    # VGG-13/16/19 add layers of the same kind to VGG-11's: the odd size only, layer by layer
    sizes = [(h, w), (28, 28)] if name == "lenet5" else [(h, w), (97, 131)]
    if name.startswith(("vgg13", "vgg16", "vgg19")):
        sizes = [(97, 131)]
    for result in parity.check_eval(name, ref, sizes, batch=1):
        print(result.line())
        assert_parity(result)
        assert len(result.f64_intermediates) >= 10  # the per-layer comparison really ran


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11_bn"])
def test_train_mode_parity(name):
    # batch statistics and torch's updated running statistics (unbiased variance)
    ref = reference(name)
    errors = parity.check_train(name, ref, (28, 28) if name == "lenet5" else (64, 64))
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("name", ["lenet5", "alexnet"])
def test_gradient_parity(name):
    ref = reference(name)
    grads = parity.check_grads(name, ref, (28, 28) if name == "lenet5" else (64, 64))
    assert max(grads.values()) <= 1e-9, sorted(grads.items(), key=lambda kv: -kv[1])[:3]


def param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["lenet5", "alexnet"] + VGGS)
def test_parameter_count_equals_torch(name):
    torch_model = TorchLeNet5() if name == "lenet5" else parity.torchvision_model(name)
    expected = sum(p.numel() for p in torch_model.parameters())
    model = jaxconv.get_model(name)
    h, w, c = jaxconv.model_info(name).input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
    assert param_count(shapes["params"]) == expected


@pytest.mark.parametrize("name", ["lenet5", "alexnet"] + VGGS)
def test_jit_gives_the_unjitted_result(name):
    model = jaxconv.get_model(name)
    h, w, c = jaxconv.model_info(name).input_size
    if name.startswith("vgg"):
        h = w = 32  # op-by-op execution of VGG at 224 is slow; 32 is its smallest input
    x = jax.random.normal(jax.random.key(1), (2, h, w, c))
    variables = model.init(jax.random.key(0), x)
    eager = model.apply(variables, x)
    jitted = jax.jit(model.apply)(variables, x)
    assert parity.rel_err(jitted, eager) <= 1e-5
    assert jitted.shape == (2, jaxconv.model_info(name).num_classes)


def test_bfloat16_is_honoured_everywhere():
    model32 = jaxconv.get_model("vgg11_bn")
    model16 = jaxconv.get_model("vgg11_bn", dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    variables = model32.init(jax.random.key(0), x)
    # params and statistics stay float32; every activation is bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(model16.init(jax.random.key(0), x))} == {jnp.dtype("float32")}
    acts = jax.jit(lambda v, x: jaxconv.intermediates(model16, v, x))(variables, x)
    assert {a.dtype for a in acts.values()} == {jnp.dtype("bfloat16")}
    out16, out32 = model16.apply(variables, x), model32.apply(variables, x)
    assert out16.dtype == jnp.bfloat16
    assert parity.rel_err(out16, out32) < 0.05


def test_named_intermediates_and_methods():
    model = jaxconv.get_model("alexnet")
    x = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
    variables = model.init(jax.random.key(0), x)
    acts = jaxconv.intermediates(model, variables, x, names=["features_0", "features_12", "classifier_6"])
    assert acts["features_0"].shape == (1, 55, 55, 64)
    assert acts["features_12"].shape == (1, 6, 6, 256)
    trunk = model.apply(variables, x, method="features")
    np.testing.assert_array_equal(trunk, acts["features_12"])
    with pytest.raises(KeyError, match="no intermediate named nope"):
        jaxconv.intermediates(model, variables, x, names=["nope"])


def test_bad_inputs_and_names_give_clear_errors():
    model = jaxconv.get_model("alexnet")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="looks like NCHW"):
        model.apply(variables, jnp.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match="too small"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(KeyError, match="did you mean .*vgg16"):
        jaxconv.get_model("vgg61")
    with pytest.raises(TypeError, match="no option 'bogus'"):
        jaxconv.get_model("vgg16", bogus=1)
    lenet = jaxconv.get_model("lenet5")
    v = lenet.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="needs 28x28"):
        lenet.apply(v, jnp.zeros((1, 32, 32, 1)))


def test_list_models_uses_torchvision_names():
    names = jaxconv.list_models()
    assert names == sorted(names)
    import torchvision

    available = set(torchvision.models.list_models())
    for name in names:
        tv = jaxconv.model_info(name).torchvision
        if tv is not None:
            assert tv == name and name in available
