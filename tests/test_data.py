"""jaxconv.data: IDX reading and validation, datasets, augmentation, the grain pipeline."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from jaxconv.data import augment as A
from jaxconv.data.datasets import ArraySource, fashion_mnist, get_dataset, image_folder, synthetic
from jaxconv.data.idx import IdxError, parse_idx, read_idx, write_idx
from jaxconv.data.pipeline import eval_dataset, train_dataset


# ----------------------------------------------------------------------------- IDX

def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.astype(">u1").tobytes()


def test_idx_roundtrip_gzip_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)
    f32 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "f.idx", f32)
    out = read_idx(tmp_path / "f.idx")
    assert out.dtype == np.float32 and np.array_equal(out, f32)
    with pytest.raises(FileExistsError):
        write_idx(tmp_path / "a.idx", arr)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "magic"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "unknown IDX data type 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x04" + b"\x01\x02", "truncated: header shape (4,)"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x01\x02", "trailing bytes"),
])
def test_idx_header_validation(data, message):
    with pytest.raises(IdxError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_idx(data, "bad.idx")
    assert "bad.idx" in str(e.value)


def test_idx_expectations_and_corrupt_gzip(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((3, 5, 5), np.uint8))
    with pytest.raises(IdxError, match=r"x.gz: expected shape Nx28x28, header says \(3, 5, 5\)"):
        read_idx(tmp_path / "x.gz", shape=(None, 28, 28))
    with pytest.raises(IdxError, match="expected a 1-dimensional"):
        read_idx(tmp_path / "x.gz", ndim=1)
    with pytest.raises(IdxError, match="expected IDX data of type int32"):
        read_idx(tmp_path / "x.gz", dtype=np.int32)
    (tmp_path / "c.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(10, np.uint8)))[:-12])
    with pytest.raises(IdxError, match="c.gz: corrupt gzip"):
        read_idx(tmp_path / "c.gz")
    with pytest.raises(FileNotFoundError, match="no such IDX file"):
        read_idx(tmp_path / "missing.gz")


def _fake_fashion(tmp_path, name="fm", n_img=6, n_lab=6, label_max=9, size=28):
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(0)
    write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_img, size, size), dtype=np.uint8))
    labels = rng.integers(0, label_max + 1, n_lab).astype(np.uint8)
    labels[0] = label_max
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels)
    return str(d)


def test_fashion_mnist_reader_validates(tmp_path):
    ds = fashion_mnist("test", _fake_fashion(tmp_path))
    assert len(ds) == 6 and ds.num_classes == 10 and ds.channels == 1
    image, label = ds.source[0]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and label == 9
    with pytest.raises(IdxError, match="holds 6 images but .* holds 5 labels"):
        fashion_mnist("test", _fake_fashion(tmp_path, "a", n_lab=5))
    with pytest.raises(IdxError, match="label 10 out of range"):
        fashion_mnist("test", _fake_fashion(tmp_path, "b", label_max=10))
    with pytest.raises(IdxError, match=r"expected shape Nx28x28"):
        fashion_mnist("test", _fake_fashion(tmp_path, "c", size=27))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz not found .*apt-get install"):
        fashion_mnist("train", str(tmp_path / "c"))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_sizes():
    train, test = fashion_mnist("train"), fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    labels = train.source.labels
    assert np.bincount(labels).tolist() == [6000] * 10


def test_image_folder(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("val", ("dog",))):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            for i in range(2):
                Image.fromarray(np.full((9, 7, 3), 40 * i + (c == "dog") * 100, np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    tr = image_folder(str(tmp_path), "train")
    assert tr.class_names == ("cat", "dog") and len(tr) == 4
    image, label = tr.source[2]
    assert image.shape == (9, 7, 3) and label == 1 and image[0, 0, 0] == 100
    va = get_dataset(str(tmp_path), "test")
    assert va.num_classes == 2 and [lab for _, lab in (va.source[i] for i in range(len(va)))] == [1, 1]
    os.makedirs(tmp_path / "val" / "bird")
    with pytest.raises(ValueError, match=r"\['bird'\] are not among the training classes"):
        image_folder(str(tmp_path), "val")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x").mkdir()
    (tmp_path / "broken" / "x" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot decode image .*a.png"):
        image_folder(str(tmp_path / "broken")).source[0]


# ----------------------------------------------------------------------------- augmentation

def test_ten_crop_corners_center_and_reflections():
    img = np.arange(6 * 8 * 1, dtype=np.uint8).reshape(6, 8, 1)
    crops = A.ten_crop(img, (4, 4))
    assert crops.shape == (10, 4, 4, 1)
    np.testing.assert_array_equal(crops[0], img[:4, :4])
    np.testing.assert_array_equal(crops[1], img[:4, 4:])
    np.testing.assert_array_equal(crops[2], img[2:, :4])
    np.testing.assert_array_equal(crops[3], img[2:, 4:])
    np.testing.assert_array_equal(crops[4], img[1:5, 2:6])
    for i in range(5):
        np.testing.assert_array_equal(crops[5 + i], crops[i][:, ::-1])


def test_pad_crop_flip_and_random_resized_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    seen = set()
    for _ in range(40):
        out = A.pad_crop(img, 3, rng)
        assert out.shape == img.shape
        # the crop is a window of the zero-padded image
        padded = np.pad(img, ((3, 3), (3, 3), (0, 0)))
        hits = [(t, l) for t in range(7) for l in range(7) if np.array_equal(padded[t:t + 28, l:l + 28], out)]
        assert hits
        seen.add(hits[0])
    assert len(seen) > 5
    flips = [A.random_flip(img, rng) is img for _ in range(100)]
    assert 20 < sum(flips) < 80
    big = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for _ in range(10):
        assert A.random_resized_crop(big, (24, 24), rng).shape == (24, 24, 3)


@pytest.mark.parametrize("recipe,channels", [("crop-flip", 1), ("crop-flip", 3), ("flip", 3), ("none", 1)])
def test_batched_transform_is_the_per_image_recipe(recipe, channels):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 16, 16, channels), dtype=np.uint8)
    mean, std = (0.3, 0.4, 0.5)[:channels], (0.2, 0.25, 0.3)[:channels]
    t = A.TrainTransform(recipe, (16, 16), mean, std)
    out = t.batch(images, np.random.default_rng(7))
    assert out.dtype == np.float32 and out.shape == images.shape
    # the reference: the same draws (tops, lefts, flips for the 16 records) applied image by image
    draws = np.random.default_rng(7)
    tops = lefts = np.full(16, 2 if recipe == "crop-flip" else 0)
    flips = np.zeros(16, bool)
    if recipe == "crop-flip":
        tops, lefts = draws.integers(0, 5, 16), draws.integers(0, 5, 16)
    if recipe != "none":
        flips = draws.random(16) < 0.5
    pad = 2 if recipe == "crop-flip" else 0
    for i in range(16):
        window = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))[tops[i]:tops[i] + 16, lefts[i]:lefts[i] + 16]
        expect = A.normalize(A.to_float(window[:, ::-1] if flips[i] else window), mean, std)
        np.testing.assert_array_equal(out[i], expect)
    if recipe != "none":
        assert 0 < flips.sum() < 16
    # a slice of a global batch draws what the whole batch would
    part = t.batch(images[5:9], np.random.default_rng(7), offset=5, total=16)
    np.testing.assert_array_equal(part, out[5:9])
    assert not t.can_batch((28, 28, 1)) and not A.TrainTransform("rrc", (16, 16), mean, std).can_batch((16, 16, 1))


def test_pca_lighting_and_pca_from_images():
    rng = np.random.default_rng(1)
    x = np.full((4, 4, 3), 0.5, np.float32)
    out = A.pca_lighting(x, np.random.default_rng(5))
    alpha = np.random.default_rng(5).normal(0, 0.1, 3).astype(np.float32)
    np.testing.assert_allclose(out - x, np.broadcast_to(A.IMAGENET_EIGVEC @ (alpha * A.IMAGENET_EIGVAL), x.shape),
                               atol=1e-6)
    # pixels drawn with a known covariance: the PCA recovers its eigen-decomposition
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lam = np.array([0.04, 0.01, 0.0025])
    pix = 0.5 + rng.normal(size=(200000, 3)) * np.sqrt(lam) @ q.T
    eigval, eigvec = A.pca_from_images([pix.reshape(400, 500, 3)])
    np.testing.assert_allclose(eigval, lam, rtol=0.03)
    np.testing.assert_allclose(np.abs(eigvec.T @ q), np.eye(3), atol=0.02)


def test_train_and_eval_transforms():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    t = A.TrainTransform("alexnet", (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, y = t((rgb, 3), np.random.default_rng(0))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32 and y == 3
    x2, _ = t((rgb, 3), np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)   # deterministic given the generator
    gray = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    x, _ = A.TrainTransform("none", (28, 28), (0.2860,), (0.3530,))((gray, 1), None)
    np.testing.assert_allclose(x, (gray / 255.0 - 0.2860) / 0.3530, atol=1e-6)
    x, _ = A.EvalTransform((24, 24), (0.5,) * 3, (0.25,) * 3, resize=28, crops="ten")((rgb, 0))
    assert x.shape == (10, 24, 24, 3)
    x, _ = A.EvalTransform((24, 24), (0.5,) * 3, (0.25,) * 3, resize=28)((rgb, 0))
    assert x.shape == (24, 24, 3)
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        A.TrainTransform("mixup", (28, 28), (0.5,), (0.5,))


# ----------------------------------------------------------------------------- pipeline

def _labels_source(n=40):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    return ArraySource(images, np.arange(n))


class _Noisy:
    """A random transform whose output reveals the record and the random draw."""

    def __call__(self, record, rng):
        image, label = record
        return image.astype(np.float32) + np.float32(rng.random()), np.int32(label)


def test_pipeline_epochs_shuffle_and_process_shards():
    src = _labels_source(40)
    kw = dict(global_batch=8, num_steps=10, seed=3, threads=1)
    one = list(train_dataset(src, _Noisy(), process_index=0, process_count=1, **kw))
    assert len(one) == 10
    labels = np.stack([b[1] for b in one])
    # epochs of 5 steps: every record once per epoch, a different order each epoch
    assert sorted(labels[:5].ravel()) == list(range(40)) == sorted(labels[5:].ravel())
    assert not np.array_equal(labels[:5], labels[5:])
    assert not np.array_equal(labels[:5].ravel(), np.arange(40))
    # two processes: their local halves, concatenated, are exactly the one-process global batches
    halves = [list(train_dataset(src, _Noisy(), process_index=p, process_count=2, **kw)) for p in (0, 1)]
    for step in range(10):
        for k in (0, 1):
            np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]), one[step][k])


def test_pipeline_iterator_state_resumes_exactly():
    src = _labels_source(40)
    kw = dict(global_batch=8, num_steps=10, seed=1, threads=2, process_index=0, process_count=1)
    it = iter(train_dataset(src, _Noisy(), **kw))
    for _ in range(4):
        next(it)
    state = it.get_state()
    rest = [b[0] for b in it]
    it2 = iter(train_dataset(src, _Noisy(), **kw))
    it2.set_state(state)
    again = [b[0] for b in it2]
    assert len(rest) == 6
    for a, b in zip(rest, again):
        np.testing.assert_array_equal(a, b)


def test_batched_pipeline_epochs_shards_and_resume():
    # ArraySource + crop-flip at the data's size: batches are gathered and augmented as one
    n = 40
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    src = ArraySource(images, np.arange(n))
    t = A.TrainTransform("crop-flip", (8, 8), (0.5,), (0.25,))
    kw = dict(global_batch=8, num_steps=10, seed=3, threads=2)
    one = list(train_dataset(src, t, process_index=0, process_count=1, **kw))
    labels = np.stack([b[1] for b in one])
    assert len(one) == 10 and one[0][0].shape == (8, 8, 8, 1) and one[0][0].dtype == np.float32
    assert sorted(labels[:5].ravel()) == list(range(n)) == sorted(labels[5:].ravel())
    assert not np.array_equal(labels[:5], labels[5:])
    # every image is a crop-and-flip of its record, and the draws vary
    plain = A.normalize(A.to_float(np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))), (0.5,), (0.25,))
    shifts = set()
    for x, y in one[:2]:
        for xi, yi in zip(x, y):
            hits = [(tp, lf, f) for tp in range(3) for lf in range(3) for f in (0, 1)
                    if np.array_equal(xi, (plain[yi, tp:tp + 8, lf:lf + 8])[:, ::-1 if f else 1])]
            assert hits
            shifts.add(hits[0])
    assert len(shifts) > 4
    halves = [list(train_dataset(src, t, process_index=p, process_count=2, **kw)) for p in (0, 1)]
    for step in range(10):
        for k in (0, 1):
            np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]), one[step][k])
    it = iter(train_dataset(src, t, process_index=0, process_count=1, **kw))
    for _ in range(4):
        next(it)
    it2 = iter(train_dataset(src, t, process_index=0, process_count=1, **kw))
    it2.set_state(it.get_state())
    for a, b in zip(it2, one[4:]):
        np.testing.assert_array_equal(a[0], b[0])


def test_pipeline_worker_processes_load_the_same_batches():
    images = np.random.default_rng(3).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
    src = ArraySource(images, np.arange(32))
    t = A.TrainTransform("crop-flip", (8, 8), (0.5,), (0.25,))
    kw = dict(global_batch=8, num_steps=6, seed=2, process_index=0, process_count=1)
    threads = list(train_dataset(src, t, threads=1, **kw))
    workers = list(train_dataset(src, t, threads=1, workers=1, **kw))
    assert len(workers) == 6
    for a, b in zip(threads, workers):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_eval_pipeline_pads_and_weights():
    src = _labels_source(13)
    t = A.EvalTransform((4, 4), (0.0,), (1.0,))
    batches = {}
    for p in range(2):
        ds, steps = eval_dataset(src, t, global_batch=4, process_index=p, process_count=2, threads=1)
        batches[p] = list(ds)
    assert steps == 4 and all(len(b) == 4 for b in batches.values())
    labels = np.concatenate([np.concatenate([batches[0][s][1], batches[1][s][1]]) for s in range(4)])
    weights = np.concatenate([np.concatenate([batches[0][s][2], batches[1][s][2]]) for s in range(4)])
    assert weights.sum() == 13 and labels[weights > 0].tolist() == list(range(13))


def test_batched_eval_pipeline_equals_the_per_record_one():
    images = np.random.default_rng(2).integers(0, 256, (13, 4, 4, 3), dtype=np.uint8)
    fast_src = ArraySource(images, np.arange(13))
    slow_src = [fast_src[i] for i in range(13)]               # a plain sequence: the per-record path
    t = A.EvalTransform((4, 4), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert t.can_batch((4, 4, 3)) and not A.EvalTransform((4, 4), (0.5,), (0.5,), crops="ten").can_batch((4, 4, 3))
    for p in range(2):
        fast, steps = eval_dataset(fast_src, t, global_batch=4, process_index=p, process_count=2, threads=1)
        slow, _ = eval_dataset(slow_src, t, global_batch=4, process_index=p, process_count=2, threads=1)
        fast, slow = list(fast), list(slow)
        assert steps == 4 and len(fast) == len(slow) == 4
        for a, b in zip(fast, slow):
            for x, y in zip(a, b):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)


def test_synthetic_dataset_is_deterministic():
    a, b = synthetic("train", n=16, size=(8, 8), channels=3), synthetic("train", n=16, size=(8, 8), channels=3)
    for i in range(16):
        np.testing.assert_array_equal(a.source[i][0], b.source[i][0])
    assert a.source[0][0].shape == (8, 8, 3)
    assert not np.array_equal(a.source[0][0], synthetic("test", n=16, size=(8, 8), channels=3).source[0][0])
