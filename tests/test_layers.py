"""Each torch-compatibility layer against torch's own module, in float64."""
import re

import jax
import jax.numpy as jnp
from jax import lax
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
@pytest.mark.parametrize("channels", [3, 12])   # XLA's reduce-window and, on CPU, the chain of maxima
def test_max_pool_matches_torch(size, k, s, p, ceil_mode, channels):
    x = rand(2, size, size + 3, channels)
    ref = torch_run(torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x)
    out = run(layers.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("size", [7, 8, 24])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 3, 0), (3, 2, 1), (3, 1, 1)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_gradient_matches_torch_with_ties(size, k, s, p, ceil_mode):
    # small integers tie in most windows: the gradient must go to the same (first) maximum as torch's
    x = np.random.default_rng(size).integers(-2, 3, size=(2, size, size + 3, 3)).astype(np.float64)
    layer = layers.MaxPool2d(k, s, p, ceil_mode=ceil_mode)
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda v: layer.apply({}, v), jnp.asarray(x))
        g = np.random.default_rng(1).standard_normal(y.shape)
        grad = np.asarray(vjp(jnp.asarray(g))[0])
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
    torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode)(xt).backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), torch_run(torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x))
    np.testing.assert_array_equal(grad, xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (5, 2, 2)])
def test_max_pool_gradient_never_goes_to_padding(k, s, p):
    # windows whose only values are -inf: torch sends the gradient to the window's first
    # element inside the input, never to the padding (which is also -inf)
    x = rand(1, 6, 7, 2)
    x[0, :3, :3] = -np.inf
    x[0, 4:, 5:, 1] = -np.inf
    layer = layers.MaxPool2d(k, s, p, ceil_mode=True)
    y, vjp = jax.vjp(lambda v: layer.apply({}, v), jnp.asarray(x, jnp.float32))
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().requires_grad_()
    torch.nn.MaxPool2d(k, s, p, ceil_mode=True)(xt).backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (2, 2, 0)])
