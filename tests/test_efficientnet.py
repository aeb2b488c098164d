"""EfficientNet B0-B7 and V2-S/M/L against torchvision (the parity protocol of DESIGN.md),
their parameter counts, and the compound scaling rule."""
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jaxconv  # noqa: E402
from jaxconv import parity  # noqa: E402
from jaxconv.models import efficientnet as eff  # noqa: E402

# (input size, batch): the default size for B0, an odd size for B1, the large models small
CASES = {
    "efficientnet_b0": (224, 2), "efficientnet_b1": (129, 1), "efficientnet_b2": (96, 1),
    "efficientnet_b3": (80, 1), "efficientnet_b4": (64, 1), "efficientnet_b5": (64, 1),
    "efficientnet_b6": (64, 1), "efficientnet_b7": (64, 1), "efficientnet_v2_s": (96, 1),
    "efficientnet_v2_m": (64, 1), "efficientnet_v2_l": (64, 1),
}
TORCHVISION_PARAMS = {
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "efficientnet_b4": 19_341_616, "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704, "efficientnet_b7": 66_347_960, "efficientnet_v2_s": 21_458_488,
    "efficientnet_v2_m": 54_139_356, "efficientnet_v2_l": 118_515_272,
}
# The BatchNorm statistics come from batches of 8: the deep stages are 2x2 at 64x64, and
# statistics of batch 2 leave V2-L chaotic (float32 0.5 away from float64; 2.5e-5 at 8).
CALIBRATION_BATCH = 8


def _param_count(module) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


@pytest.mark.parametrize("name", list(CASES))
def test_eval_parity(name):
    size, batch = CASES[name]
    reference = parity.prepare_reference(parity.torchvision_model(name), (CALIBRATION_BATCH, 3, size, size))
    # each variant's BatchNorm eps and momentum as torchvision sets them
    model = jaxconv.get_model(name)
    for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert bn.eps == model.bn_eps and math.isclose(1 - bn.momentum, model.bn_momentum)
    result = parity.check_eval(name, reference, (size, size), batch=batch)
    print(result.line())
    # every block (and the stem and head) was compared, not only the logits
    blocks = [f"features.{i}.{j}" for i, stage in enumerate(reference.features) if i > 0
              and isinstance(stage, torch.nn.Sequential) and not hasattr(stage, "out_channels")
              for j in range(len(stage))]
    assert blocks and all(b in result.f64_intermediates for b in blocks)
    assert "features.0.2" in result.f64_intermediates and "classifier.1" in result.f64_intermediates
    assert result.f64_logits <= parity.F64_TOLERANCE
    assert result.worst_intermediate[1] <= parity.F64_TOLERANCE, result.worst_intermediate
    assert result.f32_jax <= result.f32_bound, result.line()


def test_a_gate_is_measured_against_the_error_its_input_carries():
    # the scale: the sigmoid's largest slope times its input's largest magnitude
    toy = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Sigmoid()).double()
    x = torch.randn(2, 3, dtype=torch.float64) * 100
    _, outputs, scales = parity.torch_output_and_intermediates(toy, x, ["0", "1"])
    assert set(scales) == {"1"} and set(outputs) == {"0", "1"}
    assert math.isclose(scales["1"], 0.25 * float(np.abs(outputs["0"]).max()))
    # ...and a gate that computes the wrong thing still fails by far: every sigmoid of
    # B0 made to add 1e-2 to its argument
    class ShiftedSigmoid(torch.nn.Sigmoid):
        def forward(self, x):
            return torch.sigmoid(x + 1e-2)

    reference = parity.prepare_reference(parity.torchvision_model("efficientnet_b0"), (CALIBRATION_BATCH, 3, 64, 64))
    gates = [name for name, m in reference.named_modules() if isinstance(m, torch.nn.Sigmoid)]
    for name in gates:
        block, _, leaf = name.rpartition(".")
        setattr(reference.get_submodule(block), leaf, ShiftedSigmoid())
    result = parity.check_eval("efficientnet_b0", reference, (64, 64), batch=1, float32=False)
    assert gates and all(result.f64_intermediates[g] > 1e-6 for g in gates), result.line()


def test_calibration_does_not_depend_on_torchs_global_random_state():
    """Stochastic depth draws from torch's global generator in train mode; the reference's
    statistics must not (they did: which tests ran before decided V2-L's parity)."""
    def buffers(global_seed):
        torch.manual_seed(global_seed)
        model = parity.prepare_reference(parity.torchvision_model("efficientnet_b0"), (4, 3, 32, 32))
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    first, second = buffers(1), buffers(2)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name,size", [("efficientnet_b0", 64), ("efficientnet_b5", 64),
                                       ("efficientnet_v2_s", 64)])
