"""Decoding radiographs: the one place that turns a file into pixels (prepare, predict, serving).

`decode_grey` validates as it decodes (EXIF orientation applied: `upright`) and says why a
file is rejected; `resize` brings the
pixels to the model's size; `content_hash` and `perceptual_hash` find exact and near
duplicates.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 50_000_000  # ~7000 x 7000: far above any radiograph, far below a decompression bomb
SUPPORTED_MODES = {
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "CMYK",
    "YCbCr",
    "I;16",
    "I;16B",
    "I;16L",
    "I",
}


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image) -> Image.Transpose | None:
    """The transpose that puts an opened image upright by its EXIF orientation (a phone or
    camera JPEG stored sideways says so there), or None. Applied where every image is
    decoded (decode_grey: prepare, predict, serving) and to its lung mask (prepare)."""
    try:
        return UPRIGHT.get(img.getexif().get(0x0112, 1))
    except (TypeError, ValueError, OSError, SyntaxError):  # an EXIF block too broken to read
        return None


class ImageRejected(ValueError):
    """A file that is not a usable radiograph; the message is the reason."""


def to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL image (grey, RGB, RGBA, 8 or 16 bit) -> 2-D uint8 array, full range kept."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_grey(
    source: str | Path | bytes, min_size: int = 1, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode and validate one file (a path, or its bytes); raise ImageRejected with the reason
    when unusable."""
    return decode_upright(source, min_size, max_pixels)[0]


def decode_upright(
    source: str | Path | bytes, min_size: int = 1, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, Image.Transpose | None]:
    """decode_grey's pixels and the EXIF turn applied to them (None: none), which the lung
    mask drawn on the stored pixels needs too (prepare). One decode: reading a PNG's EXIF
    loads the whole image."""
    if isinstance(source, bytes):
        empty, opened = not source, io.BytesIO(source)
    else:
        empty, opened = Path(source).stat().st_size == 0, Path(source)
    if empty:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        f"too large: {width}x{height} pixels exceeds {max_pixels:,} "
                        "(possible decompression bomb)"
                    )
                if img.mode not in SUPPORTED_MODES:
                    raise ImageRejected(f"unsupported pixel mode {img.mode!r}")
                img.load()
                grey = to_grey_uint8(img)
                turn = upright(img)
                if turn is not None:
                    grey = np.ascontiguousarray(np.asarray(Image.fromarray(grey).transpose(turn)))
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"too large (possible decompression bomb): {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageRejected("not an image (no known image format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected(f"corrupt or truncated ({err})") from err
    if min(grey.shape) < min_size:
        raise ImageRejected(too_small(grey.shape, min_size))
    return grey, turn


def too_small(shape: tuple[int, ...], min_size: int) -> str:
    """Why an image of `shape` (H, W) is refused: prepare's words, also serving's."""
    return f"too small: {shape[1]}x{shape[0]} < {min_size} px"


def resize(grey: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8, antialiased."""
    if grey.shape == (size, size):
        return grey
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))


def load_grey(source: str | Path | bytes, size: int, min_size: int = 1) -> np.ndarray:
    """Decode an image file (a path, or its bytes) to a (size, size) uint8 grey array: what
    prepare caches, and what `cxr predict` and the served model feed the network."""
    return resize(decode_grey(source, min_size=min_size), size)


def content_hash(grey: np.ndarray) -> str:
    """Hash of the decoded pixels: the same image saved as grey, RGB or another PNG matches."""
    return hashlib.sha256(f"{grey.shape}".encode() + grey.tobytes()).hexdigest()


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit pHash: signs of the lowest 8x8 DCT frequencies of a 32x32 thumbnail against
    their median. Re-encoded, resized or slightly changed copies differ in few bits."""
    from scipy.fft import dctn

    thumb = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BILINEAR), np.float64)
    low = dctn(thumb, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])
