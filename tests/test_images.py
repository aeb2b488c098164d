"""jaxconv.images.load_image: every Pillow mode, EXIF orientation, decompression bombs,
truncated and non-image files."""
import numpy as np
import pytest
from PIL import Image

from jaxconv.images import ImageError, load_image, to_rgb


def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return str(path)


def _rgb(path, channels=3):
    image = load_image(path, channels)
    assert image.mode == ("RGB" if channels == 3 else "L")
    return np.asarray(image)


def test_rgb_is_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _rgb(_save(tmp_path, Image.fromarray(pixels), "x.png"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


def test_bilevel_and_gray(tmp_path):
    bits = np.zeros((4, 6), bool)
    bits[:, :3] = True
    out = _rgb(_save(tmp_path, Image.fromarray(bits), "bits.png"))
    assert out.shape == (4, 6, 3)
    assert (out[:, :3] == 255).all() and (out[:, 3:] == 0).all()
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    out = _rgb(_save(tmp_path, Image.fromarray(gray, "L"), "gray.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    np.testing.assert_array_equal(_rgb(str(tmp_path / "gray.png"), channels=1), gray)


def test_sixteen_bit_scaled_to_eight(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)     # 0, 1, 128, 255 in 8 bits
    image = Image.new("I;16", (4, 1))
    image.putdata(values.ravel().tolist())
    assert image.mode == "I;16"
    path = _save(tmp_path, image, "deep.png")
    assert Image.open(path).mode in ("I;16", "I")               # however Pillow reads it back
    out = _rgb(path)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    for mode in ("I;16", "I;16B"):                                 # in memory, either byte order
        image = Image.new(mode, (4, 1))
        image.putdata(values.ravel().tolist())
        np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 0], [0, 1, 128, 255])


def test_int32_read_as_sixteen_bit(tmp_path):
    values = np.array([[-5, 0, 65535, 100000]], np.int32)
    out = _rgb(_save(tmp_path, Image.fromarray(values, "I"), "int.tiff"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 0, 255, 255])


def test_float_images(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = _rgb(_save(tmp_path, Image.fromarray(unit, "F"), "unit.tiff"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    wide = np.array([[-10.0, 0.0, 30.0]], np.float32)             # stretched min..max
    out = _rgb(_save(tmp_path, Image.fromarray(wide, "F"), "wide.tiff"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 255])


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    index = np.array([[0, 1, 2]], np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette)
    out = _rgb(_save(tmp_path, image, "pal.png"))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    image.info["transparency"] = 1                                 # green entry transparent
    out = _rgb(_save(tmp_path, image, "pal_t.png", transparency=1))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]])
    gif = _rgb(_save(tmp_path, image, "pal_t.gif", transparency=1))
    np.testing.assert_array_equal(gif[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]])


def test_alpha_composited_on_white(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [0, 0, 0, 128]]], np.uint8)
    out = _rgb(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)        # half black over white
    la = np.array([[[10, 255], [10, 0]]], np.uint8)
    out = _rgb(_save(tmp_path, Image.fromarray(la, "LA"), "la.png"))
    np.testing.assert_array_equal(out[0], [[10, 10, 10], [255, 255, 255]])


def test_cmyk_pure_colours(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]],
                    np.uint8)
    out = _rgb(_save(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tiff"))
    np.testing.assert_array_equal(out[0], [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0],
                                           [255, 255, 255]])


@pytest.mark.parametrize("orientation, expected_size", [(6, (3, 5)), (8, (3, 5)), (3, (5, 3)), (1, (5, 3))])
def test_exif_orientation_applied(tmp_path, orientation, expected_size):
    # 5 wide, 3 high, a white top-left pixel block; JPEG so the tag lives in real EXIF
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:8, :8] = 255
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path, image, f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)
    out = _rgb(path)
    w, h = expected_size
    assert out.shape == (h * 8, w * 8, 3)
    # where the stored top-left corner is shown: 6 = rotate 90 cw to view -> top-right,
    # 8 = rotate 90 ccw -> bottom-left, 3 = 180 -> bottom-right
    corner = {1: out[:8, :8], 6: out[:8, -8:], 8: out[-8:, :8], 3: out[-8:, -8:]}[orientation]
    assert corner.mean() > 200
    assert out.mean() < 80


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)           # 4096 > 2 x 1000: Pillow's error
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)           # 4096 > 3000: Pillow's warning
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert load_image(path).size == (64, 64)


def test_truncated_and_non_image_files(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(tmp_path, Image.fromarray(pixels), "full.jpg")
    data = open(full, "rb").read()
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg.*truncated"):
        load_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    assert isinstance(ImageError(text, "x"), ValueError)
