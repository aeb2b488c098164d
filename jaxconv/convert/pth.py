"""A torch-free reader of ``torch.save``'s zip format (torch >= 1.6).

The archive holds ``<prefix>/data.pkl`` (a pickle of the saved object), one file per
storage under ``<prefix>/data/<key>`` and ``<prefix>/byteorder``. The pickle refers to
storages through persistent ids ``('storage', StorageType, key, location, numel)`` and
rebuilds tensors with ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)``.

The pickle is read by an unpickler whose ``find_class`` only knows what a state_dict
needs (``collections.OrderedDict``, torch's tensor/parameter rebuild functions and the
storage types), each mapped to a local numpy implementation; anything else is refused
with :class:`PthError` before it could run, so a malicious file never executes code.
Tensors come back as numpy arrays with torch's dtype, shape and values (views into
shared storages, offsets and non-contiguous strides are resolved into copies).
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np


class PthError(ValueError):
    """A file that is not a readable torch state_dict; the message names the file."""


def _bfloat16():
    import ml_dtypes  # ships with jax

    return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(dtype() if callable(dtype) and not isinstance(dtype, type) else dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise PthError(f"invalid tensor geometry: size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size:
        raise PthError(f"tensor of size {size}, stride {stride} at offset {offset} reads past its "
                       f"storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)  # an owned, C-contiguous copy


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, archive: zipfile.ZipFile, prefix: str, byteorder: str, where: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder, self._where = archive, prefix, byteorder, where
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise PthError(
                f"{self._where}: refused to load '{module}.{name}': only state_dicts of tensors are "
                f"read (torch.save(model.state_dict(), path)); the file asks for another Python "
                f"object, which could run code") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise PthError(f"{self._where}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(entry)
            except KeyError:
                raise PthError(f"{self._where}: storage '{entry}' is missing from the archive") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < int(numel) * dtype.itemsize:
                raise PthError(f"{self._where}: storage '{entry}' holds {len(raw)} bytes, "
                               f"fewer than its {numel} elements need")
            arr = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self._storages[key] = arr.astype(storage_type.dtype, copy=False)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:  # the same storage viewed as another dtype
            raise PthError(f"{self._where}: storage '{key}' is used with two dtypes")
        return storage


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_pth(path: str | os.PathLike) -> Any:
    """Read a ``torch.save``'d state_dict (or nested dicts of tensors) as numpy arrays.

    Raises :class:`PthError` naming the file for anything that is not such a file:
    a truncated or corrupt archive, one without its pickle, or a pickle that asks for
    anything but tensors and dicts. torch's legacy (pre-1.6) format is read as well.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no such weights file: {where}")
    if not zipfile.is_zipfile(where):
        with open(where, "rb") as f:
            head = f.read(16)
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
            return _read_legacy(where)  # torch's legacy (pre-1.6) pickle format
        if head[:4] == b"PK\x03\x04":
            raise PthError(f"{where}: truncated or corrupt zip archive")
        raise PthError(f"{where}: not a torch checkpoint (expected the zip format of torch.save)")
    try:
        with zipfile.ZipFile(where) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise PthError(f"{where}: expected one data.pkl in the archive, found {len(pickles)}: "
                               f"not a torch.save file")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
                if byteorder not in ("little", "big"):
                    raise PthError(f"{where}: unknown byteorder {byteorder!r}")
            with archive.open(pickles[0]) as f:
                try:
                    return _StateDictUnpickler(f, archive, prefix, byteorder, where).load()
                except PthError:
                    raise
                except Exception as e:  # malformed pickle stream
                    raise PthError(f"{where}: unreadable pickle in {pickles[0]}: {e}") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise PthError(f"{where}: truncated or corrupt torch checkpoint ({e})") from e


# ----------------------------------------------------------------------------- legacy format

class _LegacyTensor:
    """A tensor of a legacy file, rebuilt once its storage's bytes (which follow the
    pickle in the file) have been read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _LegacyUnpickler(pickle.Unpickler):
    """The pickles of torch's legacy (pre-1.6) format: the same safe globals as the zip
    format, storages as 6-tuples ``('storage', type, key, location, numel, view)``."""

    def __init__(self, file: BinaryIO, where: str):
        super().__init__(file)
        self._where = where
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: _LegacyTensor(storage, offset, size, stride)
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise PthError(
                f"{self._where}: refused to load '{module}.{name}': only state_dicts of tensors are "
                f"read; the file asks for another Python object, which could run code") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise PthError(f"{self._where}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        key = str(key)
        known = self.storages.setdefault(key, (storage_type.dtype, int(numel)))
        if known[0] != storage_type.dtype:
            raise PthError(f"{self._where}: storage '{key}' is used with two dtypes")
        view_offset = 0
        if view is not None:  # (view key, offset, size) into the root storage
            view_offset = int(view[1])
        return (key, view_offset)


def _resolve_legacy(obj, storages: dict[str, np.ndarray]):
    if isinstance(obj, _LegacyTensor):
        key, view_offset = obj.storage
        return _rebuild_tensor(storages[key], view_offset + int(obj.offset), obj.size, obj.stride)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve_legacy(v, storages)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_legacy(v, storages) for v in obj)
    return obj


def _read_legacy(where: str) -> Any:
    """torch's legacy (pre-1.6) format: pickles of the magic number, the protocol
    version, the system info and the object, a pickle of the storage keys, then each
    storage as an int64 element count followed by its raw bytes."""
    try:
        with open(where, "rb") as f:
            if _LegacyUnpickler(f, where).load() != _LEGACY_MAGIC:
                raise PthError(f"{where}: not a torch checkpoint (bad magic number)")
            if _LegacyUnpickler(f, where).load() != 1001:
                raise PthError(f"{where}: unknown legacy torch protocol version")
            sys_info = _LegacyUnpickler(f, where).load()
            order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
            unpickler = _LegacyUnpickler(f, where)
            result = unpickler.load()
            keys = _LegacyUnpickler(f, where).load()
            storages = {}
            for key in keys:
                key = str(key)
                if key not in unpickler.storages:
                    raise PthError(f"{where}: storage '{key}' is not used by the pickle")
                dtype, numel = unpickler.storages[key]
                head = f.read(8)
                if len(head) != 8:
                    raise PthError(f"{where}: truncated legacy checkpoint")
                count = int(np.frombuffer(head, np.dtype(f"{order}i8"))[0])
                if count < numel:
                    raise PthError(f"{where}: storage '{key}' holds {count} elements, fewer than "
                                   f"its tensors need ({numel})")
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise PthError(f"{where}: truncated legacy checkpoint")
                storages[key] = np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype, copy=False)
            missing = set(unpickler.storages) - set(storages)
            if missing:
                raise PthError(f"{where}: storages {sorted(missing)[:3]} are missing from the file")
            return _resolve_legacy(result, storages)
    except PthError:
        raise
    except Exception as e:  # malformed pickle stream or truncated file
        raise PthError(f"{where}: unreadable legacy torch checkpoint: {e}") from e
