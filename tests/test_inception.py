"""GoogLeNet and Inception-v3 against torchvision, by the parity protocol of shared/DESIGN.md."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxconv
from jaxconv import parity
from jaxconv.models.googlenet import GoogLeNetOutputs, googlenet_loss
from jaxconv.models.inception import InceptionOutputs, inception_v3_loss

GOOGLENET_ODD = (99, 131)     # every ceil-mode pool gives a bigger map than floor mode would
INCEPTION_ODD = (139, 163)


def torch_reference(name, calibration, **kwargs):
    """torchvision's model with random weights, randomised biases/BatchNorm affine and
    calibrated running statistics (one train-mode pass: Inception-v3's auxiliary head
    needs 299x299 in train mode, so calibration is at full size and kept to one pass)."""
    torch.manual_seed(0)
    model = parity.torchvision_model(name, init_weights=False, **kwargs).double()
    parity.randomize(model)
    parity.calibrate_batchnorm(model, calibration, passes=1)
    return model


@pytest.fixture(scope="module")
def googlenet_ref():
    return torch_reference("googlenet", (2, 3, 96, 96))


@pytest.fixture(scope="module")
def inception_ref():
    return torch_reference("inception_v3", (2, 3, 299, 299))


def assert_parity(result, min_layers):
    where, worst = result.worst_intermediate
    assert result.f64_logits <= 1e-9, result.line()
    assert worst <= 1e-9, f"first bad layer {where}: {result.line()}"
    assert result.f32_jax <= result.f32_bound, result.line()
    assert len(result.f64_intermediates) >= min_layers, result.line()  # the comparison really ran


def param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def jax_param_count(name, **overrides):
    model = jaxconv.get_model(name, **overrides)
    h, w, c = jaxconv.model_info(name).input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
    return param_count(shapes["params"])


# ----------------------------------------------------------------------------- GoogLeNet

def with_transform_input(torch_model):
    model = copy.deepcopy(torch_model)
    model.transform_input = True
    return model


@pytest.fixture(scope="module")
def googlenet_eval(googlenet_ref):
    """Eval parity at 224 (transform_input off, torchvision's default) and at an odd
    size with transform_input on both sides (how torchvision runs its ImageNet weights)."""
    return [parity.check_eval("googlenet", googlenet_ref, (224, 224), batch=1),
            parity.check_eval("googlenet", with_transform_input(googlenet_ref), GOOGLENET_ODD, batch=1,
                              overrides={"transform_input": True})]


def test_googlenet_eval_parity(googlenet_eval):
    # 195 named layers compared (convs, BatchNorms, pools, inception modules)
    for result in googlenet_eval:
        print(result.line())
        assert_parity(result, min_layers=150)


def test_googlenet_train_parity_with_aux_heads(googlenet_ref):
    # batch statistics, both auxiliary heads (torchvision's order: logits, aux2, aux1),
    # the updated running statistics and every parameter's gradient (through the held
    # gradient sums at each inception module's input, layers.fan_out); dropout off on both sides
    errors = parity.check_train("googlenet", googlenet_ref, (96, 96), batch=2,
                                overrides={"dropout_aux": 0.0}, grads=True)
    print(errors)
    assert {"logits", "aux_1", "aux_2", "running_stats", "loss"} <= set(errors)
    assert sum(k.startswith("grad:") for k in errors) > 100
    assert max(errors.values()) <= 1e-9, errors


def test_googlenet_outputs_by_mode():
    model = jaxconv.get_model("googlenet")
    x = jnp.zeros((2, 96, 96, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert "aux1" in variables["params"] and "aux2" in variables["params"]
    eval_out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert eval_out.shape == (2, 1000)
    train_out = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                     rngs={"dropout": jax.random.key(0)})[0], variables)
    assert isinstance(train_out, GoogLeNetOutputs) and all(o.shape == (2, 1000) for o in train_out)
    plain = jaxconv.get_model("googlenet", aux_logits=False)
    pv = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))
    assert "aux1" not in pv["params"]
    out = jax.eval_shape(lambda v: plain.apply(v, x, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": jax.random.key(0)})[0], pv)
    assert out.shape == (2, 1000)


def test_googlenet_ceil_mode_pools(googlenet_ref):
    # At 99x131 each of torchvision's ceil-mode pools gives a bigger map than floor mode
    # would (the negative control below); the maps must have torchvision's shapes.
    h, w = GOOGLENET_ODD
    x = np.zeros((1, h, w, 3))
    model = jaxconv.get_model("googlenet")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    ours = jax.eval_shape(lambda v: jaxconv.intermediates(model, v, jnp.asarray(x, jnp.float32)), variables)
    pools = ["maxpool1", "maxpool2", "maxpool3", "maxpool4", "inception4a.branch4.0"]
    theirs = parity.torch_intermediates(googlenet_ref.eval(), torch.zeros((1, 3, h, w), dtype=torch.float64), pools)
    path = {"inception4a.branch4.0": "inception4a/branch4_0"}
    for name in pools:
        assert tuple(ours[path.get(name, name)].shape) == theirs[name].shape, name
    floor = copy.deepcopy(googlenet_ref)
    for m in floor.modules():
        if isinstance(m, torch.nn.MaxPool2d):
            m.ceil_mode = False
    floor_maps = parity.torch_intermediates(floor, torch.zeros((1, 3, h, w), dtype=torch.float64), pools)
    for name in pools[:4]:
        assert floor_maps[name].shape != theirs[name].shape, name


def test_googlenet_transform_input(googlenet_ref, googlenet_eval):
    # torchvision's weights run with transform_input=True: the registry says so
    assert jaxconv.model_info("googlenet").weights_options == {"transform_input": True}
    # the negative control: the transform changes torch's logits by far more than 1e-9,
    # so the odd-size parity check (run with it on both sides) fails without it
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64)))
    with torch.no_grad():
        difference = parity.rel_err(googlenet_ref.eval()(x).numpy(),
                                    with_transform_input(googlenet_ref).eval()(x).numpy())
    assert difference > 1e-3
    assert googlenet_eval[1].f64_logits <= 1e-9, googlenet_eval[1].line()


def test_googlenet_loss():
    # the paper's loss: CE(main) + 0.3 CE(aux1) + 0.3 CE(aux2), against torch's cross_entropy
    rng = np.random.default_rng(0)
    logits, aux2, aux1 = (rng.standard_normal((4, 7)) * 3 for _ in range(3))
    labels = rng.integers(0, 7, 4)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    ce = torch.nn.functional.cross_entropy
    expected = (ce(t(logits), t(labels)) + 0.3 * ce(t(aux1), t(labels)) + 0.3 * ce(t(aux2), t(labels))).item()
    with jax.enable_x64(True):
        outputs = GoogLeNetOutputs(*(jnp.asarray(a) for a in (logits, aux2, aux1)))
        assert abs(float(googlenet_loss(outputs, jnp.asarray(labels))) - expected) <= 1e-12 * abs(expected)
        # eval-mode output (logits only): the plain cross-entropy
        plain = ce(t(logits), t(labels)).item()
        assert abs(float(googlenet_loss(jnp.asarray(logits), jnp.asarray(labels))) - plain) <= 1e-12 * plain
        # one-hot targets give the same loss as integer labels
        onehot = jax.nn.one_hot(labels, 7, dtype=jnp.float64)
        assert abs(float(googlenet_loss(outputs, onehot)) - expected) <= 1e-12 * abs(expected)
        # Inception-v3: torchvision's recipe weights AuxLogits by 0.4
        inc = (ce(t(logits), t(labels)) + 0.4 * ce(t(aux1), t(labels))).item()
        got = inception_v3_loss(InceptionOutputs(jnp.asarray(logits), jnp.asarray(aux1)), jnp.asarray(labels))
        assert abs(float(got) - inc) <= 1e-12 * inc
    with pytest.raises(ValueError, match="labels"):
        googlenet_loss(outputs, jnp.zeros((4, 7, 1)))


# ----------------------------------------------------------------------------- Inception-v3

@pytest.fixture(scope="module")
def inception_eval(inception_ref):
    """299 with transform_input off; an odd size (torchvision's minimum is 75x75) with it on."""
    return [parity.check_eval("inception_v3", inception_ref, (299, 299), batch=1),
            parity.check_eval("inception_v3", with_transform_input(inception_ref), INCEPTION_ODD, batch=1,
                              overrides={"transform_input": True})]


def test_inception_v3_eval_parity(inception_eval):
    for result in inception_eval:
        print(result.line())
        assert_parity(result, min_layers=250)


def test_inception_v3_train_parity_with_aux_logits(inception_ref):
    # AuxLogits needs a 299x299 input in train mode (its 5x5 conv on a 5x5 map)
    errors = parity.check_train("inception_v3", inception_ref, (299, 299), batch=2)
    print(errors)
    assert set(errors) == {"logits", "aux_1", "running_stats"}
    assert max(errors.values()) <= 1e-9, errors


def test_inception_v3_transform_input(inception_ref, inception_eval):
    assert jaxconv.model_info("inception_v3").weights_options == {"transform_input": True}
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 75, 75)))
    with torch.no_grad():
        difference = parity.rel_err(inception_ref.eval()(x).numpy(),
                                    with_transform_input(inception_ref).eval()(x).numpy())
    assert difference > 1e-3
    assert inception_eval[1].f64_logits <= 1e-9, inception_eval[1].line()


