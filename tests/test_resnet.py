"""The residual family against torch, by the parity protocol of shared/DESIGN.md.

torchvision's ten ResNets / ResNeXts / Wide ResNets are the reference as they are. The
paper's shortcut options A and C and the plain nets are checked against torchvision's
ResNet with its ``downsample`` modules replaced (a zero-padding module written here
from the paper, a projection on every block, or nothing); the CIFAR ResNets against a
net assembled here from torchvision's own ``BasicBlock``.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxconv
from jaxconv import parity
from jaxconv.models.resnet import BasicBlock

TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
CIFAR = {"resnet20": (3, 0.27), "resnet32": (5, 0.46), "resnet44": (7, 0.66), "resnet56": (9, 0.85),
         "resnet110": (18, 1.7)}  # name: (blocks per stage, the paper's parameter count in millions)


# ----------------------------------------------------------------------------- torch references

class TorchZeroPad(torch.nn.Module):
    """Option A as the paper describes it: subsample, then append zero channels."""

    def __init__(self, out_channels, stride):
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class TorchNoShortcut(torch.nn.Module):
    """torchvision adds ``downsample(x)`` to the residual branch: adding 0 makes it plain."""

    def forward(self, x):
        return x.new_zeros(())


def blocks_of(model):
    return [b for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)
            for b in getattr(model, name)]


def block_out(block):
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def with_shortcuts(model, option):
    """torchvision's ResNet (option B) turned into option 'A', 'C' or 'plain'."""
    for block in blocks_of(model):
        out, stride = block_out(block), block.stride
        if option == "A" and block.downsample is not None:
            block.downsample = TorchZeroPad(out, stride)
        elif option == "C" and block.downsample is None:
            block.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(block.conv1.in_channels, out, 1, stride, bias=False),
                torch.nn.BatchNorm2d(out))
        elif option == "plain":
            block.downsample = TorchNoShortcut()
    return model


class TorchCifarResNet(torch.nn.Module):
    """The paper's CIFAR ResNet (section 4.2) from torchvision's BasicBlock: 3x3 conv of
    16, three stages of n blocks at 16/32/64 channels, option-A shortcuts, avgpool, fc."""

    def __init__(self, n, in_channels=3, num_classes=10):
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.conv1 = torch.nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.relu = torch.nn.ReLU()
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                down = TorchZeroPad(planes, stride) if (stride != 1 or inplanes != planes) else None
                layers.append(block(inplanes, planes, stride, down))
                inplanes = planes
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(*layers))
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_count(model):
    return sum(p.numel() for p in model.parameters())


def jax_count(name, **overrides):
    model = jaxconv.get_model(name, **overrides)
    h, w, c = jaxconv.model_info(name).input_size
    c = overrides.get("in_channels", c)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def reference(model, calibration=(2, 3, 64, 64)):
    torch.manual_seed(0)
    return parity.prepare_reference(model, calibration)


# ----------------------------------------------------------------------------- the check

def assert_train_parity(name, errors):
    grads = {k: v for k, v in errors.items() if k.startswith("grad:")}
    rest = {k: v for k, v in errors.items() if k not in grads}
    worst = sorted(grads.items(), key=lambda kv: -kv[1])[:3]
    print(name, "train", rest, "grads: worst", worst)
    assert max(rest.values()) <= 1e-9, rest
    assert worst[0][1] <= 1e-9, worst


def assert_parity(result, min_layers):
    where, worst = result.worst_intermediate
    assert result.f64_logits <= 1e-9, result.line()
    assert worst <= 1e-9, f"first bad layer {where}: {result.line()}"
    assert len(result.f64_intermediates) >= min_layers, result.line()  # the per-layer check ran
    if result.f32_jax is not None:
        assert result.f32_jax <= result.f32_bound, result.line()


def n_layers(torch_model):
    """Modules called once per pass (convs, norms, blocks, pools): what can be compared."""
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) for m in torch_model.modules())


# ----------------------------------------------------------------------------- tests

# The 101- and 152-layer variants repeat their 50-layer sibling's blocks (the same code,
# a longer table): they are checked layer by layer at the odd size only, and the default
# 224x224 on the 18/34/50-layer variants of each block type (a 224 float64 pass of the
# deep ones costs a minute of the suite each).
DEEP = {"resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"}