def test_max_pool_gradient_goes_to_the_last_nan_as_torchs(k, s, p):
    # a window whose maximum is NaN: torch's output is NaN and its gradient goes to the
    # window's last NaN
    x = rand(2, 7, 9, 3)
    x[0, 1, 1:4] = np.nan
    x[1, 4:6, 2, 1] = np.nan
    x[1, 0, 0, 2] = np.nan
    layer = layers.MaxPool2d(k, s, p)
    y, vjp = jax.vjp(lambda v: layer.apply({}, v), jnp.asarray(x, jnp.float32))
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().requires_grad_()
    yt = torch.nn.MaxPool2d(k, s, p)(xt)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("k,s,p,ceil_mode", [(3, 2, 1, False), (2, 2, 0, False), (3, 2, 0, True), (3, 1, 1, True),
                                         (5, 3, 2, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_output_with_nan_and_infinities_matches_torch(k, s, p, ceil_mode, dtype):
    # the output alone (no gradient), with 12 channels the chain of maxima on CPU: a window
    # holding a NaN gives NaN, one of -inf only gives -inf, +inf wins
    x = rand(2, 13, 16, 12).astype(dtype)
    x[0, 1, 1:4, 3] = np.nan
    x[1, 4:6, 2, 10] = np.nan
    x[0, :4, :4, 5] = -np.inf
    x[1, 7, 7, :] = np.inf
    layer = layers.MaxPool2d(k, s, p, ceil_mode=ceil_mode)
    with jax.enable_x64(dtype == np.float64):
        y = np.asarray(jax.jit(lambda v: layer.apply({}, v))(jnp.asarray(x)))
    ref = torch_run(torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode), x)
    assert y.dtype == dtype and np.isnan(ref).any() and np.isneginf(ref).any()
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("channels,chain", [(8, False), (9, True), (64, True)])
def test_max_pool_output_is_a_chain_of_maxima_on_cpu_from_9_channels(channels, chain):
    # XLA:CPU's reduce-window takes 2-8x the time of an elementwise chain over the taps
    # (VGG-16's first pool at batch 16: 87 against 22 ms), except with few channels
    pool = layers.MaxPool2d(3, 2, 1)
    forward = jax.jit(lambda a: pool.apply({}, a)).trace(jnp.zeros((2, 9, 9, channels)))
    cpu, cuda = (forward.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    assert "reduce_window" in cuda
    assert ("reduce_window" in cpu) is not chain
    if chain:   # one per tap after the first
        assert cpu.count("stablehlo.maximum") == 8


@pytest.mark.parametrize("what,stride,padded_copy", [
    ("depthwise", 2, False), ("depthwise", 1, True), ("grouped", 2, True), ("pool", 2, False), ("pool", 1, True)])
def test_strided_depthwise_convolution_and_max_pool_pad_each_tap_on_cpu(what, stride, padded_copy):
    # strided, each tap reads a fraction of the input: padding each tap's own slice inside
    # the loop that reads it beats writing a padded copy of the input (EfficientNet-B0's
    # 3x3 stride-2 depthwise layer at batch 16: 61 -> 31 ms; ResNet's stem pool 20 -> 3 ms)
    x = jnp.zeros((2, 9, 9, 16))
    if what == "pool":
        forward = jax.jit(lambda a: layers.MaxPool2d(3, stride, 1).apply({}, a))
    else:
        kernel = jnp.ones((3, 3, 1 if what == "depthwise" else 4, 16))
        groups = 16 if what == "depthwise" else 4
        forward = jax.jit(lambda a: layers.convolve(a, kernel, (stride, stride), ((1, 1), (1, 1)), groups=groups))
    cpu = forward.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    assert ("-> tensor<2x11x11x16xf32>" in cpu) is padded_copy


@pytest.mark.parametrize("k,s,p,ceil_mode", [(3, 2, 1, False), (2, 2, 0, False), (3, 2, 0, True), (3, 1, 1, True)])
def test_max_pool_forward_mode_takes_the_tangent_at_torchs_argmax(k, s, p, ceil_mode):
    # jax.jvp works through the pool: the output tangent is the input tangent at the
    # maximum that torch's return_indices names (ties included)
    x = np.random.default_rng(2).integers(-2, 3, size=(2, 9, 11, 3)).astype(np.float32)
    dx = rand(2, 9, 11, 3).astype(np.float32)
    layer = layers.MaxPool2d(k, s, p, ceil_mode=ceil_mode)
    _, dy = jax.jvp(lambda v: layer.apply({}, v), (jnp.asarray(x),), (jnp.asarray(dx),))
    _, index = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), k, s, p,
                                              ceil_mode=ceil_mode, return_indices=True)
    flat = dx.transpose(0, 3, 1, 2).reshape(2, 3, -1)
    expected = np.take_along_axis(flat, index.numpy().reshape(2, 3, -1), axis=2).reshape(index.shape)
    np.testing.assert_array_equal(np.asarray(dy), expected.transpose(0, 2, 3, 1))


def test_max_pool_gradient_is_select_and_scatter_off_cpu_only():
    # XLA:CPU's select-and-scatter is slow; on CPU the output and the first maximum's index
    # come from one chain of selects over the taps (no reduce-window, score stack or argmax),
    # and the gradient is the taps' selects and pads
    pool = layers.MaxPool2d(3, 2, 1)
    x = jnp.zeros((2, 9, 9, 4))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(pool.apply({}, a) ** 2))).trace(x)
    cpu, cuda = (grad.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    assert "select_and_scatter" in cuda and "reduce_window" in cuda
    assert "select_and_scatter" not in cpu and "reduce_window" not in cpu
    assert "stablehlo.reduce" not in cpu    # the old index: an argmax over the stacked scores


@pytest.mark.parametrize("k,s,held", [(3, 2, 1), (2, 2, 0)])
def test_overlapping_max_pool_gradient_reads_a_held_output_gradient_on_cpu(k, s, held):
    # an overlapping pool's gradient is one pad per shift of its windows (4 for 3x3 stride
    # 2), each reading the output's gradient; that gradient goes through a conditional so
    # XLA computes it once, not once per shift (DenseNet-121: the first block's six
    # BatchNorm gradients, four times over); a pool whose kernel is its stride has one.
    # The first maximum's index goes through one too (else XLA runs the chain of selects
    # inside each shift's pad)
    pool = layers.MaxPool2d(k, s)
    grad = jax.grad(lambda a, b: jnp.sum(pool.apply({}, a) * jnp.tanh(b)), argnums=0)
    x = jnp.zeros((2, 9, 9, 4))
    hlo = jax.jit(grad).lower(x, jnp.zeros((2, 4, 4, 4))).compile().as_text()
    assert hlo.count("conditional(") == held + 1
    # an empty batch has nothing to hold, and its gradient is empty
    assert jax.jit(grad)(jnp.zeros((0, 9, 9, 4)), jnp.zeros((0, 4, 4, 4))).shape == (0, 9, 9, 4)


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


@pytest.mark.parametrize("shape", [(2, 7, 7, 40), (1, 1, 1, 3), (3, 5, 9, 2)])
def test_global_avg_pool_in_float32_matches_torch_with_its_gradient(shape):
    # on CPU the float32 means are a product with ones; their gradient a broadcast
    x = rand(*shape).astype(np.float32)
    g = rand(shape[0], shape[-1], seed=1).astype(np.float32)
    pool = layers.AdaptiveAvgPool2d((1, 1))
    y, vjp = jax.vjp(jax.jit(lambda v: pool.apply({}, v)), jnp.asarray(x))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    yt = torch.nn.AdaptiveAvgPool2d((1, 1))(xt)
    yt.backward(torch.from_numpy(g[:, :, None, None].copy()))
    assert y.shape == (shape[0], 1, 1, shape[-1])
    exact = torch_run(torch.nn.AdaptiveAvgPool2d((1, 1)), x.astype(np.float64))
    assert rel_err(np.asarray(y), exact) <= 4 * rel_err(yt.detach().numpy().transpose(0, 2, 3, 1), exact) + 1e-6
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g[:, None, None, :]))[0]),
                               xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6)
    flat = np.asarray(jax.jit(layers.global_avg_pool)(jnp.asarray(x)))      # DenseNet's and NiN's call
    assert rel_err(flat, exact[:, 0, 0]) <= 4 * rel_err(yt.detach().numpy()[:, :, 0, 0], exact[:, 0, 0]) + 1e-6
    _, dy = jax.jvp(layers.global_avg_pool, (jnp.asarray(x),), (jnp.asarray(x),))
    np.testing.assert_allclose(np.asarray(dy), exact[:, 0, 0], rtol=1e-6, atol=1e-6)


def test_global_avg_pool_is_a_product_on_cpu_and_its_gradient_a_broadcast():
    # XLA:CPU's reduction over the middle axes reads along rows, with the producing
    # BatchNorms, additions and ReLUs fused in (ResNet-50, batch 16: 7.8 against 3.1 ms)
    x = jnp.zeros((2, 7, 7, 16))
    forward = jax.jit(layers.global_avg_pool).trace(x)
    gradient = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(layers.global_avg_pool(a))))).trace(x)
    cpu, cuda = (forward.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    assert "dot_general" in cpu and "stablehlo.reduce" not in cpu
    assert "dot_general" not in cuda and "stablehlo.reduce" in cuda
    assert gradient.lower(lowering_platforms=("cpu",)).as_text().count("dot_general") == 1   # the forward's


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


def test_a_parameter_of_the_wrong_shape_is_named_in_the_error():
    conv = layers.Conv2d(8, 3)
    x = jnp.zeros((1, 9, 9, 4))
    variables = conv.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].shape == (3, 3, 4, 8)
    wrong = {"params": {**variables["params"], "kernel": jnp.zeros((5, 5, 4, 8))}}
    with pytest.raises(ValueError, match=r"kernel has shape \(5, 5, 4, 8\); the module needs \(3, 3, 4, 8\)"):
        conv.apply(wrong, x)


