"""Each torch-compatibility layer against torch's own module, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxconv import layers
from jaxconv.parity import rel_err


def run(layer, x_nhwc, train=False, variables=None):
    with jax.enable_x64(True):
        x = jnp.asarray(x_nhwc)
        variables = variables or layer.init(jax.random.key(0), x)
        return np.asarray(layer.apply(variables, x, train=train))


def torch_run(module, x_nhwc):
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return y.numpy().transpose(0, 2, 3, 1)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("size", [7, 8, 13, 14, 15, 112])
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(size, k, s, p, ceil_mode):
    x = rand(2, size, size + 3, 3)
    ref = torch_run(torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x)
    out = run(layers.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_ceil_mode_changes_the_output_size():
    # 112 -> 55 with floor, 56 with ceil (GoogLeNet's first pool): a port without
    # ceil_mode gets the shape wrong.
    x = rand(1, 112, 112, 1)
    assert run(layers.MaxPool2d(3, 2, ceil_mode=False), x).shape[1] == 55
    assert run(layers.MaxPool2d(3, 2, ceil_mode=True), x).shape[1] == 56


@pytest.mark.parametrize("size", [7, 8, 13, 14])
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_matches_torch(size, k, s, p, ceil_mode, count_include_pad):
    x = rand(2, size, size + 1, 2)
    ref = torch_run(torch.nn.AvgPool2d(k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad), x)
    out = run(layers.AvgPool2d(k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad), x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-14


@pytest.mark.parametrize("in_hw,out_hw", [((6, 6), (6, 6)), ((13, 13), (6, 6)), ((14, 7), (7, 7)),
                                          ((5, 9), (7, 7)), ((1, 1), (6, 6)), ((3, 4), (6, 6)),
                                          ((224, 97), (7, 7)), ((10, 10), (3, 4))])
def test_adaptive_avg_pool_matches_torch(in_hw, out_hw):
    x = rand(2, *in_hw, 3)
    ref = torch_run(torch.nn.AdaptiveAvgPool2d(out_hw), x)
    out = run(layers.AdaptiveAvgPool2d(out_hw), x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-14


@pytest.mark.parametrize("k,s,p,d,g", [(3, 1, 1, 1, 1), (11, 4, 2, 1, 1), (3, 2, 1, 1, 4), (3, 1, 2, 2, 1),
                                       (3, 2, 1, 1, 8), (1, 1, 0, 1, 2), ((1, 7), 1, (0, 3), 1, 1)])
def test_conv_matches_torch(k, s, p, d, g):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, k, s, p, dilation=d, groups=g).double()
    x = rand(2, 19, 23, 8)
    ref = torch_run(conv, x)
    mine = layers.Conv2d(16, k, s, p, dilation=d, groups=g, dtype=jnp.float64, param_dtype=jnp.float64)
    variables = {"params": {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                            "bias": conv.bias.detach().numpy()}}
    out = run(mine, x, variables=variables)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-13


def test_conv_rejects_bad_groups_and_tiny_input():
    with pytest.raises(ValueError, match="groups"):
        run(layers.Conv2d(16, 3, groups=3), rand(1, 8, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        run(layers.Conv2d(4, 5), rand(1, 3, 3, 2))
    with pytest.raises(ValueError, match="too small"):
        run(layers.MaxPool2d(3, 2), rand(1, 2, 2, 2))


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.03])
def test_batchnorm_train_and_eval_match_torch(momentum):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    state = {k: v.numpy().copy() for k, v in bn.state_dict().items()}
    variables = {"params": {"scale": state["weight"], "bias": state["bias"]},
                 "batch_stats": {"mean": state["running_mean"], "var": state["running_var"]}}
    mine = layers.BatchNorm2d(eps=1e-3, momentum=1 - momentum, dtype=jnp.float64, param_dtype=jnp.float64)
    x = rand(3, 4, 5, 5) * 3 + 1
    bn.eval()
    assert rel_err(run(mine, x, variables=variables), torch_run(bn, x)) <= 1e-14
    bn.train()
    ref = torch_run(bn, x)  # updates running stats with the unbiased variance
    with jax.enable_x64(True):
        out, updates = mine.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    assert rel_err(out, ref) <= 1e-13
    assert rel_err(updates["batch_stats"]["mean"], bn.running_mean.numpy()) <= 1e-14
    assert rel_err(updates["batch_stats"]["var"], bn.running_var.numpy()) <= 1e-14


def test_batchnorm_refuses_a_single_value_per_channel_in_training():
    bn = layers.BatchNorm2d()
    x = jnp.ones((1, 1, 1, 3))
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_default_init_is_torchs():
    # torch's default Conv2d/Linear init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
    conv = layers.Conv2d(64, 3)
    v = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 32)))["params"]
    bound = 1 / np.sqrt(32 * 9)
    for leaf in (v["kernel"], v["bias"]):
        assert np.abs(leaf).max() <= bound
        assert np.abs(leaf).max() > 0.9 * bound
