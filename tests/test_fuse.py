"""fuse_bn: folding inference BatchNorm into the convolution computes what torchvision's
eval-mode model computes (float64 mapping check and float32 rounding bound)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import parity
from jaxconv.convert import from_torchvision
from jaxconv.fuse import conv_bn_pairs, fuse_bn

torch = pytest.importorskip("torch")

# name -> (input size, BatchNorms that fold in eval mode, BatchNorms in all)
# (VGG-BN's Conv -> BatchNorm pairs are ResNet's case; its float64 convolutions are slow)
CASES = {"resnet18": ((64, 64), 20, 20), "googlenet": ((64, 64), 57, 59),
         "efficientnet_b0": ((64, 64), 49, 49)}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _count_bn(params):
    return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "scale")


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_model_matches_torchvision_eval(name):
    (h, w), folds, total = CASES[name]
    ref = parity.prepare_reference(parity.torchvision_model(name), (4, 3, h, w))
    ref.eval()
    x = np.random.default_rng(3).standard_normal((2, h, w, 3))
    with torch.no_grad():
        want = parity._logits(ref(_nchw(x))).numpy()
    with jax.enable_x64(True):
        model = jaxconv.get_model(name, dtype=jnp.float64, param_dtype=jnp.float64)
        variables = from_torchvision(name, _state(ref))
        before = jax.tree.map(np.array, variables)
        fused = fuse_bn(model, variables, (1, h, w, 3))
        # the inputs are untouched, and the folded BatchNorms lost scale and statistics
        jax.tree.map(np.testing.assert_array_equal, variables, before)
        assert _count_bn(variables["params"]) == total
        assert _count_bn(fused["params"]) == total - folds
        assert len(jax.tree.leaves(fused.get("batch_stats", {}))) == 2 * (total - folds)
        apply = jax.jit(model.apply)
        plain64 = np.asarray(apply(variables, jnp.asarray(x)))
        fused64 = np.asarray(apply(fused, jnp.asarray(x)))
    assert parity.rel_err(fused64, plain64) <= 1e-10
    assert parity.rel_err(fused64, want) <= parity.F64_TOLERANCE

    ref32 = ref.float()
    x32 = x.astype(np.float32)
    with torch.no_grad():
        torch32 = parity._logits(ref32(_nchw(x32))).numpy()
    model32 = jaxconv.get_model(name)
    variables32 = from_torchvision(name, _state(ref32))
    fused32 = np.asarray(jax.jit(model32.apply)(fuse_bn(model32, variables32, (1, h, w, 3)), jnp.asarray(x32)))
    bound = 4 * parity.rel_err(torch32, want) + 1e-6
    assert parity.rel_err(fused32, want) <= bound


def test_fuse_is_idempotent_and_inference_only():
    model = jaxconv.get_model("resnet18", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    fused = fuse_bn(model, variables, (1, 32, 32, 3))
    again = fuse_bn(model, fused, (1, 32, 32, 3))
    jax.tree.map(np.testing.assert_array_equal, fused, again)
    assert "batch_stats" not in fused
    with pytest.raises(ValueError, match="folded by fuse_bn"):
        model.apply(fused, jnp.zeros((2, 32, 32, 3)), train=True, mutable=["batch_stats"])


def test_densenet_folds_only_conv_then_bn_pairs():
    model = jaxconv.get_model("densenet121")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    pairs = conv_bn_pairs(model, variables, (1, 64, 64, 3))
    folded = {bn[-1] for _, bn, _ in pairs}
    assert len(pairs) == 59 and folded == {"features_norm0", "norm2"}
    assert all(conv[-1] in ("features_conv0", "conv1") for conv, _, _ in pairs)