@pytest.mark.parametrize("cin,cout,groups,k,s,p,d", [
    (1, 6, 1, 5, 1, 0, 1), (1, 6, 1, 3, 2, 1, 1), (1, 6, 1, 3, 1, 2, 2), (1, 6, 1, 4, 3, (1, 2), 1),  # one channel
    (32, 32, 8, 3, 1, 1, 1), (32, 64, 8, 3, 2, 1, 1),      # ResNeXt-style groups of 4 channels: tap sum
    (64, 64, 4, 3, 2, 1, 1), (64, 64, 4, 3, 1, 1, 1),      # 16 channels a group: XLA's forward on pairs
    (48, 48, 3, 3, 1, 2, 2), (64, 64, 2, 3, 2, 1, 1),      # ... an odd number of groups; 32 a group: unpaired
    (24, 24, 24, 5, 2, 2, 1), (16, 32, 16, 3, 1, 1, 1),    # depthwise, and with a multiplier of 2
    (8, 8, 8, 3, 1, 3, 1), (12, 12, 4, (3, 1), (2, 1), (1, 0), 1),  # padding beyond the kernel; 3x1
    (4, 8, 4, 2, 4, 0, 1),                                 # stride beyond the kernel: rows no tap meets
    (16, 24, 1, 1, 1, 0, 1), (16, 24, 1, 1, 2, 0, 1), (16, 24, 1, 1, (2, 3), 0, 1),  # 1x1: dot gradients
    (16, 24, 1, 1, 1, 1, 1),                               # padded 1x1: XLA's convolution
    (16, 24, 1, 3, 1, 1, 1), (16, 24, 1, 3, 2, 1, 1), (3, 8, 1, 7, 2, 3, 1),  # dense
    (8, 8, 1, 3, 1, 2, 2), (6, 16, 1, 5, 1, 0, 1), (3, 5, 1, (5, 3), 1, (2, 0), 1),  # dense, im2col input gradient
    (6, 8, 1, 7, 1, 0, 1), (4, 8, 1, 5, 1, 1, 2), (3, 5, 1, (3, 7), 1, (1, 0), 1),  # ... banded rows, forward too
    (12, 8, 1, 5, (3, 2), (3, 1), 1), (12, 8, 1, 2, 2, 0, 1),  # strided, 9+ input channels: phased input gradient
    (12, 8, 1, 1, 2, 1, 1), (12, 8, 1, 2, 4, 0, 1),        # ... phases no tap reaches (padded 1x1; stride > kernel)
    (12, 8, 1, 3, 2, 2, 2),                                # strided and dilated: XLA's
])
def test_cpu_convolution_paths_and_their_gradients_match_torch_in_float32(cin, cout, groups, k, s, p, d):
    # float32 grouped, depthwise and one-input-channel convolutions take layers.convolve's
    # CPU path (tap sums and their own gradients), unpadded 1x1 ones dots for their gradients;
    # dense stride-1 ones with at most 8 input channels take the input's gradient from im2col,
    # or from banded rows where the input is at most BANDED_MAX_WIDTH_RATIO x the kernel's span
    # wide, and then their forward as well (banded rows in pieces of 2, 7 and 2 columns here)
    rng = np.random.default_rng(cin + cout + groups)
    x = rng.standard_normal((3, 17, 20, cin)).astype(np.float32)
    conv = layers.Conv2d(cout, k, stride=s, padding=p, dilation=d, groups=groups)
    variables = conv.init(jax.random.key(0), jnp.asarray(x))
    y, vjp = jax.jit(lambda v, a: jax.vjp(lambda v, a: conv.apply(v, a), v, a))(variables, jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dv, dx = vjp(jnp.asarray(g))

    t = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        t.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"])))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).astype(np.float64)))
    assert y.shape == yt.shape[:1] + yt.shape[2:] + yt.shape[1:2]
    assert rel_err(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1)) < 1e-5
    assert rel_err(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-5
    assert rel_err(np.asarray(dv["params"]["kernel"]), t.weight.grad.numpy().transpose(2, 3, 1, 0)) < 1e-5
    assert rel_err(np.asarray(dv["params"]["bias"]), t.bias.grad.numpy()) < 1e-5


def _lowered_gradient(conv, x, platform):
    variables = conv.init(jax.random.key(0), x)
    loss = jax.grad(lambda v, a: jnp.sum(conv.apply(v, a) ** 2), argnums=(0, 1))
    return jax.jit(loss).trace(variables, x).lower(lowering_platforms=(platform,)).as_text()


def test_grouped_convolution_is_xlas_own_off_cpu():
    # the tap sum and custom gradient are for XLA:CPU only; lowered for a GPU, a grouped
    # convolution and its gradient are XLA's convolutions (no tap sum's multiplies)
    conv = layers.Conv2d(32, 3, padding=1, groups=8, use_bias=False)
    x = jnp.zeros((2, 9, 9, 32))
    cuda, cpu = _lowered_gradient(conv, x, "cuda"), _lowered_gradient(conv, x, "cpu")
    assert "feature_group_count = 8" in cuda
    assert cuda.count("stablehlo.convolution") == 3   # forward, input and kernel gradients
    # on CPU the forward and the input gradient are tap sums (beside XLA's convolution in a
    # conditional's other branch): one multiply per tap and input channel, twice
    assert cpu.count("stablehlo.multiply") >= 2 * 9 * 4


@pytest.mark.parametrize("channels,groups,paired", [(64, 4, True), (48, 3, False), (64, 2, False), (32, 4, False)])
def test_groups_of_9_to_16_channels_run_in_pairs_on_cpu(channels, groups, paired):
    # an even number of groups of 9-16 channels: XLA's grouped convolution with half the
    # groups (a block-diagonal kernel) in a conditional whose other branch, for an input
    # that is not all finite, is the convolution as given; the input gradient too. Odd
    # groups, 32 channels a group (unpaired) and 8 (a tap sum) are not paired
    conv = layers.Conv2d(channels, 3, padding=1, groups=groups, use_bias=False)
    x = jnp.zeros((2, 9, 9, channels))
    cpu = _lowered_gradient(conv, x, "cpu")
    found = re.findall(r"feature_group_count = (\d+)", cpu)
    counts = {g: found.count(str(g)) for g in (groups, groups // 2)}
    if paired:
        # forward and input gradient both ways, and the kernel gradient (unpaired)
        assert counts == {groups: 3, groups // 2: 2}
    else:
        assert counts[groups // 2] == 0
    # off CPU: XLA's convolutions, unpaired
    assert re.findall(r"feature_group_count = (\d+)", _lowered_gradient(conv, x, "cuda")).count(str(groups)) == 2


@pytest.mark.parametrize("stride", [1, 2])
def test_paired_groups_keep_a_non_finite_input_in_its_own_group_as_torch(stride):
    # pairs multiply one group's inputs by the other group's zeros: a NaN or an infinity
    # there must not reach the other group's outputs, as it does not in torch
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 9, 9, 64)).astype(np.float32)
    x[0, 3, 3, 5] = np.nan
    x[1, 2, 2, 40] = np.inf
    conv = layers.Conv2d(64, 3, stride=stride, padding=1, groups=4, use_bias=False)
    variables = conv.init(jax.random.key(0), jnp.asarray(x))
    y = np.asarray(jax.jit(conv.apply)(variables, jnp.asarray(x)))
    kernel = torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy())
    yt = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), kernel, stride=stride,
                                    padding=1, groups=4).numpy().transpose(0, 2, 3, 1)
    assert np.isnan(yt).any() and not np.isnan(yt[..., 16:32]).any()   # groups 0 and 2 only
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt))
    finite = np.isfinite(yt)
    assert rel_err(y[finite], yt[finite]) < 1e-5


