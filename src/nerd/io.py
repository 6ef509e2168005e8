"""Image files in and out: grayscale 8/16-bit PNG/TIFF, JPEG, BMP (and 8-bit RGB when asked), as float arrays on
the [0, 1] scale.

Scales: 8-bit pixels are divided by 255, 16-bit pixels by 65535; 32-bit float images (TIFF mode "F") must
already lie in [0, 1]. `read_image` reports the bit depth (8, 16 or 32 for float) so `write_image` can write
the result back at the same depth. Every problem with a file raises `ImageError` with a one-line message that
starts with the file's path. Writes are atomic: a temporary file in the target folder, then `os.replace`.

`read_picture` also returns an image's alpha channel (8-bit, as stored) so that `write_image` can put it back
unchanged; `read_image` drops it (and, for colour, refuses transparent pixels).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nerd.errors import ImageError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
# Bit depths each output format can hold (32: float32).
DEPTHS = {"PNG": (8, 16), "TIFF": (8, 16, 32), "JPEG": (8,), "BMP": (8,)}
# Output formats that hold an alpha channel (Pillow writes BMP without it, JPEG has none).
ALPHA_FORMATS = ("PNG", "TIFF")
# ITU-R 601 luma, what Pillow's convert("L") computes: Y = 0.299 R + 0.587 G + 0.114 B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Independent noise of std sigma in each of R, G, B has std sigma * sqrt(sum of squared weights) in Y (about 0.669).
LUMA_NOISE_GAIN = math.sqrt(sum(w * w for w in LUMA_WEIGHTS))


def luma_sigma255(sigma255: float) -> float:
    """The noise std of a colour image's luminance (ITU-R 601) when each RGB channel has std `sigma255`
    (independent): sigma255 * 0.669 (25 -> 16.7). Same scale in and out (0-255)."""
    return float(sigma255) * LUMA_NOISE_GAIN


@dataclass
class Picture:
    """An image as read for denoising.

    Attributes:
        x: float32 (H, W) gray, or (H, W, 3) RGB, on [0, 1].
        depth: 8, 16 or 32 (float32): the depth to write the result at.
        alpha: the alpha channel as stored, uint8 (H, W) (a palette's or a colour key's transparency as 0/255);
            None when the image has none.
        luma: x is the luminance of a colour image (read with `gray`), not a gray image's own pixels.
    """

    x: np.ndarray
    depth: int
    alpha: np.ndarray | None = None
    luma: bool = False


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (the protocol's order). Hidden files (a leading ".",
    such as macOS's "._name.png" metadata files) are not images of the folder and are skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """A grayscale image as float32 (H, W) in [0, 1] (8-bit: pixel / 255; 16-bit: pixel / 65535).

    Raises `ImageError` (a ValueError) for colour, unreadable or non-finite images.
    """
    return read_image(path)[0]


def _gray_channels(rgb: np.ndarray) -> np.ndarray | None:
    """rgb: (H, W, >=3) -> its first channel when R == G == B everywhere (a gray image stored as colour)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return r if np.array_equal(r, g) and np.array_equal(g, b) else None


def _reduced_to_8_bits(im, path: Path) -> bool:  # noqa: ANN001 -- an open PIL image
    """A 16-bit image with colour or alpha channels, which Pillow opens as 8-bit RGB(A), dropping the low 8 bits.
    PNG: its IHDR chunk, right after the 8-byte signature (bit depth at byte 24, colour type at byte 25); TIFF: the
    BitsPerSample tag (258), one entry a channel."""
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return len(bits) > 1 and max(bits) > 8
    if im.format != "PNG":
        return False
    with open(path, "rb") as fh:
        head = fh.read(26)
    return (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
            and head[24] == 16 and head[25] in (2, 4, 6))  # 2 RGB, 4 gray + alpha, 6 RGBA


def read_image(path: str | os.PathLike[str], *, gray: bool = False, colour: bool = False) -> tuple[np.ndarray, int]:
    """Read one image as grayscale (or, with `colour`, a colour image as its RGB channels); any alpha is dropped
    (`read_picture` keeps it).

    Args:
        path: the file.
        gray: convert a colour image to luminance (ITU-R 601 luma, 8-bit) instead of refusing it.
        colour: return a colour image as float32 (H, W, 3) RGB (8-bit) instead of refusing it; gray images (also
            gray stored as RGB) stay (H, W). A transparent pixel is refused (the output has no alpha).

    An EXIF orientation tag (cameras' JPEGs) is applied, so x is the image as viewers show it.

    Returns:
        (x, depth): x float32 (H, W) in [0, 1] ((H, W, 3) for a colour image read with `colour`); depth 8, 16 or
        32 (float32 input).

    Raises:
        ImageError: missing, empty, not an image, truncated/corrupt, multi-page, colour (without `gray` or
            `colour`), a 16-bit colour or alpha PNG/TIFF (without `gray`), transparent pixels (with `colour`),
            non-finite or out-of-range pixels, unsupported pixel format.
    """
    picture = _read(Path(path), gray, colour, keep_alpha=False)
    return picture.x, picture.depth


