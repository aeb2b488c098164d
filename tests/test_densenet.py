"""DenseNet-121/161/169/201 against torchvision, by the parity protocol of shared/DESIGN.md."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxconv
from jaxconv import parity
from jaxconv.models.densenet import DenseNet

NAMES = ["densenet121", "densenet161", "densenet169", "densenet201"]


def reference(name):
    torch.manual_seed(0)
    return parity.prepare_reference(parity.torchvision_model(name), (2, 3, 64, 64))


@pytest.fixture(scope="module")
def densenet121_ref():
    return reference("densenet121")


def assert_parity(result):
    where, worst = result.worst_intermediate
    assert result.f64_logits <= 1e-9, result.line()
    assert worst <= 1e-9, f"first bad layer {where}: {result.line()}"
    assert result.f32_jax <= result.f32_bound, result.line()
    # every conv, BatchNorm, dense layer, block and transition was compared
    assert len(result.f64_intermediates) >= 300, result.line()


def test_densenet121_eval_parity(densenet121_ref):
    # 224 and an odd size; intermediates include every dense layer's new features and
    # norm5 (the functional ReLU after it is checked by the logits)
    for result in parity.check_eval("densenet121", densenet121_ref, [(224, 224), (97, 131)], batch=1):
        print(result.line())
        assert_parity(result)


@pytest.mark.parametrize("name", NAMES[1:])
def test_big_densenet_eval_parity(name):
    # Every layer at an odd size. DenseNet-161/169/201 differ from DenseNet-121 (checked at
    # 224x224 above) only in their table (growth rate, block depths), and the layers'
    # arithmetic does not depend on the size; a float64 224x224 pass of each cost a minute
    # of the suite.
    ref = reference(name)
    odd = parity.check_eval(name, ref, (61, 77), batch=1)
    print(odd.line())
    assert_parity(odd)


def test_densenet121_train_parity(densenet121_ref):
    errors = parity.check_train("densenet121", densenet121_ref, (64, 64), batch=2)
    print(errors)
    assert max(errors.values()) <= 1e-9, errors


def old_spelling(key):
    """torchvision's original checkpoint keys: ...denselayer1.norm.1.weight."""
    return re.sub(r"(\.denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


def test_old_key_spelling_is_accepted(densenet121_ref):
    state = {k: v.numpy() for k, v in densenet121_ref.state_dict().items()}
    old = {old_spelling(k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.running_var" in old
    assert "features.denseblock1.denselayer1.conv.2.weight" in old
    new_vars = jaxconv.from_torchvision("densenet121", state)
    old_vars = jaxconv.from_torchvision("densenet121", old)
    assert jax.tree.structure(new_vars) == jax.tree.structure(old_vars)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_vars), jax.tree.leaves(old_vars)))
    # both spellings of one tensor at once is an error, not a silent choice
    both = dict(state)
    both["features.denseblock1.denselayer1.norm.1.weight"] = state["features.denseblock1.denselayer1.norm1.weight"]
    with pytest.raises(jaxconv.MappingError):
        jaxconv.from_torchvision("densenet121", both)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_torchvision(name):
    torch_model = parity.torchvision_model(name)
    expected = sum(p.numel() for p in torch_model.parameters())
    model = jaxconv.get_model(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == expected
    buffers = sum(b.numel() for k, b in torch_model.state_dict().items() if "running" in k)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["batch_stats"])) == buffers


def test_memory_efficient_has_the_same_variables():
    shapes = [jax.eval_shape(lambda: jaxconv.get_model("densenet121", memory_efficient=lean).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))) for lean in (False, True)]
    assert jax.tree.map(lambda s: s.shape, shapes[0]) == jax.tree.map(lambda s: s.shape, shapes[1])


def test_memory_efficient_is_rematerialised_and_exact():
    # a small DenseNet: the same logits, gradients and running statistics with and
    # without jax.checkpoint, which shows up in the gradient's program
    kw = dict(growth_rate=4, block_config=(2,), num_init_features=8, num_classes=5,
              dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)))
        plain, lean = DenseNet(**kw), DenseNet(memory_efficient=True, **kw)
        variables = jax.jit(plain.init)(jax.random.key(0), x)

        def grads(model):
            def loss(params):
                out, updates = model.apply({**variables, "params": params}, x, train=True,
                                           mutable=["batch_stats"])
                return jnp.sum(out * jnp.arange(5.0)), updates
            return jax.grad(loss, has_aux=True)

        (g0, u0) = jax.jit(grads(plain))(variables["params"])
        (g1, u1) = jax.jit(grads(lean))(variables["params"])
        for a, b in zip(jax.tree.leaves((g0, u0)), jax.tree.leaves((g1, u1))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert "remat" in str(jax.make_jaxpr(grads(lean))(variables["params"]))
        assert "remat" not in str(jax.make_jaxpr(grads(plain))(variables["params"]))
