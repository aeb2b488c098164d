"""The torch-free .pth reader against files written by torch.save."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from jaxconv.convert import PthError, read_pth


def save(obj, path):
    torch.save(obj, path)
    return path


def test_round_trip_of_dtypes_shared_and_strided_storages(tmp_path):
    base = torch.randn(6, 5)
    state = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.arange(10),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(6, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "transposed": base.t(),                # non-contiguous view of a shared storage
        "offset": base[2:],                    # storage offset
        "strided": base[::2, 1::2],           # offset and steps
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "conv": torch.nn.Conv2d(3, 4, 3).state_dict(),  # nested OrderedDict with _metadata
    }
    loaded = read_pth(save(state, tmp_path / "w.pth"))
    assert set(loaded) == set(state)
    for key, value in state.items():
        if key == "conv":
            for k, v in value.items():
                np.testing.assert_array_equal(loaded[key][k], v.numpy())
            continue
        got = loaded[key]
        if key == "bf16":
            assert got.dtype.name == "bfloat16"
            np.testing.assert_array_equal(got.astype(np.float32), value.float().numpy())
            continue
        expected = value.detach().numpy()
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected)


def test_module_state_dict_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    loaded = read_pth(save(model.state_dict(), tmp_path / "m.pth"))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
    assert loaded["1.num_batches_tracked"].dtype == np.int64


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": evil}, path)
    assert not marker.exists()
    with pytest.raises(PthError, match=r"refused to load '(posix|os)\.system'"):
        read_pth(path)
    assert not marker.exists()


def test_a_pickled_module_is_refused(tmp_path):
    path = save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(PthError, match="refused to load 'torch.nn.modules.linear.Linear'"):
        read_pth(path)


def test_a_truncated_file_gives_a_clear_error(tmp_path):
    path = save({"w": torch.randn(100, 100)}, tmp_path / "w.pth")
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PthError, match="cut.pth: truncated or corrupt"):
        read_pth(cut)


def test_a_zip_without_its_pickle_gives_a_clear_error(tmp_path):
    path = tmp_path / "nopickle.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data/0", b"\0" * 16)
        z.writestr("archive/version", "3\n")
    with pytest.raises(PthError, match="nopickle.pth: expected one data.pkl"):
        read_pth(path)


def test_a_missing_storage_gives_a_clear_error(tmp_path):
    path = save({"w": torch.randn(3)}, tmp_path / "w.pth")
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.namelist():
            if "/data/" not in item:
                dst.writestr(item, src.read(item))
    with pytest.raises(PthError, match="missing from the archive"):
        read_pth(broken)


def test_legacy_format_round_trip_and_refusal(tmp_path):
    # torch's pre-1.6 format (pickles followed by raw storages), as old checkpoints have it
    base = torch.randn(4, 6, dtype=torch.float64)
    state = {"w": torch.randn(3, 2), "t": base.t(), "tail": base[1:], "i": torch.arange(3)}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    loaded = read_pth(legacy)
    for key, value in state.items():
        assert loaded[key].dtype == value.numpy().dtype
        np.testing.assert_array_equal(loaded[key], value.numpy())
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    torch.save({"w": torch.zeros(1), "x": evil}, tmp_path / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(PthError, match="refused to load"):
        read_pth(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


def test_other_files_are_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(PthError, match="notes.txt: not a torch checkpoint"):
        read_pth(text)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        read_pth(tmp_path / "absent.pth")


def test_out_of_bounds_geometry_is_refused(tmp_path):
    # A crafted tensor whose size/stride reads past its storage must not read memory.
    path = save({"w": torch.randn(4)}, tmp_path / "w.pth")
    with zipfile.ZipFile(path) as z:
        name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        data = z.read(name)
        others = {n: z.read(n) for n in z.namelist() if n != name}
    # size (4,) -> (400,)
    tampered = data.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    assert tampered != data
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(name, tampered)
        for n, d in others.items():
            z.writestr(n, d)
    with pytest.raises(PthError, match="reads past its storage"):
        read_pth(bad)