@pytest.mark.parametrize("name", TORCHVISION)
def test_eval_parity(name):
    ref = reference(parity.torchvision_model(name))
    sizes = [(65, 97)] if name in DEEP else [(224, 224), (65, 97)]
    for result in parity.check_eval(name, ref, sizes, batch=1):
        print(result.line())
        assert_parity(result, n_layers(ref))


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_train_mode_and_gradient_parity(name):
    ref = reference(parity.torchvision_model(name))
    assert_train_parity(name, parity.check_train(name, ref, (64, 64), batch=4, grads=True))


@pytest.mark.parametrize("name", TORCHVISION)
def test_parameter_count_equals_torchvision(name):
    with torch.device("meta"):
        expected = torch_count(parity.torchvision_model(name))
    assert jax_count(name) == expected


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_parameter_counts_match_the_paper(name):
    n, paper_millions = CIFAR[name]
    count = jax_count(name)
    with torch.device("meta"):
        assert count == torch_count(TorchCifarResNet(n))
    decimals = len(str(paper_millions).split(".")[1])
    assert round(count / 1e6, decimals) == paper_millions
    # 6n + 2 weighted layers: 6n 3x3 convs in the stages, the first conv and the fc
    model = jaxconv.get_model(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    kernels = [k for k in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
               if k[0][-1].key == "kernel"]
    assert len(kernels) == 6 * n + 2


@pytest.mark.parametrize("name, option, base", [
    ("resnet18", "A", "resnet18"), ("resnet34", "A", "resnet34"), ("resnet50", "A", "resnet50"),
    ("resnet18", "C", "resnet18"), ("resnet34", "C", "resnet34"), ("resnet50", "C", "resnet50"),
    ("plain18", "plain", "resnet18"), ("plain34", "plain", "resnet34")])
def test_shortcut_options_and_plain_nets_count(name, option, base):
    overrides = {"shortcut": option} if option in "AC" else {}
    with torch.device("meta"):
        tv = parity.torchvision_model(base)
        torchvision_count = torch_count(tv)
        projections = sum(torch_count(b.downsample) for b in blocks_of(tv) if b.downsample is not None)
        expected = torch_count(with_shortcuts(tv, option))
    count = jax_count(name, **overrides)
    assert count == expected
    if option in ("A", "plain"):  # parameter-free: torchvision's count less its projections
        assert count == torchvision_count - projections
    else:  # more projections than torchvision's (one on every block)
        assert count > torchvision_count


@pytest.mark.parametrize("name, option, base", [
    ("resnet18", "A", "resnet18"), ("resnet18", "C", "resnet18"), ("plain18", "plain", "resnet18"),
    ("resnet50", "A", "resnet50")])  # A on a bottleneck net pads 64 -> 256 channels at stride 1
def test_shortcut_options_and_plain_nets_parity(name, option, base):
    overrides = {"shortcut": option} if option in "AC" else {}
    ref = reference(with_shortcuts(parity.torchvision_model(base), option))
    result = parity.check_eval(name, ref, (64, 48), batch=2, overrides=overrides, float32=False)
    print(option, result.line())
    assert_parity(result, n_layers(ref))
    # the shortcut really is what the option says
    model = jaxconv.get_model(name, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 48, 3))))
    projected = sorted(k for k, v in variables["params"].items() if "downsample_0" in v)
    n_blocks = len(blocks_of(ref))
    assert len(projected) == {"A": 0, "plain": 0, "C": n_blocks}[option]