def test_pointwise_kernel_gradient_reads_both_operands_as_they_lie():
    # the 1x1 kernel gradient contracts input and gradient rows over their leading axis; as
    # the dot's transpose XLA:CPU read the gradient across, behind a transposed copy of it
    # (EfficientNet-B0's 16 -> 96 expansion at batch 32: 190 + 65 ms against 14)
    conv = layers.Conv2d(24, 1, use_bias=False)
    x, g, scale = jnp.zeros((4, 10, 10, 16)), jnp.zeros((4, 10, 10, 24)), jnp.zeros((24,))
    variables = conv.init(jax.random.key(0), x)
    gradients = jax.jit(lambda v, a, g, s: jax.vjp(conv.apply, v, a)[1](g * s + 1.0))
    hlo = gradients.lower(variables, x, g, scale).compile().as_text()
    kernel_dots = [line for line in hlo.splitlines() if " = f32[16,24]" in line and " dot(" in line]
    assert len(kernel_dots) == 1
    assert "lhs_contracting_dims={0}, rhs_contracting_dims={0}" in kernel_dots[0]


def test_pointwise_convolution_gradients_are_dots_on_cpu_only():
    # an unpadded 1x1 convolution's two gradients: dots on CPU (its forward stays XLA's
    # convolution), XLA's convolutions lowered for a GPU; a padded 1x1 convolution stays a
    # convolution everywhere
    x = jnp.zeros((2, 9, 9, 16))
    pointwise = layers.Conv2d(24, 1, stride=2, use_bias=False)
    cuda, cpu = _lowered_gradient(pointwise, x, "cuda"), _lowered_gradient(pointwise, x, "cpu")
    assert cuda.count("stablehlo.convolution") == 3 and "stablehlo.dot_general" not in cuda
    assert cpu.count("stablehlo.convolution") == 1 and cpu.count("stablehlo.dot_general") == 2
    padded = _lowered_gradient(layers.Conv2d(24, 1, padding=1, use_bias=False), x, "cpu")
    assert padded.count("stablehlo.convolution") == 3


@pytest.mark.parametrize("leading", [(5,), (1,), (2, 3)])
def test_linear_and_its_gradients_match_torch_in_float32(leading):
    # float32 Linear takes layers.dense (a 1x1 convolution on CPU, products for its gradients)
    rng = np.random.default_rng(len(leading))
    x = rng.standard_normal((*leading, 37)).astype(np.float32)
    linear = layers.Linear(11)
    variables = linear.init(jax.random.key(0), jnp.asarray(x))
    y, vjp = jax.jit(lambda v, a: jax.vjp(linear.apply, v, a))(variables, jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dv, dx = vjp(jnp.asarray(g))
    t = torch.nn.Linear(37, 11).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).T.copy()))
        t.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(g.astype(np.float64)))
    assert y.shape == yt.shape
    assert rel_err(np.asarray(y), yt.detach().numpy()) < 1e-5
    assert rel_err(np.asarray(dx), xt.grad.numpy()) < 1e-5
    assert rel_err(np.asarray(dv["params"]["kernel"]), t.weight.grad.numpy().T) < 1e-5
    assert rel_err(np.asarray(dv["params"]["bias"]), t.bias.grad.numpy()) < 1e-5


def test_dense_is_a_convolution_on_cpu_only_and_its_derivatives_are_products():
    x, w = jnp.zeros((16, 300)), jnp.zeros((300, 40))
    loss = jax.jit(jax.grad(lambda a, k: jnp.sum(jnp.sin(layers.dense(a, k))), argnums=(0, 1)))
    cpu = loss.trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
    cuda = loss.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    # the forward: XLA's convolution on CPU, a product elsewhere; both gradients: products
    assert cpu.count("stablehlo.convolution") == 1 and cpu.count("stablehlo.dot_general") == 2
    assert "stablehlo.convolution" not in cuda and cuda.count("stablehlo.dot_general") == 3
    # the gradient of the kernel alone computes no input gradient (a symbolic zero tangent)
    kernel_only = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(layers.dense(x, k)))))
    assert kernel_only.lower(w).as_text().count("stablehlo.dot_general") == 1
    # forward mode: the product rule
    rng = np.random.default_rng(0)
    a, k, da, dk = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 30), (30, 6), (4, 30), (30, 6)))
    _, tangent = jax.jvp(layers.dense, (a, k), (da, dk))
    assert rel_err(tangent, np.asarray(da, np.float64) @ np.asarray(k, np.float64)
                   + np.asarray(a, np.float64) @ np.asarray(dk, np.float64)) < 1e-5
    # other dtypes: a plain product
    with jax.enable_x64(True):
        f64 = jax.jit(layers.dense).lower(jnp.zeros((2, 3), jnp.float64), jnp.zeros((3, 4), jnp.float64)).as_text()
    assert "stablehlo.convolution" not in f64


