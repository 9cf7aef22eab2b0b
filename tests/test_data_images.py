"""vitkit.data.images: every PIL mode becomes 8-bit RGB, EXIF orientation, clear errors for bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.images import ImageLoadError, load_image, pil_to_tensor, tensor_to_pil


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _rgb(path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


def test_grey_and_bilevel(tmp_path):
    assert (_rgb(_save(Image.new("L", (4, 3), 100), tmp_path / "l.png")) == 100).all()
    one = Image.new("1", (4, 3), 1)
    assert (_rgb(_save(one, tmp_path / "one.png")) == 255).all()


def test_alpha_is_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))  # fully transparent: background shows
    la.putpixel((1, 0), (100, 255))  # opaque: the grey shows
    out = _rgb(_save(la, tmp_path / "la.png"))
    assert (out[0, 0] == 255).all() and (out[0, 1] == 100).all()
    rgba = Image.new("RGBA", (1, 1), (200, 10, 10, 128))
    out = _rgb(_save(rgba, tmp_path / "rgba.png"))[0, 0]
    expected = 255 + (np.array([200, 10, 10]) - 255) * 128 / 255
    assert np.abs(out - expected).max() <= 1


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    out = _rgb(_save(p, tmp_path / "p.png"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [10, 200, 30]
    out = _rgb(_save(p, tmp_path / "pt.png", transparency=0))  # index 0 transparent
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 200, 30]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    out = _rgb(_save(cmyk, tmp_path / "cmyk.tif"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = _rgb(_save(img, tmp_path / "i16.png"))[..., 0]
    assert out.tolist() == [[0, 4, 100, 255]]  # 1000 / 257 ≈ 3.9; clipping would give 255


def test_32_bit_int_and_float(tmp_path):
    i32 = Image.fromarray(np.array([[0, 257 * 50, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    assert _rgb(_save(i32, tmp_path / "i32.tif"))[..., 0].tolist() == [[0, 50, 255]]
    wide = Image.fromarray(np.array([[-100, 0, 100_000]], dtype=np.int32))  # not 16-bit data: min-max
    assert _rgb(_save(wide, tmp_path / "wide.tif"))[..., 0].tolist() == [[0, 0, 255]]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert _rgb(_save(unit, tmp_path / "f.tif"))[..., 0].tolist() == [[0, 128, 255]]
    big = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))
    assert _rgb(_save(big, tmp_path / "fbig.tif"))[..., 0].tolist() == [[0, 64, 255]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # (width, height): now portrait
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 50  # top is red
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 50  # bottom is blue


def test_truncated_png_raises_with_path(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png") as info:
        load_image(path)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)


@pytest.mark.parametrize("name, content", [("notes.jpg", b"hello, not an image"), ("empty.png", b"")])
def test_non_image_raises(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=name):
        load_image(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_pil_to_tensor_layout_and_roundtrip():
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    img.putpixel((2, 1), (7, 8, 9))
    x = pil_to_tensor(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 2, 3)
    assert x[:, 0, 0].tolist() == [1, 2, 3] and x[:, 1, 2].tolist() == [7, 8, 9]
    assert np.array_equal(np.asarray(tensor_to_pil(x)), np.asarray(img))
    assert pil_to_tensor(Image.new("L", (2, 2), 9)).shape == (3, 2, 2)