def test_option_a_shortcut_pads_zeros_and_plain_blocks_have_none():
    """With the residual branch switched off (its last BatchNorm at scale 0, bias 0), a
    block outputs relu(shortcut(x)): the subsampled input then zero channels for option
    A, zero for a plain block."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 7, 16)).astype(np.float32)
    blocks = [BasicBlock(planes=32, in_planes=16, stride=2, shortcut="A", residual=r) for r in (True, False)]
    variables = []
    for block in blocks:
        shapes = jax.eval_shape(block.init, jax.random.key(0), x)
        v = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
        v["batch_stats"] = jax.tree.map(np.abs, v["batch_stats"])
        v["params"]["bn2"] = {"scale": np.zeros(32, np.float32), "bias": np.zeros(32, np.float32)}
        variables.append(v)
    padded, plain = jax.jit(lambda v: [b.apply(w, x) for b, w in zip(blocks, v)])(variables)
    expected = np.maximum(np.pad(x[:, ::2, ::2], ((0, 0),) * 3 + ((0, 16),)), 0)
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(plain, np.zeros((2, 5, 4, 32)))


def test_cifar_resnet_parity():
    ref = reference(TorchCifarResNet(3), (8, 3, 32, 32))
    for result in parity.check_eval("resnet20", ref, [(32, 32), (29, 35)], batch=2):
        print(result.line())
        assert_parity(result, n_layers(ref))
    assert_train_parity("resnet20", parity.check_train("resnet20", ref, (32, 32), batch=4, grads=True))
    # 28x28 grayscale input
    ref1 = reference(TorchCifarResNet(3, in_channels=1), (8, 1, 28, 28))
    result = parity.check_eval("resnet20", ref1, (28, 28), batch=2, overrides={"in_channels": 1})
    print(result.line())
    assert_parity(result, n_layers(ref1))


def test_summary_shows_the_block_arithmetic():
    with torch.device("meta"):
        r18, r50 = parity.torchvision_model("resnet18"), parity.torchvision_model("resnet50")
    expected = {  # the lecture: basic block at 64 ~ 73k, at 256 ~ 1.2M; bottleneck 256-64-256 ~ 70k
        ("resnet18", "layer1_0"): torch_count(r18.layer1[0]),
        ("resnet18", "layer3_1"): torch_count(r18.layer3[1]),
        ("resnet50", "layer1_1"): torch_count(r50.layer1[1]),
    }
    assert [round(v, -3) for v in expected.values()] == [74000, 1181000, 70000]
    for (name, block), count in expected.items():
        text = jaxconv.summary(name)
        line = next(l for l in text.splitlines() if f"= {block}:" in l)
        assert re.search(rf"\b{count:,}\b", line), line
        assert ("256->64->256" in line) == (block == "layer1_1" and name == "resnet50"), line
    # every block of resnet34 has a subtotal line and the totals still add up
    text = jaxconv.summary("resnet34")
    assert len(re.findall(r"= layer\d_\d+: BasicBlock", text)) == 16
    assert "total: 21,797,672 parameters" in text


def test_torchvision_init_and_zero_init_residual():
    model = jaxconv.get_model("resnet18", zero_init_residual=True)
    init = jax.jit(model.init).lower(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params = parity.compile_all([init])[0](jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    tv = torchvision.models.resnet18(zero_init_residual=True)
    zero_torch = sorted(k[: -len(".weight")] for k, v in tv.state_dict().items()
                        if k.endswith(".weight") and v.ndim == 1 and not v.any())
    zero_jax = sorted(jaxconv.convert.default_torch_name(tuple(p.key for p in path[:-1]))
                      for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
                      if path[-1].key == "scale" and not np.any(v))
    assert zero_jax == zero_torch and len(zero_jax) == 8
    # kaiming normal, fan_out: std sqrt(2 / (9 * out)) for a 3x3 conv; torch's default fc
    kernel = np.asarray(params["layer4_1"]["conv2"]["kernel"])
    assert abs(kernel.std() / math.sqrt(2 / (9 * 512)) - 1) < 0.02 and abs(kernel.mean()) < 1e-3
    fc = np.asarray(params["fc"]["kernel"])
    assert np.abs(fc).max() <= 1 / math.sqrt(512) and np.abs(fc).max() > 0.9 / math.sqrt(512)
    assert np.all(np.asarray(params["bn1"]["scale"]) == 1) and not np.any(params["bn1"]["bias"])


def test_dtype_and_clear_errors():
    model, model16 = jaxconv.get_model("resnet20"), jaxconv.get_model("resnet20", dtype=jnp.bfloat16)
    variables = jaxconv.from_torchvision("resnet20", reference(TorchCifarResNet(3), (8, 3, 32, 32)).float().state_dict())
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    out32, acts = jax.jit(lambda v, x: (model.apply(v, x), jaxconv.intermediates(model16, v, x)))(variables, x)
    assert {a.dtype for a in acts.values()} == {jnp.dtype("bfloat16")}
    assert parity.rel_err(acts["fc"], out32) < 0.05
    assert jax.eval_shape(lambda: model.apply(variables, x, method="features")).shape == (2, 8, 8, 64)
    with pytest.raises(ValueError, match="looks like NCHW"):
        model.apply(variables, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="shortcut must be one of A, B, C"):
        jax.eval_shape(jaxconv.get_model("resnet18", shortcut="D").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        jax.eval_shape(jaxconv.get_model("resnet18", groups=32).init, jax.random.key(0), x)
    with pytest.raises(TypeError, match="no option 'stage_sizes'"):
        jaxconv.get_model("resnet50", stage_sizes=(1, 1, 1, 1))
    with pytest.raises(jaxconv.MappingError, match="missing"):  # option C needs more weights
        jaxconv.from_torchvision("resnet18", parity.torchvision_model("resnet18").state_dict(), shortcut="C")