def test_dense_convolution_kernel_gradient_reads_a_held_input_on_cpu():
    # the kernel term of a dense convolution's JVP reads its input through a conditional
    # (XLA cannot fuse the input's producer into the gradient's transposed copy): there when
    # the kernel is differentiated, absent when only the input is; and a tangent that is
    # symbolically zero costs no convolution (forward, and one gradient: two in all)
    conv = layers.Conv2d(8, 3, padding=1, use_bias=False)
    x = jnp.zeros((2, 9, 9, 16))     # more input channels than the im2col input gradient takes
    variables = conv.init(jax.random.key(0), x)
    for argnums, held, convolutions in [((0, 1), 1, 3), ((0,), 1, 2), ((1,), 0, 2)]:
        loss = jax.grad(lambda v, a: jnp.sum(conv.apply(v, a) ** 2), argnums=argnums)
        hlo = jax.jit(loss).lower(variables, x).compile().as_text()
        assert (hlo.count("conditional("), hlo.count("convolution(")) == (held, convolutions), argnums


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])   # (2, 2): the input gradient is a convolution
def test_dense_convolution_gradients_are_in_xla_cpus_order_inside_a_loop(stride):
    # XLA:CPU puts a convolution into its fast order -- input (batch, h, w, in), kernel (h, w,
    # in, out) -- only in a program's entry computation; inside a loop's body it ran
    # autodiff's order with a slow generic kernel (ResNet-18's step in a lax.scan: 30x). The
    # gradients are written in that order themselves, so in a loop every one has it.
    conv = layers.Conv2d(8, 3, stride=stride, padding=1)
    variables = conv.init(jax.random.key(0), jnp.zeros((2, 9, 9, 16)))
    grad = jax.grad(lambda v, a: jnp.sum(conv.apply(v, a) ** 2), argnums=(0, 1))

    def loop(v, xs):
        return lax.scan(lambda carry, a: (carry, grad(v, a)), 0, xs)[1]
    hlo = jax.jit(loop).lower(variables, jnp.zeros((3, 2, 9, 9, 16))).compile().as_text()
    assert "while(" in hlo
    labels = re.findall(r"dim_labels=([^,\s]+)", hlo)
    # stride 2: the input gradient is one stride-1 convolution per phase, the one-tap phase's
    # a 1x1 convolution that XLA makes a dot
    assert len(labels) == (3 if stride == (1, 1) else 5) and set(labels) == {"b01f_01io->b01f"}, labels


def test_dense_convolution_gradients_are_xlas_own_off_cpu():
    # the transposed operands of the gradients' native order are for XLA:CPU only: lowered
    # for a GPU, the forward and both gradients are XLA's convolutions without a transpose
    conv = layers.Conv2d(8, 3, stride=2, padding=1)
    x = jnp.zeros((2, 9, 9, 16))
    variables = conv.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda v, a: jnp.sum(conv.apply(v, a) ** 2), argnums=(0, 1))).trace(variables, x)
    cuda, cpu = (grad.lower(lowering_platforms=(p,)).as_text() for p in ("cuda", "cpu"))
    assert cuda.count("stablehlo.convolution") == 3 and "stablehlo.transpose" not in cuda
    assert "lhs_dilate = [2, 2]" in cuda
    # on CPU the input gradient is four phases' convolutions (below), none spread by the stride
    assert cpu.count("stablehlo.convolution") == 6 and "lhs_dilate = [2, 2]" not in cpu


@pytest.mark.parametrize("cin,stride,dilation,convolutions,dots", [
    (16, (2, 2), (1, 1), 3, 1),    # 3x3 stride 2: phases of 2, 2 and 4 taps, and one of 1 tap (a dot)
    (16, (3, 1), (1, 1), 3, 0),    # stride 3 down the rows only: three phases of 1x3 taps
    (8, (2, 2), (1, 1), 1, 0),     # at most 8 input channels: XLA's, the gradient spread by the stride
    (16, (2, 2), (2, 2), 1, 0),    # dilated: XLA's
])
def test_strided_convolution_input_gradient_is_phases_on_cpu(cin, stride, dilation, convolutions, dots):
    # XLA's input gradient of a strided convolution convolves the output gradient spread out
    # by the stride, zeros included; on CPU it is one stride-1 convolution per phase of the
    # input, none of them dilated, in XLA:CPU's own order
    conv = layers.Conv2d(8, 3, stride=stride, padding=1, dilation=dilation, use_bias=False)
    x = jnp.zeros((2, 12, 12, cin))
    variables = conv.init(jax.random.key(0), x)
    input_gradient = jax.grad(lambda a: jnp.sum(conv.apply(variables, a) ** 2))
    hlo = jax.jit(input_gradient).lower(x).compile().as_text()
    lines = [line for line in hlo.splitlines() if " convolution(" in line]     # the forward and the gradient's
    assert len(lines) == 1 + convolutions and hlo.count(" dot(") == dots
    assert sum("lhs_dilate" in line for line in lines) == (0 if convolutions > 1 else 1)
    assert all("b01f_01io->b01f" in line for line in lines)


