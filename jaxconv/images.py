"""Loading photos for classification: any file Pillow reads, in any mode, as 8-bit RGB
(or 8-bit grayscale for 1-channel models), upright, or a clear :class:`ImageError`.

What :func:`load_image` does with each Pillow mode:

* ``RGB``: as it is.  ``1``, ``L``: gray -> R = G = B (``1`` gives 0 or 255).
* ``P``: through its palette; a palette with a transparent entry is treated as ``RGBA``.
* Alpha (``LA``, ``PA``, ``RGBA``, ``La``, ``RGBa``, ``P`` with transparency): composited
  on a **white** background (a transparent pixel shows as white, as a viewer shows it).
* ``CMYK``: Pillow's conversion (``R = 255 - C - K`` ...), no colour profile applied.
* ``I;16`` (and ``I;16B``/``I;16L``/``I;16N``): 16-bit, scaled to 8 bits by ``v / 257``
  rounded (0 -> 0, 65535 -> 255).
* ``I`` (32-bit integers, how 16-bit PNG and TIFF data also come out): read as 16-bit
  data, clipped to [0, 65535] and scaled like ``I;16``.
* ``F`` (32-bit floats): values within [0, 1] are scaled by 255; any other range is
  stretched linearly from its minimum to its maximum onto [0, 255]; NaN becomes 0.
* anything else Pillow can convert (``YCbCr``, ``HSV``, ``RGBX``, ...): ``convert("RGB")``.

The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a phone photo is
upright. Pillow's decompression-bomb guard is kept as it is (``Image.MAX_IMAGE_PIXELS``):
an image above the limit, which Pillow warns about, and one above twice the limit, which
Pillow refuses, are both refused here with an :class:`ImageError`. Truncated files are
refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off). Multi-frame files give their
first frame.
"""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_uint8_gray(values: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel 16-bit, 32-bit integer or float array -> uint8, as the module says."""
    if mode in _16BIT_MODES or mode == "I":
        v = np.clip(values.astype(np.float64), 0, 65535)
        return np.rint(v / 257.0).astype(np.uint8)
    # mode F
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(v.min(initial=0.0)), float(v.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(v * 255.0).astype(np.uint8)
    span = hi - lo
    if span == 0:
        return np.zeros(v.shape, np.uint8)
    return np.rint((v - lo) * (255.0 / span)).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> an 8-bit ``RGB`` image, by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _16BIT_MODES or mode in ("I", "F"):
        gray = _to_uint8_gray(np.asarray(image), mode)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An image as ``RGB`` (``channels == 3``) or 8-bit grayscale ``L`` (``channels == 1``:
    the RGB image's ITU-R 601 luma, Pillow's ``convert("L")``)."""
    rgb = to_rgb(image)
    if channels == 3:
        return rgb
    if channels == 1:
        return rgb.convert("L")
    raise ValueError(f"images have 1 or 3 channels, not {channels}")


def load_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Read ``path`` as an upright 8-bit image: ``RGB`` for ``channels=3``, ``L`` for 1.

    Raises :class:`ImageError` (a ``ValueError``) naming the file for a missing,
    unreadable, non-image, truncated or too large (decompression bomb) file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageError(path, "is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = _upright(opened)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"refused as a possible decompression bomb ({e}); raise "
                               f"PIL.Image.MAX_IMAGE_PIXELS if you trust this file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, f"unreadable or truncated image ({e})") from None
    return to_channels(image, channels)


def _upright(image: Image.Image) -> Image.Image:
    """A copy of ``image`` with its EXIF orientation tag (0x0112) applied; a broken EXIF
    block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, SyntaxError, struct.error):
        return image.copy()
