"""Reading the IDX format (MNIST, Fashion-MNIST), gzipped or not, with validated headers.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the number of
dimensions -- then one big-endian uint32 per dimension, then the data, big-endian, in
C order. Every field is checked and the size of the data must match the header exactly;
any problem raises :class:`IdxError` naming the file.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

# type code -> big-endian numpy dtype
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
    """A malformed or unexpected IDX file."""


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                try:
                    with gzip.GzipFile(fileobj=f) as g:
                        return g.read()
                except (OSError, EOFError) as e:
                    raise IdxError(f"{path}: corrupt gzip stream ({e})") from e
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such IDX file: {path}") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file into a native-endian numpy array."""
    if len(data) < 4:
        raise IdxError(f"{name}: {len(data)} bytes, too short for an IDX header (4-byte magic number)")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(f"{name}: bad IDX magic number {data[:4].hex()} (must start with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise IdxError(f"{name}: unknown IDX data type 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                       f"file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise IdxError(f"{name}: {what}: header shape {shape} of {dtype.name} needs {expected} data bytes, "
                       f"file has {actual}")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, *, ndim: int | None = None, dtype=None,
             shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain); optionally require ``ndim``, ``dtype`` and
    ``shape`` (``None`` entries match any size)."""
    path = os.fspath(path)
    arr = parse_idx(_read_bytes(path), path)
    if ndim is not None and arr.ndim != ndim:
        raise IdxError(f"{path}: expected a {ndim}-dimensional IDX array, header says shape {arr.shape}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise IdxError(f"{path}: expected IDX data of type {np.dtype(dtype).name}, header says {arr.dtype.name}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "x".join("N" if s is None else str(s) for s in shape)
            raise IdxError(f"{path}: expected shape {want}, header says {arr.shape}")
    return arr


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> str:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); never overwrites."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists")
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_TYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(IDX_TYPES[codes[native]]).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)
    return path
