"""convolutionize: a pure dense -> conv rewrite that slides the head over larger inputs."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import parity
from jaxconv.convert import from_torchvision
from jaxconv.convolutionize import ConvolutionizeError, convolutionize, dense_predict
from jaxconv.parity import rel_err

FLATTEN_HEADS = {"lenet5": 4, "alexnet": 32, "vgg11": 32}  # trunk strides


def build(name, size=None, dtype=jnp.float32):
    model = jaxconv.get_model(name, dtype=dtype, param_dtype=dtype)
    h, w, c = jaxconv.model_info(name).input_size
    if size is not None:
        h, w = size
    x = np.zeros((1, h, w, c), np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    return model, variables, (h, w, c)


@pytest.mark.parametrize("name", list(FLATTEN_HEADS))
def test_flatten_heads_equal_the_logits_at_input_shape_in_float64(name):
    with jax.enable_x64(True):
        model, variables, shape = build(name, dtype=jnp.float64)
        fcn, fcn_variables = convolutionize(model, variables, shape)
        x = np.random.default_rng(0).standard_normal((2, *shape))
        out = jax.jit(fcn.apply)(fcn_variables, x)
        ref = jax.jit(model.apply)(variables, x)
        assert out.shape == (2, 1, 1, ref.shape[-1])
        assert rel_err(out[:, 0, 0], ref) <= 1e-9
    heads = sorted((k for k in fcn_variables["params"] if k.startswith("head_")), key=lambda k: int(k[5:]))
    kernel = fcn_variables["params"][heads[0]]["kernel"]  # the first Linear
    expected = {"lenet5": (4, 4, 16, 120), "alexnet": (6, 6, 256, 4096), "vgg11": (7, 7, 512, 4096)}
    assert kernel.shape == expected[name]
    assert fcn.stride == FLATTEN_HEADS[name]


def test_float32_equality_and_inputs_untouched():
    model, variables, shape = build("alexnet")
    before = copy.deepcopy(jax.tree.map(np.asarray, variables))
    fcn, fcn_variables = convolutionize(model, variables, shape)
    x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)
    assert rel_err(jax.jit(fcn.apply)(fcn_variables, x)[:, 0, 0], jax.jit(model.apply)(variables, x)) <= 1e-5
    assert jax.tree.structure(before) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_lenet5_cells_equal_the_model_on_each_crop():
    # LeNet5's trunk has no padding, so cell (i, j) is exactly the model on the crop at
    # (4i, 4j): the Overfeat property.
    model, variables, shape = build("lenet5")
    fcn, fcn_variables = convolutionize(model, variables, shape)
    x = np.random.default_rng(2).standard_normal((1, 28 + 4 * 9, 28 + 4 * 6, 1)).astype(np.float32)
    maps = jax.jit(fcn.apply)(fcn_variables, x)
    assert maps.shape == (1, 10, 7, 10)
    apply = jax.jit(model.apply)
    for i, j in np.random.default_rng(3).integers(0, [10, 7], size=(8, 2)):
        crop = x[:, 4 * i:4 * i + 28, 4 * j:4 * j + 28]
        assert rel_err(maps[0, i, j], apply(variables, crop)[0]) <= 1e-5


@pytest.mark.parametrize("name", ["alexnet", "vgg11"])
def test_padded_trunks_slide_the_classifier_over_the_map(name):
    # AlexNet and VGG zero-pad their convolutions, so a cell of the map sees the real
    # pixels around its crop where the crop alone sees zeros: the cell equals the
    # classifier applied to the window of the big image's trunk map at (i, j) (checked
    # here exactly), not the model on the isolated crop.
    model, variables, shape = build(name)
    fcn, fcn_variables = convolutionize(model, variables, shape)
    s = fcn.stride
    x = np.random.default_rng(4).standard_normal((1, 224 + 3 * s, 224 + 2 * s, 3)).astype(np.float32)
    maps = jax.jit(fcn.apply)(fcn_variables, x)
    assert maps.shape[1:3] == (4, 3)
    trunk = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, x)
    k = trunk.shape[1] - 3
    head = jax.jit(lambda v, m: model.apply(v, m.reshape(m.shape[0], -1), method="classifier"))
    for i, j in [(0, 0), (3, 2), (2, 1)]:
        window = trunk[:, i:i + k, j:j + k]
        assert rel_err(maps[0, i, j], head(variables, window)[0]) <= 1e-5


def _small_densenet():
    # DenseNet's own class at a fraction of densenet121's depth and width: the same trunk,
    # norm5, functional ReLU and head code, compiled in a fraction of the time
    from jaxconv.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)


# one small representative per family at a small valid input with a map of several cells
# (lenet5, alexnet and vgg11 are checked above, in float64); (name or builder, (H, W, C))
FAMILIES = {
    "densenet": (_small_densenet, (64, 64, 3)),
    "efficientnet": ("efficientnet_lite0", (64, 64, 3)),
    "googlenet": ("googlenet", (64, 64, 3)),
    "inception": ("inception_v3", (107, 107, 3)),  # 107 = 75 + 32: a 2x2 map
    "nin": ("nin_cifar10", (32, 32, 3)),
    "resnet": ("resnet20", (32, 32, 3)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_map_mean_equals_the_logits(family):
    """At input_shape the map's mean is the logits (global-average-pool heads, NiN's class
    maps); ``average=True`` gives that mean directly."""
    build_model, shape = FAMILIES[family]
    if callable(build_model):
        model = build_model()
    else:
        # inception_v3's auxiliary head only runs at initialisation and needs 299x299
        options = {"aux_logits": False} if build_model == "inception_v3" else {}
        model = jaxconv.get_model(build_model, **options)
    x = np.random.default_rng(5).standard_normal((2, *shape)).astype(np.float32)
    if family in ("googlenet", "inception"):
        # torchvision's initialisation, converted: compiling jaxconv's truncated-normal
        # init of these two costs ~30 s each
        tv = parity.torchvision_model(build_model, **options)
        variables = from_torchvision(build_model, {k: v.detach().numpy() for k, v in tv.state_dict().items()},
                                     **options)
    else:
        variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    fcn, fcn_variables = convolutionize(model, variables, shape)
    averaged, averaged_variables = convolutionize(model, variables, shape, average=True)
    # one compilation for the three (XLA shares the common trunk)
    run = jax.jit(lambda v, f, x: (model.apply(v, x), fcn.apply(f, x), averaged.apply(f, x)))
    logits, maps, mean = run(variables, fcn_variables, x)
    assert maps.shape[1] > 1 and maps.shape[2] > 1, maps.shape  # a real map, not one cell
    assert maps.shape[-1] == logits.shape[-1]
    assert rel_err(maps.mean(axis=(1, 2)), logits) <= 1e-5
    assert mean.shape == (2, 1, 1, logits.shape[-1])
    assert rel_err(mean[:, 0, 0], logits) <= 1e-5


# Every distinct architecture: each family's builder with each kind of block, stem and
# head. The other registered variants differ from one of these only in their table
# (depths, widths, resolution), which the families' parameter-count tests pin down, and
# tracing all 51 names costs minutes of the suite.
ARCHITECTURES = ["lenet5", "alexnet", "vgg11", "vgg11_bn", "nin", "nin_cifar10", "googlenet",
                 "inception_v3", "resnet18", "resnet50", "resnext50_32x4d", "plain18", "resnet20",
                 "densenet121", "efficientnet_b0", "efficientnet_b5", "efficientnet_v2_s",
                 "efficientnet_lite0"]


def test_the_architecture_list_covers_every_family():
    def family(name):
        build = jaxconv.model_info(name).build
        return getattr(build, "func", build).__module__

    assert {family(n) for n in ARCHITECTURES} == {family(n) for n in jaxconv.list_models()}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_can_be_convolutionized(name):
    """Structure only, abstractly (no compute): convolutionize succeeds at the model's input
    size, the rewritten model accepts its variables (flax checks every parameter's shape),
    and an input larger by (2s, s) pixels, s the trunk's stride, gives a map larger by
    (2, 1) cells of ``num_classes`` scores."""
    info = jaxconv.model_info(name)
    shape = info.input_size
    model = jaxconv.get_model(name)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    rewritten = {}

    def rewrite(variables):
        fcn, fcn_variables = convolutionize(model, variables, shape)
        rewritten["fcn"] = fcn
        return fcn_variables

    fcn_variables = jax.eval_shape(rewrite, abstract)
    fcn = rewritten["fcn"]
    s = fcn.stride
    assert s == (4 if shape[0] <= 32 else 32)  # CIFAR-size nets keep 1/4 of the input, ImageNet ones 1/32
    at_size = jax.eval_shape(fcn.apply, fcn_variables, x).shape
    big = jax.ShapeDtypeStruct((2, shape[0] + 2 * s, shape[1] + s, shape[2]), jnp.float32)
    bigger = jax.eval_shape(fcn.apply, fcn_variables, big).shape
    assert bigger == (2, at_size[1] + 2, at_size[2] + 1, info.num_classes)


def test_what_cannot_be_rewritten_is_named():
    model, variables, _ = build("alexnet")
    with pytest.raises(ConvolutionizeError, match="pooling between them is not the identity"):
        convolutionize(model, variables, (160, 160, 3))
    fcn, fcn_variables = convolutionize(model, variables, (224, 224, 3))
    with pytest.raises(ValueError, match="smaller than the 6x6 head"):
        fcn.apply(fcn_variables, np.zeros((1, 160, 160, 3), np.float32))


def test_dense_predict_over_scales_and_flips():
    model, variables, shape = build("lenet5")
    fcn, fcn_variables = convolutionize(model, variables, shape)
    image = np.random.default_rng(6).standard_normal((40, 56, 1)).astype(np.float32)
    pred = dense_predict(fcn, fcn_variables, image, shape, scales=(1.0, 1.5, 2.0))
    assert [m.shape[-1] for m in pred.maps] == [10, 10, 10]
    assert pred.sizes[0] == (28, 39) and pred.sizes[2] == (56, 78)
    assert pred.maps[2].shape[:2] == ((56 - 28) // 4 + 1, (78 - 28) // 4 + 1)
    for m, per_scale in zip(pred.maps, pred.per_scale):
        np.testing.assert_allclose(m.sum(-1), 1, rtol=1e-5)  # probabilities per position
        np.testing.assert_allclose(per_scale, m.max(axis=(0, 1)))
    np.testing.assert_allclose(pred.scores, pred.per_scale.mean(0))
    # a flip-symmetric image gives a flip-symmetric map
    sym = np.concatenate([image, image[:, ::-1]], axis=1)
    maps = dense_predict(fcn, fcn_variables, sym, shape, scales=(1.0,)).maps[0]
    np.testing.assert_allclose(maps, maps[:, ::-1], atol=1e-6)
