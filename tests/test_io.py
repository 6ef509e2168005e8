"""nerd.io: grayscale 8/16-bit and float images in and out, refusals, atomic writes."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nerd.io import ImageError, list_images, load_gray, output_format, read_image, to_pixels, write_image

H, W = 37, 31


def ramp(dtype: type, top: int) -> np.ndarray:
    return (np.arange(H * W).reshape(H, W) * 7 % (top + 1)).astype(dtype)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_8bit_round_trip_is_exact(tmp_path, suffix):
    pixels = ramp(np.uint8, 255)
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}")
    x, depth = read_image(tmp_path / f"a{suffix}")
    assert depth == 8 and x.dtype == np.float32 and x.shape == (H, W)
    assert x.min() >= 0 and x.max() <= 1
    write_image(tmp_path / f"b{suffix}", x, depth)
    with Image.open(tmp_path / f"b{suffix}") as im:
        assert im.mode == "L" and im.size == (W, H)
        np.testing.assert_array_equal(np.asarray(im), pixels)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_round_trip_is_exact(tmp_path, suffix):
    pixels = ramp(np.uint16, 65535) * 9
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}")
    x, depth = read_image(tmp_path / f"a{suffix}")
    assert depth == 16
    np.testing.assert_allclose(x, pixels / 65535.0, atol=1e-7)
    write_image(tmp_path / f"b{suffix}", x, depth)
    with Image.open(tmp_path / f"b{suffix}") as im:
        assert im.mode.startswith("I;16") and im.size == (W, H)
        np.testing.assert_array_equal(np.asarray(im), pixels)


def test_load_gray_and_list_images(tmp_path):
    Image.fromarray(ramp(np.uint8, 255)).save(tmp_path / "b.png")
    Image.fromarray(ramp(np.uint8, 255)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._b.png").write_bytes(b"\0\5\26\7")  # macOS metadata beside b.png: not an image of the folder
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    x = load_gray(tmp_path / "b.png")
    assert x.dtype == np.float32 and x.shape == (H, W)
    np.testing.assert_allclose(x, ramp(np.uint8, 255) / 255.0, atol=1e-7)


def test_gray_stored_as_rgb_is_gray(tmp_path):
    g = ramp(np.uint8, 255)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "g.png")
    x, depth = read_image(tmp_path / "g.png")
    assert depth == 8
    np.testing.assert_allclose(x, g / 255.0, atol=1e-7)


def png16(path, pixels: np.ndarray, colour_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour): pixels (H, W, channels) uint16."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def tiff16_rgb(path, pixels: np.ndarray) -> None:
    """Write an uncompressed 16-bit RGB TIFF by hand (Pillow cannot write one): pixels (H, W, 3) uint16."""
    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    n, ifd = 10, 8
    bits_at = ifd + 2 + 12 * n + 4
    data_at = bits_at + 6
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, data_at), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = b"II*\0" + struct.pack("<IH", ifd, n)
    for tag, kind, count, value in entries:  # SHORT values sit left-aligned in the 4-byte field
        inline = kind == 3 and count == 1
        out += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if inline else
                                                        struct.pack("<I", value))
    path.write_bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


def test_16bit_colour_png_and_tiff_are_refused_not_cut_to_8_bits(tmp_path):
    g = ramp(np.uint16, 65535) * 9
    png16(tmp_path / "rgb.png", np.stack([g, g, g], -1), 2)  # gray stored as 16-bit RGB
    png16(tmp_path / "la.png", np.stack([g, np.full_like(g, 65535)], -1), 4)  # 16-bit gray + alpha
    tiff16_rgb(tmp_path / "rgb.tif", np.stack([g, g, g], -1))
    for name in ("rgb.png", "la.png", "rgb.tif"):
        for colour in (False, True):
            with pytest.raises(ImageError, match="16-bit (PNG|TIFF) with colour or alpha"):
                read_image(tmp_path / name, colour=colour)
        x, depth = read_image(tmp_path / name, gray=True)  # --gray: its 8-bit luminance, as for any colour image
        assert depth == 8 and x.shape == (H, W)
        np.testing.assert_allclose(x, (g >> 8) / 255.0, atol=1 / 255)


def test_exif_orientation_is_applied(tmp_path):
    pixels = ramp(np.uint8, 255)
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "cam.jpg", exif=exif, quality=100)
    x, _ = read_image(tmp_path / "cam.jpg")
    assert x.shape == (W, H)  # as a viewer shows it
    np.testing.assert_allclose(x, np.rot90(pixels, -1) / 255.0, atol=6 / 255)  # JPEG's rounding


def test_colour_read_and_written_as_rgb(tmp_path):
    g = ramp(np.uint8, 255)
    rgb = np.stack([g, 255 - g, g // 2], -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    x, depth = read_image(tmp_path / "c.png", colour=True)
    assert depth == 8 and x.shape == (H, W, 3) and x.dtype == np.float32
    write_image(tmp_path / "o.png", x, depth)
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png", colour=True)[0].shape == (H, W)  # gray stored as RGB stays gray
    opaque = np.dstack([rgb, np.full((H, W), 255, np.uint8)])
    Image.fromarray(opaque).save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png", colour=True)[0].shape == (H, W, 3)
    opaque[3, 4, 3] = 0
    Image.fromarray(opaque).save(tmp_path / "holes.png")
    with pytest.raises(ImageError, match="transparent"):
        read_image(tmp_path / "holes.png", colour=True)
    with pytest.raises(ImageError, match="exclusive"):
        read_image(tmp_path / "c.png", colour=True, gray=True)
    with pytest.raises(ValueError):
        write_image(tmp_path / "o16.png", x, 16)  # RGB is written at 8 bits only


def test_colour_refused_unless_gray(tmp_path):
    g = ramp(np.uint8, 255)
    Image.fromarray(np.stack([g, 255 - g, g // 2], -1)).save(tmp_path / "c.png")
    with pytest.raises(ImageError, match="--gray"):
        read_image(tmp_path / "c.png")
    x, depth = read_image(tmp_path / "c.png", gray=True)
    assert depth == 8 and x.shape == (H, W)
    pal = Image.fromarray(np.stack([g, 255 - g, g // 2], -1)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    with pytest.raises(ImageError, match="colour"):
        read_image(tmp_path / "p.png")


def test_float_tiff(tmp_path):
    f = (ramp(np.uint8, 255) / 255.0).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    x, depth = read_image(tmp_path / "f.tif")
    assert depth == 32
    np.testing.assert_array_equal(x, f)
    f[3, 4] = np.nan
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="NaN"):
        read_image(tmp_path / "nan.tif")
    Image.fromarray(np.full((H, W), 3.0, np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        read_image(tmp_path / "big.tif")


def test_bad_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image\n")
    Image.fromarray(ramp(np.uint8, 255)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {
        "missing.png": "no such file",
        "empty.png": "empty file",
        "text.png": "not an image",
        "cut.png": "truncated or corrupt",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError, match=message) as info:
            read_image(tmp_path / name)
        assert "\n" not in str(info.value)


def test_output_format_checks():
    assert output_format("a.PNG", 16) == "PNG"
    assert output_format("a.tiff", 32) == "TIFF"
    with pytest.raises(ImageError, match="16-bit"):
        output_format("a.jpg", 16)
    with pytest.raises(ImageError, match="unsupported output suffix"):
        output_format("a.gif", 8)


def test_write_is_atomic_and_readable(tmp_path):
    x = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    write_image(tmp_path / "o.png", x, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # no temporary left
    from nerd.io import _umask

    assert (os.stat(tmp_path / "o.png").st_mode & 0o777) == 0o666 & ~_umask()  # not mkstemp's 0600
    with pytest.raises(ValueError):
        write_image(tmp_path / "bad.png", x * np.nan, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from PIL import Image

    x = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    write_image(tmp_path / "o.png", x, 8)
    before = (tmp_path / "o.png").read_bytes()

    def disk_full(self, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(ImageError, match="No space"):  # one line from the CLI since 253b454, not a traceback
        write_image(tmp_path / "o.png", 1 - x, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    assert (tmp_path / "o.png").read_bytes() == before


def test_to_pixels_rounds_and_clips():
    x = np.array([[-0.1, 0.5, 1.2]])
    np.testing.assert_array_equal(to_pixels(x, 8), [[0, 128, 255]])
    np.testing.assert_array_equal(to_pixels(x, 16), [[0, 32768, 65535]])