@pytest.mark.parametrize("channels,groups", [(8, 8), (32, 8), (64, 4)])   # depthwise, tap sums, pairs
def test_strided_grouped_convolution_input_gradient_is_phases_on_cpu(channels, groups):
    # as a dense one's: the output gradient is not spread out by the stride (zeros between)
    # on CPU but convolved per phase of the input, each phase a grouped forward of its own
    conv = layers.Conv2d(channels, 3, stride=2, padding=1, groups=groups, use_bias=False)
    x = jnp.zeros((2, 12, 12, channels))
    variables = conv.init(jax.random.key(0), x)
    input_gradient = jax.grad(lambda a: jnp.sum(conv.apply(variables, a) ** 2))
    cpu, cuda = (jax.jit(input_gradient).trace(x).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    spread = "interior = [0, 1, 1, 0]"
    assert spread not in cpu and "lhs_dilate = [2, 2]" not in cpu
    assert "lhs_dilate = [2, 2]" in cuda
    # one conditional for the forward and one for each phase (a tap sum's or the pairs')
    assert cpu.count("stablehlo.case") == 5


@pytest.mark.parametrize("stride", [(2, 1), (1, 1)])   # (1, 1): the im2col input term
def test_dense_convolution_forward_mode_is_xlas(stride):
    # jax.jvp through the held kernel term: the same numbers as XLA's own convolution's JVP
    rng = np.random.default_rng(3)
    x, x_dot = (jnp.asarray(rng.standard_normal((2, 11, 10, 5)), jnp.float32) for _ in range(2))
    k, k_dot = (jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32) for _ in range(2))
    pads = ((1, 2), (0, 1))
    ours = jax.jit(lambda *a: jax.jvp(lambda x, k: layers.convolve(x, k, stride, pads), a[:2], a[2:]))
    xlas = jax.jit(lambda *a: jax.jvp(lambda x, k: layers._xla_conv(x, k, stride, pads, (1, 1)), a[:2], a[2:]))
    (y, y_dot), (y_ref, y_dot_ref) = ours(x, k, x_dot, k_dot), xlas(x, k, x_dot, k_dot)
    assert rel_err(np.asarray(y), np.asarray(y_ref)) < 1e-6
    assert rel_err(np.asarray(y_dot), np.asarray(y_dot_ref)) < 1e-6


_CONVOLUTION_KINDS = [   # x shape, kernel shape, stride, padding, groups
    ((2, 9, 8, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 0)), 1),   # dense: XLA's, terms in XLA:CPU's order
    ((2, 9, 8, 5), (3, 3, 5, 7), (1, 1), ((1, 2), (0, 1)), 1),      # dense, the banded-rows input term
    ((2, 9, 13, 5), (3, 3, 5, 7), (1, 1), ((1, 2), (0, 1)), 1),     # dense, the im2col input term
    ((2, 9, 8, 16), (1, 1, 16, 8), (2, 2), ((0, 0), (0, 0)), 1),    # 1x1: dot gradients
    ((2, 9, 8, 8), (3, 3, 1, 8), (2, 2), ((1, 1), (1, 1)), 8),      # depthwise: tap sums
    ((2, 9, 8, 8), (3, 3, 2, 8), (1, 1), ((1, 1), (1, 1)), 4),      # grouped: tap sums
    ((2, 9, 8, 32), (3, 3, 16, 32), (2, 2), ((1, 1), (0, 1)), 2),   # 16 channels a group: paired, phases
    ((2, 9, 8, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)), 1),      # one input channel: a tap sum
    ((2, 3, 3, 4), (1, 1, 1, 4), (10, 10), ((2, 0), (2, 0)), 4),    # depthwise, the one window all padding
]


@pytest.mark.parametrize("x_shape,kernel_shape,stride,pads,groups", _CONVOLUTION_KINDS)
def test_convolution_transformations_are_xlas(x_shape, kernel_shape, stride, pads, groups):
    # every CPU form of a float32 convolution under every transformation -- eager, forward
    # mode (grouped convolutions had none), reverse mode, forward over reverse, reverse over
    # reverse, vmap of the gradient -- is as close to the exact (float64) numbers as XLA's own
    # float32 convolution is: the two round differently, and through the sines of the second
    # derivatives each lands a few 1e-6 from the exact value (the pairs' on the AVX2 host)
    rng = np.random.default_rng(sum(kernel_shape))
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in (x_shape, x_shape, kernel_shape, kernel_shape)]

    def results(conv, dtype):
        x, x_dot, k, k_dot = (jnp.asarray(a, dtype) for a in inputs)
        loss = lambda a, b: jnp.sum(jnp.sin(conv(a, b)))     # noqa: E731
        grad = jax.grad(loss, argnums=(0, 1))
        return [conv(x, k),
                jax.jit(lambda *a: jax.jvp(conv, a[:2], a[2:])[1])(x, k, x_dot, k_dot),
                jax.jit(grad)(x, k),
                jax.jit(lambda *a: jax.jvp(grad, a[:2], a[2:])[1])(x, k, x_dot, k_dot),
                jax.jit(jax.grad(lambda a, b: jnp.sum(grad(a, b)[1] ** 2), argnums=(0, 1)))(x, k),
                jax.jit(jax.vmap(jax.grad(lambda a, b: loss(a[None], b), argnums=(0, 1)), (0, None)))(x, k)]
    xla_conv = lambda a, b: layers._xla_conv(a, b, stride, pads, (1, 1), groups)     # noqa: E731
    ours = results(lambda a, b: layers.convolve(a, b, stride, pads, (1, 1), groups), jnp.float32)
    xlas = results(xla_conv, jnp.float32)
    with jax.enable_x64(True):
        exact = jax.tree.map(np.asarray, results(xla_conv, jnp.float64))
    for what, mine, ref, right in zip(["eager", "jvp", "grad", "jvp of grad", "grad of grad", "vmap of grad"], ours, xlas, exact, strict=True):
        for a, b, c in zip(jax.tree.leaves(mine), jax.tree.leaves(ref), jax.tree.leaves(right), strict=True):
            assert a.shape == b.shape == c.shape and a.dtype == b.dtype == np.float32 and c.dtype == np.float64, what
            assert rel_err(a, c) <= 2 * rel_err(b, c) + 1e-6, what


@pytest.mark.parametrize("x_shape,kernel_shape,stride,pads,groups", _CONVOLUTION_KINDS)
def test_convolution_gradient_is_traced_without_conditionals(x_shape, kernel_shape, stride, pads, groups):
    # the platform's form is chosen when lowering: a conditional per convolution made
    # autodiff trace, linearise and transpose both platforms' branches at every layer;
    # and a batch of none has a gradient of none
    grad = jax.grad(lambda a, b: jnp.sum(layers.convolve(a, b, stride, pads, (1, 1), groups) ** 2), argnums=(0, 1))
    x, k = jnp.ones(x_shape), jnp.ones(kernel_shape)
    assert "cond" not in {eqn.primitive.name for eqn in jax.make_jaxpr(grad)(x, k).jaxpr.eqns}
    dx, dk = jax.jit(grad)(jnp.ones((0, *x_shape[1:])), k)
    assert dx.shape == (0, *x_shape[1:]) and dk.shape == kernel_shape and not np.asarray(dk).any()


