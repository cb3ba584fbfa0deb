"""Image I/O: every input mode, broken files, bombs, atomic writes, metadata."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers import photo
from onnxdream.core.errors import ImageError, OnnxDreamError
from onnxdream.media import imageio
from onnxdream.media.imageio import (
    LoadedImage,
    load_image,
    load_image_bytes,
    read_metadata,
    read_png_metadata,
    resize,
    to_uint8,
)
from onnxdream.media.imagewrite import check_output_path, save_image


def _gradient_rgb(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.ascontiguousarray(
        np.stack([x / (w - 1), y / (h - 1), (x + y) / (w + h - 2)], axis=2).astype(np.float32)
    )


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------------------------------
# Loading: modes


def test_rgb_png_loads_as_float_in_unit_range(tmp_path):
    arr = (np.arange(24 * 32 * 3) % 256).astype(np.uint8).reshape(24, 32, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert isinstance(img, LoadedImage)
    assert img.rgb.dtype == np.float32 and img.rgb.shape == (24, 32, 3)
    assert img.rgb.flags.c_contiguous
    assert img.alpha is None
    assert img.mode == "RGB" and img.size == (32, 24) and img.format == "PNG"
    assert (img.width, img.height) == (32, 24)
    np.testing.assert_allclose(img.rgb, arr / 255.0, atol=1e-7)


def test_rgba_alpha_survives_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "in.png")
    img = load_image(tmp_path / "in.png")
    assert img.mode == "RGBA"
    assert img.alpha is not None and img.alpha.shape == (20, 30) and img.alpha.dtype == np.float32
    save_image(tmp_path / "out.png", img.rgb, img.alpha)
    back = _pixels(tmp_path / "out.png")
    assert back.shape == (20, 30, 4)
    np.testing.assert_array_equal(back[:, :, 3], rgba[:, :, 3])  # alpha identical
    np.testing.assert_array_equal(back[:, :, :3], rgba[:, :, :3])  # and the colours too


def test_greyscale_l_and_la(tmp_path):
    grey = (np.arange(16 * 16) % 256).astype(np.uint8).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "l.png")
    img = load_image(tmp_path / "l.png")
    assert img.mode == "L" and img.rgb.shape == (16, 16, 3) and img.alpha is None
    for c in range(3):
        np.testing.assert_allclose(img.rgb[:, :, c], grey / 255.0, atol=1e-7)

    la = np.stack([grey, 255 - grey], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.mode == "LA"
    np.testing.assert_allclose(img.alpha, (255 - grey) / 255.0, atol=1e-7)


def test_palette_with_transparency_gives_alpha(tmp_path):
    idx = np.zeros((10, 12), dtype=np.uint8)
    idx[:, 6:] = 1
    p = Image.fromarray(idx, "P")
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    p.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert img.mode == "P"
    assert img.alpha is not None
    assert np.all(img.alpha[:, :6] == 0.0) and np.all(img.alpha[:, 6:] == 1.0)
    np.testing.assert_allclose(img.rgb[0, 8], [0, 0, 1])

    p.save(tmp_path / "p_opaque.png")
    opaque = load_image(tmp_path / "p_opaque.png")
    assert opaque.alpha is None
    np.testing.assert_allclose(opaque.rgb[0, 0], [1, 0, 0])


def test_16bit_greyscale_keeps_its_precision(tmp_path):
    vals = np.linspace(0, 65535, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    vals[0, 0], vals[0, 1], vals[0, 2] = 1, 300, 65535  # values above 255 must not clip
    Image.fromarray(vals).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    expected = vals.astype(np.float64) / 65535.0
    np.testing.assert_allclose(img.rgb[:, :, 0], expected, atol=1e-6)
    np.testing.assert_allclose(img.rgb[:, :, 2], expected, atol=1e-6)
    assert img.rgb[0, 0, 0] > 0 and img.rgb[0, 1, 0] < img.rgb[0, 2, 0] == pytest.approx(1.0)
    # the 8-bit output rounds the 16-bit value
    save_image(tmp_path / "o.png", img.rgb)
    out = _pixels(tmp_path / "o.png")
    np.testing.assert_array_equal(out[:, :, 0], np.rint(expected * 255).astype(np.uint8))


def test_32bit_int_and_float_greyscale(tmp_path):
    ints = np.array([[0, 1000, 65535, 70000]], dtype=np.int32)
    img = load_image_bytes(_tiff_bytes(Image.fromarray(ints, "I")))
    np.testing.assert_allclose(img.rgb[0, :, 0], [0, 1000 / 65535, 1, 1], atol=1e-6)

    floats = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    img = load_image_bytes(_tiff_bytes(Image.fromarray(floats)))
    assert img.mode == "F"
    np.testing.assert_allclose(img.rgb[0, :, 1], [0, 0.25, 1], atol=1e-7)


def _tiff_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (12, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "CMYK" and img.rgb.shape == (8, 12, 3)
    r, g, b = img.rgb[4, 6]
    assert r > 0.8 and g < 0.2 and b < 0.2  # cyan+yellow-free, magenta+yellow → red


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored: 40 wide, 20 high
    arr[:5, :5] = (255, 255, 255)  # bright marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.rgb.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    assert img.size == (20, 40)
    assert img.rgb[1, 18].mean() > 0.8  # marker now at the top-right
    assert img.rgb[38, 1].mean() < 0.2


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    img = load_image(tmp_path / "a.gif")
    np.testing.assert_allclose(img.rgb[4, 4], [1, 0, 0], atol=0.01)


def test_real_photo_smoke(tmp_path):
    chelsea = photo("chelsea.png")  # examples/ has a copy, so this never skips
    img = load_image(chelsea)
    assert img.rgb.shape == (300, 451, 3) and img.size == (451, 300)
    assert 0.0 <= img.rgb.min() and img.rgb.max() <= 1.0
    out = save_image(tmp_path / "chelsea.png", img.rgb, metadata={"source": "chelsea"})
    with Image.open(out) as a, Image.open(chelsea) as b:
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert read_metadata(out) == {"source": "chelsea"}


# ------------------------------------------------------------------------------------------
# Loading: failures


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_non_image_file_is_refused_and_writes_nothing(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")
    before = _listing(tmp_path)
    with pytest.raises(ImageError, match=r"notes\.png is not an image in a supported format") as ei:
        load_image(bad)
    assert isinstance(ei.value, OnnxDreamError) and ei.value.exit_code == 2
    assert _listing(tmp_path) == before


def test_eps_is_not_opened(tmp_path):
    # EPS would run Ghostscript; it is not in the allow-list
    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(eps)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files_are_errors(tmp_path, fmt, ext):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{ext} is (truncated|corrupt)"):
        load_image(path)


def test_truncated_is_refused_even_if_pillow_was_told_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 77, np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageError):
        load_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_header(width: int, height: int, trailer: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + trailer
        + _chunk(b"IEND", b"")
    )


def test_decompression_bomb_header_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))
    before = Image.MAX_IMAGE_PIXELS
    msg = r"bomb\.png has 10,000,000,000 pixels, more than the limit of 128,000,000"
    with pytest.raises(ImageError, match=msg):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == before  # no global state leaks


# 1600 px: Pillow's warning band; 4096 px: its error band
@pytest.mark.parametrize("side", [40, 64])
def test_max_pixels_is_configurable(tmp_path, side):
    Image.new("RGB", (side, side)).save(tmp_path / "s.png")
    before = Image.MAX_IMAGE_PIXELS
    msg = rf"has {side * side:,} pixels, more than the limit of 1,000"
    with pytest.raises(ImageError, match=msg):
        load_image(tmp_path / "s.png", max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(tmp_path / "s.png", max_pixels=side * side).rgb.shape == (side, side, 3)
    assert load_image(tmp_path / "s.png", max_pixels=None).rgb.shape == (side, side, 3)


def test_load_image_bytes(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (0, 255, 0)).save(buf, "PNG")
    img = load_image_bytes(buf.getvalue())
    assert img.rgb.shape == (4, 5, 3)
    with pytest.raises(ImageError, match="upload is empty"):
        load_image_bytes(b"", name="upload")
    with pytest.raises(ImageError, match="not an image"):
        load_image_bytes(b"hello", name="upload")


# ------------------------------------------------------------------------------------------
# Saving


def test_unsupported_extension_is_refused_before_any_work(tmp_path, monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("conversion ran before the extension was checked")

    monkeypatch.setattr(imageio, "to_uint8", boom)
    for name in ("out.bmp", "out.tiff", "out"):
        with pytest.raises(ImageError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
            save_image(tmp_path / name, _gradient_rgb())
        with pytest.raises(ImageError, match="not supported"):
            check_output_path(tmp_path / name)
    assert _listing(tmp_path) == []


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.PNG") == "PNG"
    assert check_output_path(tmp_path / "a.jpeg") == "JPEG"
    assert check_output_path(tmp_path / "a.webp") == "WEBP"
    with pytest.raises(ImageError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "a.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        check_output_path(tmp_path / "d.png")


def test_missing_parent_directory(tmp_path):
    with pytest.raises(ImageError, match="the directory .*missing does not exist"):
        save_image(tmp_path / "missing" / "out.png", _gradient_rgb())


def test_float_to_8bit_rounds(tmp_path):
    rgb = np.zeros((1, 4, 3), np.float32)
    rgb[0, :, 0] = [0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 1.0, 2.0]
    rgb[0, :, 1] = [-0.3, np.nan, 127.4 / 255, 127.6 / 255]
    out = to_uint8(rgb)
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 255, 255]
    assert out[0, :, 1].tolist() == [0, 0, 127, 128]
    u8 = np.zeros((2, 2, 3), np.uint8)
    assert to_uint8(u8) is u8

    save_image(tmp_path / "r.png", rgb)
    np.testing.assert_array_equal(_pixels(tmp_path / "r.png"), out)


def test_jpeg_drops_alpha_and_webp_keeps_it(tmp_path):
    rgb = _gradient_rgb()
    alpha = np.tile(np.linspace(0, 1, rgb.shape[1], dtype=np.float32), (rgb.shape[0], 1))
    save_image(tmp_path / "a.jpg", rgb, alpha)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.mode == "RGB"
    save_image(tmp_path / "a.webp", rgb, alpha, quality=100)
    back = load_image(tmp_path / "a.webp")
    assert back.alpha is not None
    np.testing.assert_allclose(back.alpha, alpha, atol=1 / 255 + 1e-6)


def test_bad_arrays_are_refused(tmp_path):
    with pytest.raises(ImageError, match="H x W x 3"):
        save_image(tmp_path / "a.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ImageError, match="alpha has shape"):
        save_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32),
                   np.zeros((3, 4), np.float32))
    with pytest.raises(ImageError, match="quality"):
        save_image(tmp_path / "a.jpg", np.zeros((4, 4, 3), np.float32), quality=0)
    assert _listing(tmp_path) == []


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), _Interrupted("stop")])
def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path, monkeypatch, error):
    target = tmp_path / "dream.png"
    save_image(target, _gradient_rgb())  # an existing, good file
    good = target.read_bytes()
    before = _listing(tmp_path)

    real_save = Image.Image.save

    def failing_save(self, fp, format=None, **params):
        real_save(self, fp, format=format, **params)  # write a complete file to the temp...
        fp.write(b"partial")
        raise error  # ...then fail, as a full disk or a Ctrl-C would

    monkeypatch.setattr(Image.Image, "save", failing_save)
    expected = ImageError if isinstance(error, OSError) else _Interrupted
    with pytest.raises(expected) as ei:
        save_image(target, np.ones((24, 32, 3), np.float32))
    if expected is ImageError:
        assert "No space left on device" in str(ei.value)
    assert _listing(tmp_path) == before  # no temp file left
    assert target.read_bytes() == good  # existing output untouched

    # and with no previous file: nothing appears at all
    with pytest.raises(expected):
        save_image(tmp_path / "new.png", _gradient_rgb())
    assert _listing(tmp_path) == before


def test_atomic_write_failure_at_rename(tmp_path, monkeypatch):
    def no_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imageio.os, "replace", no_replace)
    with pytest.raises(ImageError, match="Permission denied"):
        save_image(tmp_path / "x.jpg", _gradient_rgb())
    assert _listing(tmp_path) == []


def test_saved_file_has_normal_permissions(tmp_path):
    out = save_image(tmp_path / "p.png", _gradient_rgb())
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------
# Metadata


def test_png_metadata_round_trip(tmp_path):
    meta = {"onnxdream:layer": "blocks.5", "steps": "20", "note": "rêve ✓ <&>", "empty": ""}
    save_image(tmp_path / "m.png", _gradient_rgb(), metadata=meta)
    assert read_png_metadata(tmp_path / "m.png") == meta
    assert read_metadata(tmp_path / "m.png") == meta
    with Image.open(tmp_path / "m.png") as im:
        assert read_png_metadata(tmp_path / "m.png") == dict(im.text)


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_jpeg_and_webp_metadata_round_trip(tmp_path, ext):
    meta = {"layer": "blocks.5", "note": "rêve ✓ </onnxdream:parameters> & \"q\""}
    save_image(tmp_path / f"m.{ext}", _gradient_rgb(), metadata=meta)
    assert read_metadata(tmp_path / f"m.{ext}") == meta


def test_png_metadata_compressed_and_after_image_data(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("z", "squeezed " * 50, zip=True)  # zTXt
    info.add_itxt("i", "ünïcode " * 50, zip=True)  # compressed iTXt
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png", pnginfo=info)
    assert read_png_metadata(tmp_path / "c.png") == {"z": "squeezed " * 50, "i": "ünïcode " * 50}

    # a text chunk after IDAT, in a file whose header claims 10 gigapixels: read without decoding
    late = _chunk(b"tEXt", b"late\0after the pixels")
    (tmp_path / "late.png").write_bytes(_png_with_header(100_000, 100_000, trailer=late))
    assert read_png_metadata(tmp_path / "late.png") == {"late": "after the pixels"}


def test_metadata_absent_and_bad_keys(tmp_path):
    save_image(tmp_path / "n.png", _gradient_rgb())
    assert read_png_metadata(tmp_path / "n.png") == {}
    save_image(tmp_path / "n.jpg", _gradient_rgb())
    assert read_metadata(tmp_path / "n.jpg") == {}
    with pytest.raises(ImageError, match="1 to 79"):
        save_image(tmp_path / "k.png", _gradient_rgb(), metadata={"k" * 80: "v"})
    assert not (tmp_path / "k.png").exists()
    with pytest.raises(ImageError, match="does not exist"):
        read_metadata(tmp_path / "none.png")


# ------------------------------------------------------------------------------------------
# Resize


def test_resize_shapes_dtype_and_constant_images():
    rgb = _gradient_rgb(30, 40)
    up = resize(rgb, (61, 83))
    assert up.shape == (61, 83, 3) and up.dtype == np.float32 and up.flags.c_contiguous
    down = resize(rgb, (15, 20))
    assert down.shape == (15, 20, 3)
    flat = np.full((30, 40, 3), 0.3, np.float32)
    np.testing.assert_allclose(resize(flat, (17, 23)), 0.3, atol=1e-6)
    np.testing.assert_allclose(resize(flat, (71, 93), resample="lanczos"), 0.3, atol=1e-6)
    assert resize(rgb[:, :, 0], (10, 12)).shape == (10, 12)


def test_resize_is_float_precise_and_smooth():
    rgb = _gradient_rgb(64, 64)
    back = resize(resize(rgb, (128, 128)), (64, 64))
    # a linear ramp survives up- and down-sampling away from the borders, with no 8-bit steps
    np.testing.assert_allclose(back[4:-4, 4:-4], rgb[4:-4, 4:-4], atol=2e-3)
    tiny = rgb * 1e-3
    assert np.unique(resize(tiny, (100, 100))).size > 100  # 8-bit would give 1


def test_resize_same_size_is_a_copy_and_bad_args():
    rgb = _gradient_rgb()
    same = resize(rgb, rgb.shape[:2])
    assert same is not rgb and np.array_equal(same, rgb)
    with pytest.raises(ValueError, match="unknown resample"):
        resize(rgb, (4, 4), resample="cubic-spline")
    with pytest.raises(ValueError, match="at least 1 x 1"):
        resize(rgb, (0, 4))


def test_import_does_not_need_onnxruntime():
    code = "import sys, onnxdream.media.imageio; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
