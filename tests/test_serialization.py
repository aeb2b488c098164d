"""save_variables / load_variables: the documented .npz format, atomic writes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import serialization


@pytest.fixture
def variables():
    model = jaxconv.get_model("lenet5")
    return model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path, variables):
    tree = {"params": variables["params"],
            "extra": {"bf16": jnp.arange(5, dtype=jnp.bfloat16), "i64": np.arange(3, dtype=np.int64)}}
    path = jaxconv.save_variables(tmp_path / "v.npz", tree)
    loaded = jaxconv.load_variables(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        assert a.dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_the_format_is_plain_numpy(tmp_path, variables):
    path = jaxconv.save_variables(tmp_path / "v.npz", variables)
    with np.load(path, allow_pickle=False) as archive:
        assert "params/features_0/kernel" in archive.files
        meta = json.loads(str(archive["__jaxconv__"]))
    assert meta["format"] == "jaxconv-variables" and meta["version"] == 1


def test_an_existing_file_is_not_overwritten(tmp_path, variables):
    path = tmp_path / "v.npz"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxconv.save_variables(path, variables)
    assert path.read_bytes() == b"precious"
    jaxconv.save_variables(path, variables, overwrite=True)
    assert jaxconv.load_variables(path)["params"]["features_0"]["kernel"].shape == (5, 5, 1, 6)


def test_a_crash_mid_write_leaves_the_old_file_and_no_debris(tmp_path, variables, monkeypatch):
    path = tmp_path / "v.npz"
    jaxconv.save_variables(path, variables)
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(serialization.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        jaxconv.save_variables(path, {"params": {"w": np.zeros(3)}}, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["v.npz"]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        jaxconv.load_variables(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="junk.npz: not a jaxconv variables file"):
        jaxconv.load_variables(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(ValueError, match="other.npz: not a jaxconv variables file"):
        jaxconv.load_variables(other)
    with pytest.raises(TypeError, match="'params/w' is a str"):
        jaxconv.save_variables(tmp_path / "x.npz", {"params": {"w": "text"}})