@pytest.mark.parametrize("cin,width,stride,platform,convolutions,dots,gemm", [
    (6, 12, 1, "cpu", 0, 2, "-> tensor<16x360xf32>"),  # the input's gradient: a GEMM to 5 rows x 12 x 6 (banded rows)
    (6, 40, 1, "cpu", 1, 1, "x25x6xf32>"),   # wider than BANDED_MAX_WIDTH_RATIO x 5: to 5 x 5 taps x 6 (im2col)
    (6, 12, 1, "cuda", 2, 0, None),          # XLA's convolution off CPU
    (6, 12, 2, "cpu", 2, 0, None),           # strided: XLA's
    (16, 12, 1, "cpu", 2, 0, None),          # more than IM2COL_MAX_INPUT_CHANNELS: XLA's
])
def test_few_channel_convolution_input_gradient_is_a_dot_on_cpu_only(cin, width, stride, platform, convolutions,
                                                                     dots, gemm):
    conv = layers.Conv2d(16, 5, stride=stride, use_bias=False)
    x = jnp.zeros((2, 12, width, cin))
    variables = conv.init(jax.random.key(0), x)
    input_gradient = jax.grad(lambda a: jnp.sum(conv.apply(variables, a) ** 2))
    text = jax.jit(input_gradient).trace(x).lower(lowering_platforms=(platform,)).as_text()
    assert (text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")) == (convolutions, dots)
    if gemm:
        assert any(gemm in line for line in text.splitlines() if "stablehlo.dot_general" in line)


@pytest.mark.parametrize("batch,width,kernel,dilation,gemm", [
    (2, 12, 5, 1, "(tensor<32x240xf32>, tensor<240x64xf32>) -> tensor<32x64xf32>"),  # 8 columns in pieces of 4
    (2, 13, 5, 1, "(tensor<48x210xf32>, tensor<210x48xf32>) -> tensor<48x48xf32>"),  # 9 columns: pieces of 3
    (2, 11, 5, 1, "(tensor<112x150xf32>, tensor<150x16xf32>) -> tensor<112x16xf32>"),  # 7 columns: pieces of 1
    (2, 12, 3, 2, "(tensor<32x144xf32>, tensor<144x64xf32>) -> tensor<32x64xf32>"),  # span 5, dilated: pieces of 4
    (1, 12, 5, 1, None),        # 16 rows, fewer than BANDED_FORWARD_MIN_ROWS: XLA's convolution
])
def test_narrow_few_channel_convolution_forward_is_banded_pieces_on_cpu_only(batch, width, kernel, dilation, gemm):
    # where the input gradient is banded rows, the forward is too, in the widest piece of at
    # most span - 1 output columns that divides the row, unless the product has few rows;
    # XLA's convolution off CPU
    conv = layers.Conv2d(16, kernel, dilation=dilation, use_bias=False)
    x = jnp.zeros((batch, 12, width, 6))
    variables = conv.init(jax.random.key(0), x)
    forward = jax.jit(lambda v, a: conv.apply(v, a)).trace(variables, x)
    cpu, cuda = (forward.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    if gemm:
        assert "stablehlo.convolution" not in cpu and cpu.count("stablehlo.dot_general") == 1
        assert gemm in next(line for line in cpu.splitlines() if "stablehlo.dot_general" in line)
    else:
        assert cpu.count("stablehlo.convolution") == 1 and "stablehlo.dot_general" not in cpu
    assert cuda.count("stablehlo.convolution") == 1 and "stablehlo.dot_general" not in cuda


def test_few_channel_convolution_input_gradient_is_held_on_cpu():
    # the im2col input gradient's sum of shifted column blocks goes through a conditional:
    # without it XLA fused the sum into a consumer that reads each value several times (a
    # 2x2 max pool's gradient: four times) and recomputed it for every read
    conv = layers.Conv2d(16, 5, use_bias=False)
    for cin, held in [(6, 1), (16, 0)]:     # 16: XLA's convolution, nothing held
        x = jnp.zeros((2, 12, 12, cin))
        variables = conv.init(jax.random.key(0), x)
        input_gradient = jax.grad(lambda v, a: jnp.sum(conv.apply(v, a) ** 2), argnums=1)
        hlo = jax.jit(input_gradient).lower(variables, x).compile().as_text()
        assert hlo.count("conditional(") == held, cin


def _batch_norm_train_gradient(x):
    bn = layers.BatchNorm2d()
    variables = bn.init(jax.random.key(0), x)

    def loss(params, a):
        y, _ = bn.apply({**variables, "params": params}, a, train=True, mutable=["batch_stats"])
        return jnp.sum(y ** 3)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(variables["params"], x)


def test_batch_norm_train_sums_are_dots_on_cpu_only():
    # the two statistics and the gradient's two per-channel sums: matrix-vector products
    # with ones on CPU, reductions lowered for a GPU
    traced = _batch_norm_train_gradient(jnp.zeros((2, 5, 5, 8)))
    cpu, cuda = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    assert cpu.count("stablehlo.dot_general") == 4
    assert "stablehlo.dot_general" not in cuda and cuda.count("stablehlo.reduce") >= 4


def test_batch_norm_train_gradient_has_only_the_sums_platform_dependent():
    # differentiating a platform-dependent conditional linearises and transposes both of
    # its branches, which made tracing ResNet-50's train step take seconds; so the only
    # conditionals in BatchNorm's gradient are the four column sums, one operation a branch
    jaxpr = _batch_norm_train_gradient(jnp.zeros((2, 5, 5, 8))).jaxpr

    def conds(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "cond":
                yield eqn
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple) else (value,):
                    sub = getattr(sub, "jaxpr", sub)    # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from conds(sub)
    found = list(conds(jaxpr.jaxpr))
    assert len(found) == 4
    for eqn in found:
        assert all(len(branch.jaxpr.eqns) <= 2 for branch in eqn.params["branches"])


def test_batch_norm_train_gradient_includes_the_statistics_outputs():
    # batch_norm_train's CPU path has a hand-written gradient; it must also carry cotangents
    # that reach the batch mean and variance (a loss on the running statistics), checked
    # against autodiff of the textbook formula in float64
    rng = np.random.default_rng(3)
    x, scale, bias = (rng.standard_normal(s) for s in ((4, 5, 6, 7), (7,), (7,)))
    x = x * 3 + 1

    def textbook(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias, mean, var

    cotangents = tuple(rng.standard_normal(s) for s in (x.shape, (7,), (7,)))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))
        ours, ours_vjp = jax.vjp(lambda *a: layers.batch_norm_train(*a, 1e-5), *args)
        ref, ref_vjp = jax.vjp(textbook, *args)
        cts = tuple(jnp.asarray(c, jnp.float64) for c in cotangents)
        for a, b in zip((*ours, *ours_vjp(cts)), (*ref, *ref_vjp(cts))):
            assert rel_err(np.asarray(a), np.asarray(b)) < 1e-12


def test_fan_out_is_the_identity_with_its_gradient_held_on_cpu_only():
    # a value read by several layers (an inception module's input) gets the sum of their
    # gradients; on CPU that sum goes through one conditional, so XLA writes it once
    # instead of copying it into each fusion that reads it (GoogLeNet's train step)
    def plain(a):
        return jnp.sum(jnp.tanh(a) * jnp.sin(a)) + jnp.sum(a ** 3)

    def f(a):
        return plain(layers.fan_out(a))

    x = jnp.linspace(-1.0, 1.0, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4)

    np.testing.assert_array_equal(layers.fan_out(x), x)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(plain)(x), rtol=1e-6)
    t = jnp.cos(x)
    np.testing.assert_allclose(jax.jvp(f, (x,), (t,))[1], jax.jvp(plain, (x,), (t,))[1], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(plain)(x), rtol=1e-6)
    traced = jax.jit(jax.grad(f)).trace(x)
    assert traced.lower().compile().as_text().count("conditional(") == 1
    # the hold's second branch, -(-a), is the only negation: lowered for CPU, not for CUDA
    cpu, cuda = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda"))
    assert "stablehlo.negate" in cpu and "stablehlo.negate" not in cuda
    assert jax.grad(f)(jnp.zeros((0, 3, 3, 4))).shape == (0, 3, 3, 4)


