"""Saving and loading variables: ``save_variables`` / ``load_variables``.

The on-disk format is a NumPy ``.npz`` archive (a zip of ``.npy`` files), readable with
``numpy.load(path, allow_pickle=False)`` and nothing else:

* one array per leaf, named by its path in the variables tree joined with ``/``
  (``params/features_0/kernel``, ``batch_stats/features_1/mean``);
* one extra entry ``__jaxconv__``: a JSON string ``{"format": "jaxconv-variables",
  "version": 1, "dtypes": {...}}`` recording leaves whose dtype ``.npy`` cannot hold
  (bfloat16 is stored as its uint16 bit pattern and restored on load).

Writes are atomic: the archive is written to a temporary file in the same directory,
flushed to disk, then renamed over the final name, so a crash mid-write never leaves a
half file under that name. An existing file is never replaced unless
``overwrite=True``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

FORMAT = "jaxconv-variables"
VERSION = 1
_META = "__jaxconv__"


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        key = str(key)
        if "/" in key or not key:
            raise ValueError(f"cannot save variables: key {key!r} under '{prefix or '/'}' is empty or "
                             f"contains '/'")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "/"))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            flat[path] = value
        else:
            raise TypeError(f"cannot save variables: '{path}' is a {type(value).__name__}, not an array")
    return flat


def save_variables(path: str | os.PathLike, variables: Mapping, overwrite: bool = False) -> str:
    """Write ``variables`` (nested dicts of arrays) to ``path`` atomically; returns the path."""
    import jax

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    flat = _flatten(variables)
    arrays, dtypes = {}, {}
    for key, value in flat.items():
        arr = np.asarray(jax.device_get(value))
        if arr.dtype.name == "bfloat16":
            dtypes[key] = "bfloat16"
            arr = arr.view(np.uint16)
        elif arr.dtype.kind not in "biuf":
            raise TypeError(f"cannot save variables: '{key}' has unsupported dtype {arr.dtype}")
        arrays[key] = arr
    meta = json.dumps({"format": FORMAT, "version": VERSION, "dtypes": dtypes})
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_META: np.array(meta)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Read variables written by :func:`save_variables` as nested dicts of numpy arrays."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such variables file: {path}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a jaxconv variables file (unreadable archive: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a jaxconv variables file (a single .npy array)")
    with archive:
        if _META not in archive.files:
            raise ValueError(f"{path}: not a jaxconv variables file (no {_META} entry)")
        try:
            meta = json.loads(str(archive[_META]))
            assert meta["format"] == FORMAT
        except Exception as e:
            raise ValueError(f"{path}: not a jaxconv variables file (bad {_META} entry)") from e
        if meta.get("version", 0) > VERSION:
            raise ValueError(f"{path}: written by a newer jaxconv (format version {meta['version']})")
        tree: dict[str, Any] = {}
        for key in archive.files:
            if key == _META:
                continue
            try:
                arr = archive[key]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise ValueError(f"{path}: entry '{key}' is unreadable ({e})") from e
            if meta["dtypes"].get(key) == "bfloat16":
                import ml_dtypes

                arr = arr.view(ml_dtypes.bfloat16)
            node = tree
            parts = key.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = arr
    return tree