# ----------------------------------------------------------------------------- both

@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
@pytest.mark.parametrize("aux_logits", [True, False])
def test_parameter_count_equals_torchvision(name, aux_logits):
    torch_model = parity.torchvision_model(name, aux_logits=aux_logits, init_weights=False)
    expected = sum(p.numel() for p in torch_model.parameters())
    assert jax_param_count(name, aux_logits=aux_logits) == expected
    buffers = sum(b.numel() for k, b in torch_model.state_dict().items() if "running" in k)
    model = jaxconv.get_model(name, aux_logits=aux_logits)
    h, w, c = jaxconv.model_info(name).input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
    assert param_count(shapes["batch_stats"]) == buffers


def test_inputs_are_checked():
    model = jaxconv.get_model("googlenet")
    with pytest.raises(ValueError, match="NCHW"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3, 224, 224))))
    model = jaxconv.get_model("inception_v3")
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((299, 299, 3))))


def test_init_is_torchvisions_truncated_normal():
    # torchvision's init_weights: trunc_normal_(std, a=-2, b=2) with *absolute* bounds;
    # at std=1 the cut is visible: compare moments and bounds with torch's own sampler
    from jaxconv.layers import torch_trunc_normal

    ours = np.asarray(torch_trunc_normal(1.0)(jax.random.key(0), (200_000,)))
    theirs = torch.nn.init.trunc_normal_(torch.empty(200_000), std=1.0, a=-2, b=2).numpy()
    assert ours.min() >= -2 and ours.max() <= 2
    assert abs(ours.std() - theirs.std()) < 0.01 and abs(ours.mean()) < 0.01
    small = np.asarray(torch_trunc_normal(0.01)(jax.random.key(1), (200_000,)))
    assert abs(small.std() - 0.01) < 2e-4  # at std 0.01 the +-2 bounds cut nothing
