"""torchvision's ImageNet weights: the manifest against torchvision's own Weights enums,
and load_pretrained's offline lookup, hash check, conversion and cache, on random
torchvision models saved as checkpoints in a temporary torch hub cache. Also LeNet5's
shipped Fashion-MNIST weights."""
import copy
import dataclasses
import hashlib
import math
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jaxconv  # noqa: E402
from jaxconv import pretrained  # noqa: E402
from jaxconv.parity import calibrate_batchnorm, randomize, rel_err  # noqa: E402


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache and jaxconv cache under tmp_path; returns the checkpoints dir."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXCONV_CACHE", str(tmp_path / "jaxconv"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert pretrained.torch_hub_checkpoints() == checkpoints
    return checkpoints


def _random_checkpoint(name, path, seed=0, num_classes=1000, size=64):
    """torchvision's ``name`` with random weights and calibrated BatchNorm statistics,
    saved to ``path`` with torch.save (float32, as torchvision's files are); returns the
    model in eval mode. GoogLeNet is built as torchvision builds it for its weights
    (transform_input=True, with the auxiliary heads, whose keys the file holds)."""
    torch.manual_seed(seed)
    kwargs = {}
    if name == "googlenet":
        kwargs = {"transform_input": True, "aux_logits": True, "init_weights": True}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    randomize(model, seed)
    calibrate_batchnorm(model, (4, 3, size, size), seed=seed)
    torch.save(model.state_dict(), path)
    return model


def _named_by_hash(name, directory, seed=0):
    """A random checkpoint named as torchvision names its files: ``<name>-<sha256[:8]>.pth``."""
    tmp = directory / "unnamed.pth"
    model = _random_checkpoint(name, tmp, seed)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = directory / f"{name}-{digest[:8]}.pth"
    tmp.rename(path)
    return model, path, digest[:8]


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def _assert_float32_parity(name, ours, reference, x):
    """The design notes' float32 check: jaxconv's float32 logits are never further from
    torch's float64 logits than 4x torch's own float32 error (+1e-6)."""
    ref64 = _torch_logits(copy.deepcopy(reference).double(), x.astype(np.float64))
    ours_err = rel_err(ours, ref64)
    torch_err = rel_err(_torch_logits(reference, x), ref64)
    print(f"{name}: float32 logits vs torch float64 {ours_err:.1e} (torch float32: {torch_err:.1e})")
    assert ours_err <= 4 * torch_err + 1e-6


# ----------------------------------------------------------------------------- the manifest

def test_manifest_covers_every_model_torchvision_has_weights_for():
    """Every registered model whose torchvision builder has weights is in the manifest with
    exactly torchvision's tags, DEFAULT, file names (whose hex is the hash prefix), URLs,
    preprocessing, class names and published accuracy; no other model is."""
    from torchvision.models import get_model_weights

    manifest = pretrained.torchvision_weights()
    expected = set()
    for name in jaxconv.list_models():
        tv = jaxconv.model_info(name).torchvision
        if tv is None or tv not in torchvision.models.list_models():
            continue
        enum = get_model_weights(tv)
        expected.add(name)
        assert name in manifest, name
        entry = manifest[name]
        assert entry.torchvision == tv and entry.default == enum.DEFAULT.name
        assert list(entry.weights) == [w.name for w in enum]
        for w in enum:
            ours = entry.weights[w.name]
            where = f"{name} {w.name}"
            assert ours.url == w.url and ours.file == w.url.rsplit("/", 1)[1], where
            assert ours.file.rsplit(".", 1)[0].endswith("-" + ours.sha256), where
            assert pretrained.hash_prefix_in_name(ours.file) == ours.sha256, where
            t = w.transforms()
            p = ours.preprocessing
            assert [p.resize] == list(t.resize_size) and [p.crop] == list(t.crop_size), where
            assert p.interpolation == t.interpolation.value, where
            assert p.mean == tuple(t.mean) and p.std == tuple(t.std), where
            metrics = w.meta["_metrics"]["ImageNet-1K"]
            if math.isnan(metrics["acc@1"]):
                assert ours.accuracy is None, where
            else:
                assert ours.accuracy == {"acc@1": metrics["acc@1"], "acc@5": metrics["acc@5"]}, where
            assert ours.num_params == w.meta["num_params"], where
            if w.meta["categories"] is None:
                assert ours.classes is None, where
            else:
                assert pretrained.class_names(ours.classes) == list(w.meta["categories"]), where
    assert set(manifest) == expected
    # the families the issue names are all there, V2 tags included
    assert manifest["resnet50"].default == "IMAGENET1K_V2"
    assert manifest["resnet50"].weights["IMAGENET1K_V2"].file == "resnet50-11ad3fa6.pth"
    assert {"alexnet", "googlenet", "inception_v3", "densenet121", "vgg16_bn", "efficientnet_b7",
            "efficientnet_v2_l", "wide_resnet101_2", "resnext101_64x4d"} <= set(manifest)


# ----------------------------------------------------------------------------- lookup and conversion

@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_checkpoint_in_hub_cache_converts_to_torchvisions_logits(name, hub, monkeypatch):
    """The manifest's lookup, with the entry pointed at a random checkpoint named by its
    real sha256 prefix: the file is found in $TORCH_HOME/hub/checkpoints, its hash checked,
    the conversion (GoogLeNet with transform_input, as its weights need) gives
    torchvision's logits (to float32 rounding), and the cached second call returns identical arrays without
    reading the .pth again."""
    reference, path, prefix = _named_by_hash(name, hub)
    model_weights = pretrained.torchvision_weights()[name]
    entry = dataclasses.replace(model_weights.weights["IMAGENET1K_V1"], file=path.name, sha256=prefix)
    monkeypatch.setitem(model_weights.weights, "IMAGENET1K_V1", entry)

    model, variables, meta = jaxconv.load_pretrained(name, "IMAGENET1K_V1")
    assert meta["weights"] == str(path) and meta["tag"] == "IMAGENET1K_V1"
    assert meta["preprocessing"] == entry.preprocessing and meta["accuracy"] == entry.accuracy
    assert len(meta["classes"]) == 1000 and meta["classes"][281] == "tabby"
    if name == "googlenet":
        assert model.transform_input
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    _assert_float32_parity(name, np.asarray(jax.jit(model.apply)(variables, x)), reference, x)

    cached = list((pretrained.cache_dir() / name).glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith(path.stem)
    mtime = cached[0].stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the .pth was read again")

    monkeypatch.setattr(pretrained, "sha256_of", must_not_run)
    monkeypatch.setattr(jaxconv.convert, "from_torchvision", must_not_run)
    _, again, _ = jaxconv.load_pretrained(name, "IMAGENET1K_V1")
    assert jax.tree.structure(again) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not rewritten


def test_wrong_hash_is_refused_and_check_hash_false_accepts(hub, tmp_path):
    """A file under torchvision's name whose content is not the published checkpoint is
    refused with a message naming the file; check_hash=False loads it (and its unverified
    cache entry never satisfies a checked call)."""
    name, file = "resnet18", "resnet18-f37072fd.pth"
    assert pretrained.torchvision_weights()[name].weights["IMAGENET1K_V1"].file == file
    reference = _random_checkpoint(name, hub / file, seed=1)
    with pytest.raises(ValueError, match=f"{file}.*does not start with f37072fd.*check_hash=False"):
        jaxconv.load_pretrained(name)  # DEFAULT = IMAGENET1K_V1, found in the hub cache
    model, variables, meta = jaxconv.load_pretrained(name, check_hash=False)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    _assert_float32_parity(name, np.asarray(jax.jit(model.apply)(variables, x)), reference, x)
    assert meta["accuracy"] == {"acc@1": 69.758, "acc@5": 89.078}  # the tag's, as the file has its name
    assert [p.name for p in (pretrained.cache_dir() / name).iterdir()][0].endswith("-unverified.npz")
    with pytest.raises(ValueError, match="does not start with f37072fd"):
        jaxconv.load_pretrained(name, "IMAGENET1K_V1")

    # a fine-tuned file of the user's, any name, another number of classes: path= and check_hash
    own = tmp_path / "my_resnet18.pth"
    _random_checkpoint(name, own, seed=2, num_classes=7)
    with pytest.raises(ValueError, match="my_resnet18.pth.*no sha256 prefix.*check_hash=False"):
        jaxconv.load_pretrained(name, path=own)
    model, variables, meta = jaxconv.load_pretrained(name, path=own, check_hash=False, cache=False)
    assert model.num_classes == 7 and meta["classes"] is None and meta["accuracy"] is None
    assert meta["weights"] == str(own) and meta["preprocessing"].resize == 256


def test_missing_file_says_which_file_from_where_and_where_to_put_it(hub, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        jaxconv.load_pretrained("resnet50", "IMAGENET1K_V2")
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(hub) in message
    # the DEFAULT tag when none is given (resnet50's is V2), and a directory given as path=
    with pytest.raises(FileNotFoundError, match="resnet50-11ad3fa6.pth"):
        jaxconv.load_pretrained("resnet50")
    with pytest.raises(FileNotFoundError, match=f"inception_v3_google-0cc3c7bd.pth.*{tmp_path}"):
        jaxconv.load_pretrained("inception_v3", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory"):
        jaxconv.load_pretrained("resnet50", path=tmp_path / "nowhere.pth")


def test_unknown_tags_and_models_without_weights(hub):
    with pytest.raises(KeyError, match="IMAGENET1K_V3.*valid tags: IMAGENET1K_V1, IMAGENET1K_V2"):
        jaxconv.load_pretrained("resnet50", "IMAGENET1K_V3")
    with pytest.raises(KeyError, match="torchvision has no weights for 'lenet5'"):
        jaxconv.load_pretrained("lenet5", "IMAGENET1K_V1")
    with pytest.raises(KeyError, match="no pretrained weights for 'nin_cifar10'"):
        jaxconv.load_pretrained("nin_cifar10")
    with pytest.raises(KeyError, match="unknown model"):
        jaxconv.load_pretrained("resnet5O")


# ----------------------------------------------------------------------------- LeNet5

def test_lenet5_default_weights_with_their_preprocessing():
    """LeNet5's shipped weights, with meta's class names (torchvision's Fashion-MNIST
    names) and preprocessing (the training loop's normalisation) classify Fashion-MNIST's
    test images; the same images without that normalisation do much worse."""
    from PIL import Image

    from jaxconv.data.datasets import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    model, variables, meta = jaxconv.load_pretrained("lenet5")
    assert meta["classes"] == list(torchvision.datasets.FashionMNIST.classes)
    pre = meta["preprocessing"]
    assert pre.mean == FASHION_MNIST_MEAN and pre.std == FASHION_MNIST_STD and pre.crop == pre.resize == 28
    assert meta["weights"].endswith("lenet5_fashion_mnist.npz")
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}")
    from jaxconv.data.datasets import fashion_mnist

    test = fashion_mnist("test")
    n = 1000
    images = [test.source[i][0][..., 0] for i in range(n)]
    labels = np.array([test.source[i][1] for i in range(n)])
    x = np.concatenate([pretrained.preprocess(Image.fromarray(im, "L"), pre) for im in images])
    assert x.shape == (n, 28, 28, 1)
    apply = jax.jit(model.apply)
    accuracy = float((np.asarray(apply(variables, x)).argmax(-1) == labels).mean())
    raw = np.stack(images)[..., None].astype(np.float32) / 255
    raw_accuracy = float((np.asarray(apply(variables, raw)).argmax(-1) == labels).mean())
    print(f"lenet5 on {n} Fashion-MNIST test images: {accuracy:.3f} ({raw_accuracy:.3f} unnormalised)")
    assert accuracy >= 0.85 and raw_accuracy < accuracy - 0.2