def read_picture(path: str | os.PathLike[str], *, gray: bool = False, colour: bool = False,
                 max_pixels: int = 0) -> Picture:
    """`read_image`, keeping the alpha channel (transparent pixels are not refused with `colour`) and saying whether
    x is a colour image's luminance.

    Returns:
        Picture: x float32 (H, W) or (H, W, 3) on [0, 1], depth, alpha uint8 (H, W) or None, luma.

    `max_pixels` > 0 refuses, from the file's header and before decoding, an image of more pixels (a decompression
    bomb: a 9000 x 9000 PNG can take 79 KB on disk and gigabytes in memory).

    Raises:
        ImageError: as `read_image`, but for transparent pixels; more pixels than `max_pixels`.
    """
    return _read(Path(path), gray, colour, keep_alpha=True, max_pixels=max_pixels)


def _read(path: Path, gray: bool, colour: bool, keep_alpha: bool, max_pixels: int = 0) -> Picture:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ImageError(f"{path}: multi-page image ({im.n_frames} frames); give one image per file")
            width, height = im.size
            if max_pixels and width * height > max_pixels:
                raise ImageError(f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, more than "
                                 f"--max-pixels {max_pixels / 1e6:g} million; raise it (0: no limit) to denoise it")
            im.load()
            if gray and colour:
                raise ImageError(f"{path}: gray and colour are exclusive: luminance, or each RGB channel")
            if not gray and _reduced_to_8_bits(im, path):
                raise ImageError(
                    f"{path}: 16-bit {im.format} with colour or alpha channels, which can only be read at 8 bits "
                    "here; save it as 16-bit grayscale to keep its depth (or as 8-bit RGB for --colour), or add "
                    "--gray for its 8-bit luminance"
                )
            im = _upright(im)
            x, depth, luma = _decode(im, path, gray, colour, keep_alpha)
            # 16-bit and float images have no alpha here (Pillow opens 16-bit alpha PNG/TIFF at 8 bits, refused above)
            alpha = _alpha(im) if keep_alpha and depth == 8 else None
            return Picture(x, depth, alpha, luma)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (unknown format)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{path}: cannot decode image (truncated or corrupt: {reason})") from None


def _upright(im):  # noqa: ANN001, ANN202 -- a loaded PIL image
    """The image as it is displayed: a camera's EXIF orientation tag applied (written files carry no EXIF, so
    without this a rotated JPEG would come back turned)."""
    import warnings

    from PIL import ImageOps

    with warnings.catch_warnings():  # a damaged EXIF block makes Pillow warn; the pixels are what matter here
        warnings.simplefilter("ignore")
        try:
            turned = im.getexif().get(0x0112, 1) != 1
        except Exception:  # unreadable EXIF: take the pixels as stored
            return im
        return ImageOps.exif_transpose(im) if turned else im


def _alpha(im) -> np.ndarray | None:  # noqa: ANN001 -- a loaded PIL image
    """The alpha channel as uint8 (H, W), or None. A palette's or colour key's transparency (PNG tRNS) counts: its
    pixels become 0, the others 255 (after denoising, the key colour would no longer mark them)."""
    if im.mode in ("LA", "PA", "RGBA"):  # stored as a channel
        return np.asarray(im.getchannel("A")).copy()
    if im.mode in ("La", "RGBa") or "transparency" in im.info:
        return np.asarray(im.convert("RGBA").getchannel("A")).copy()
    return None