def test_column_fold_lays_whole_rows_side_by_side():
    # a power of two that divides the rows, at most 64 and at most 16384 values wide
    assert layers._column_fold(256 * 24 * 24, 6) == 64
    assert layers._column_fold(32 * 7 * 7, 2048) == 8
    assert layers._column_fold(3 * 17 * 20, 4) == 4
    assert layers._column_fold(3 * 5 * 7, 8) == 1
    assert layers._column_fold(1, 16385) == 1
    rows = np.random.default_rng(0).standard_normal((3 * 64 * 5, 6)).astype(np.float32)
    np.testing.assert_allclose(layers._column_sum(jnp.asarray(rows)), rows.astype(np.float64).sum(0),
                               rtol=1e-5, atol=1e-4)


def _bias_gradient(shape, platform):
    y, b = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[-1:], jnp.float32)
    gradient = jax.jit(lambda y, b, g: jax.vjp(lambda b: layers.add_bias(y, b), b)[1](g)[0])
    return gradient.trace(y, b, y).lower(lowering_platforms=(platform,))


def test_bias_gradient_is_a_product_of_folded_rows_on_cpu_only():
    # a float32 bias's gradient: on CPU ones times the output gradient's rows, 64 of them
    # side by side (XLA:CPU's reduction over the leading axes is several times slower); a
    # reduction lowered for a GPU
    cpu = _bias_gradient((256, 24, 24, 6), "cpu").compile().as_text()
    dots = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", cpu)
    assert dots and all(int(a) * int(b) == 64 * 6 for a, b in dots)
    cuda = _bias_gradient((256, 24, 24, 6), "cuda").as_text()
    assert "stablehlo.dot_general" not in cuda and "stablehlo.reduce" in cuda


def test_add_bias_is_a_plain_add_for_every_transformation():
    # the CPU form only changes how XLA computes the bias's gradient: values, gradients,
    # forward mode, vmap and second derivatives are those of a plain y + b, both in float32
    rng = np.random.default_rng(5)
    y, b, t = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 4, 6), (6,), (6,)))

    def loss(add, y, b):
        return jnp.sum(jnp.tanh(add(y, b)) ** 2)

    def ours(y, b):
        return loss(layers.add_bias, y, b)

    def ref(y, b):
        return loss(jnp.add, y, b)

    def check(ours, ref):
        for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=2e-5, atol=1e-6)

    np.testing.assert_array_equal(layers.add_bias(y, b), y + b)
    check(jax.jit(jax.grad(ours, argnums=(0, 1)))(y, b), jax.grad(ref, argnums=(0, 1))(y, b))
    check(jax.jvp(lambda b: layers.add_bias(y, b), (b,), (t,)), jax.jvp(lambda b: y + b, (b,), (t,)))
    check(jax.vmap(lambda b: layers.add_bias(y, b))(np.stack([b, t])), y + np.stack([b, t])[:, None, None, None])
    hessian = jax.hessian(lambda b: ref(y, b))(b)
    check(jax.hessian(lambda b: ours(y, b))(b), hessian)
    check(jax.jit(jax.jacfwd(jax.grad(lambda b: ours(y, b))))(b), hessian)
    assert layers.add_bias(jnp.zeros((0, 3, 6)), b).shape == (0, 3, 6)
    assert layers.add_bias(jnp.zeros((2, 6), jnp.bfloat16), b.astype(jnp.bfloat16)).dtype == jnp.bfloat16