def test_train_parity(name, size):
    """Batch statistics and torch's running-statistics update (B5: momentum 0.01,
    eps 1e-3; V2: FusedMBConv, eps 1e-3), stochastic depth and dropout off."""
    reference = parity.prepare_reference(parity.torchvision_model(name), (CALIBRATION_BATCH, 3, size, size))
    errors = parity.check_train(name, reference, (size, size), batch=2)
    print(name, errors)
    assert errors["logits"] <= parity.F64_TOLERANCE
    assert errors["running_stats"] <= parity.F64_TOLERANCE


def test_stochastic_depth_is_active_in_train_mode():
    # B0's first three stages (two residual blocks) keep this small
    model = eff.EfficientNet(stages=eff.B0_STAGES[:3], num_classes=10, dropout=0.0, stochastic_depth_prob=0.9)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": key})[0])

    def run(seed):
        return np.asarray(train(variables, x, jax.random.key(seed)))

    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    evaluate = jax.jit(model.apply)
    assert np.array_equal(np.asarray(evaluate(variables, x)), np.asarray(evaluate(variables, x)))


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_parameter_counts(name):
    expected = TORCHVISION_PARAMS[name]
    assert torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] == expected
    assert _param_count(jaxconv.get_model(name)) == expected


def _torchvision_stages(width, depth):
    from torchvision.models.efficientnet import _efficientnet_conf

    conf, _ = _efficientnet_conf("efficientnet_b0", width_mult=width, depth_mult=depth)
    return [(c.expand_ratio, c.kernel, c.stride, c.input_channels, c.out_channels, c.num_layers) for c in conf]


def _ours(stages):
    return [(s.expand_ratio, s.kernel, s.stride, s.input_channels, s.out_channels, s.num_layers) for s in stages]


def test_compound_scaling_rule():
    assert eff.compound_scaling(0) == (1.0, 1.0, 1.0)
    depth, width, resolution = eff.compound_scaling(2)
    assert math.isclose(depth, 1.2 ** 2) and math.isclose(width, 1.1 ** 2) and math.isclose(resolution, 1.15 ** 2)
    # alpha * beta^2 * gamma^2 ~ 2: one step of phi about doubles the FLOPs
    d, w, r = eff.compound_scaling(1)
    assert 1.9 < d * w ** 2 * r ** 2 < 2.1
    assert eff.compound_scaling(1, alpha=1.5, beta=1.0, gamma=1.0) == (1.5, 1.0, 1.0)
    # torchvision's channel rounding: nearest multiple of 8, never more than 10 % down
    assert [eff.make_divisible(v) for v in (3, 16 * 1.1, 32 * 1.1, 40 * 1.8, 112 * 1.4, 20)] == \
        [8, 16, 32, 72, 160, 24]
    for phi in (1, 2, 3):
        d, w, _ = eff.compound_scaling(phi)
        assert _ours(eff.scale_stages(eff.B0_STAGES, w, d)) == _torchvision_stages(w, d)


@pytest.mark.parametrize("variant", ["b1", "b2", "b3", "b4", "b5", "b6", "b7"])
def test_scaling_b0_gives_torchvision_variants(variant):
    """B0's table scaled by B1-B7's (width, depth) coefficients is torchvision's B1-B7:
    the same stage table, and the registered variant is exactly that model (so its
    parameter count, checked against torchvision's in test_parameter_counts, is the
    scaled B0's)."""
    width, depth, _, _ = eff.COEFFICIENTS[variant]
    name = f"efficientnet_{variant}"
    scaled = eff.efficientnet(width, depth)
    assert _ours(scaled.stages) == _torchvision_stages(width, depth)
    registered = jaxconv.get_model(name)
    assert _ours(registered.stages) == _ours(scaled.stages)
    assert (registered.stem_channels, registered.head_channels) == (scaled.stem_channels, scaled.head_channels)


def test_scaled_model_off_the_published_table():
    """phi = 1 of the rule itself (depth 1.2, width 1.1), which no published variant uses."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    d, w, _ = eff.compound_scaling(1)
    conf, last = _efficientnet_conf("efficientnet_b0", width_mult=w, depth_mult=d)
    expected = sum(p.numel() for p in EfficientNet(conf, 0.2, last_channel=last).parameters())
    assert _param_count(eff.efficientnet(w, d)) == expected


def test_dropout_and_summary():
    assert jaxconv.get_model("efficientnet_b7").variant_dropout == 0.5
    assert jaxconv.get_model("efficientnet_b7", dropout=0.1).dropout == 0.1
    text = jaxconv.summary("efficientnet_b0")
    assert "5,288,548 parameters" in text and "groups=" in text and "SiLU" in text