def _decode(im, path: Path, gray: bool, colour: bool, keep_alpha: bool = False  # noqa: ANN001 -- a PIL image
            ) -> tuple[np.ndarray, int, bool]:
    """(x, depth, luma): the pixels on [0, 1], their depth, and whether x is the luminance of a colour image."""
    mode = im.mode
    if mode.startswith("I;16"):
        return (np.asarray(im, dtype=np.float64) / 65535.0).astype(np.float32), 16, False
    if mode == "I":  # 32-bit integer: accepted when its values fit 16 bits (some 16-bit files open this way)
        arr = np.asarray(im, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535; convert it to 8 or 16 bits")
        return (arr / 65535.0).astype(np.float32), 16, False
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageError(f"{path}: image has NaN or infinite pixels")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise ImageError(
                f"{path}: float pixels outside [0, 1]; rescale to [0, 1] or convert to 8/16 bits"
            )
        return arr.copy(), 32, False
    if mode in ("L", "1", "LA", "La"):
        return (np.asarray(im.getchannel(0).convert("L"), dtype=np.float32) / 255.0), 8, False
    if mode in ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(im.convert("RGB"))
        channel = _gray_channels(rgb)
        if channel is not None:
            return channel.astype(np.float32) / 255.0, 8, False
    if colour:
        return _rgb(im, path, keep_alpha), 8, False
    if not gray:
        raise ImageError(
            f"{path}: colour image (mode {mode}); NERD denoises grayscale: add --gray to use its luminance, or "
            "--colour to denoise each RGB channel"
        )
    try:
        lum = im.convert("RGB").convert("L")
    except Exception as err:
        raise ImageError(f"{path}: cannot convert mode {mode} to gray ({err})") from None
    return np.asarray(lum, dtype=np.float32) / 255.0, 8, True


def _rgb(im, path: Path, keep_alpha: bool = False) -> np.ndarray:  # noqa: ANN001 -- a loaded PIL image
    """A colour image as float32 (H, W, 3) RGB on [0, 1]; ImageError if it has transparent pixels (unless the caller
    keeps the alpha channel)."""
    if not keep_alpha and ("A" in im.mode or "a" in im.mode or "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise ImageError(f"{path}: transparent pixels; the output is RGB without alpha: flatten the image first")
    try:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as err:
        raise ImageError(f"{path}: cannot convert mode {im.mode} to RGB ({err})") from None


def output_format(path: str | os.PathLike[str], depth: int) -> str:
    """The PIL format for writing `path` at `depth` bits; ImageError if suffix or depth can't be written."""
    suffix = Path(path).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise ImageError(
            f"{path}: unsupported output suffix {suffix or '(none)'!r}; use {', '.join(FORMATS)}"
        )
    if depth not in DEPTHS[fmt]:
        kind = "float" if depth == 32 else f"{depth}-bit"
        ok = ".tif" if depth == 32 else ".png or .tif"
        raise ImageError(f"{path}: {fmt} cannot hold a {kind} image; use {ok} to keep the bit depth")
    return fmt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def to_pixels(x: np.ndarray, depth: int) -> np.ndarray:
    """x: float (H, W) in [0, 1] -> uint8 (depth 8), uint16 (16) or float32 (32) pixels, rounded, clipped."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    if depth == 8:
        return np.rint(x * 255.0).astype(np.uint8)
    if depth == 16:
        return np.rint(x * 65535.0).astype(np.uint16)
    if depth == 32:
        return x.astype(np.float32)
    raise ValueError(f"depth must be 8, 16 or 32, got {depth}")


def keeps_alpha(path: str | os.PathLike[str]) -> bool:
    """Whether the format of `path` (by its suffix) holds an alpha channel: PNG and TIFF do, JPEG and BMP don't."""
    return FORMATS.get(Path(path).suffix.lower()) in ALPHA_FORMATS


def write_image(path: str | os.PathLike[str], x: np.ndarray, depth: int = 8, alpha: np.ndarray | None = None) -> None:
    """Write x: float (H, W) in [0, 1] as a grayscale image of `depth` bits, or (H, W, 3) as 8-bit RGB; format from
    the suffix, atomic. With `alpha` (uint8 (H, W), as `read_picture` gives it) the image is written with that alpha
    channel, unchanged: 8-bit gray + alpha (LA) or RGBA, PNG or TIFF only.

    Nothing is left at `path` (or beside it) if writing fails.
    """
    from PIL import Image

    path = Path(path)
    fmt = output_format(path, depth)
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3 and depth == 8)) or not np.isfinite(x).all():
        raise ValueError("write_image expects a finite (H, W) array, or (H, W, 3) RGB at depth 8")
    pixels = to_pixels(x, depth)
    if alpha is not None:
        if depth != 8 or alpha.dtype != np.uint8 or alpha.shape != x.shape[:2]:
            raise ValueError("write_image's alpha is uint8 (H, W) beside an 8-bit image of that size")
        if fmt not in ALPHA_FORMATS:
            raise ImageError(f"{path}: {fmt} cannot hold an alpha channel; use .png or .tif to keep it")
        pixels = np.dstack([pixels, alpha])  # (H, W, 2): LA, (H, W, 4): RGBA
    im = Image.fromarray(pixels)
    options = {"quality": 95} if fmt == "JPEG" else {}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            im.save(fh, format=fmt, **options)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only or special folder: after a long solve, still one line
        raise ImageError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
