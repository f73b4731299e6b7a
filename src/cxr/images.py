"""Decoding radiographs: the one function prepare (and later predict and serving) use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL image (grey, RGB, RGBA, 8 or 16 bit) -> 2-D uint8 array, full range kept."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file to a (size, size) uint8 grey array, resized with antialiasing."""
    with Image.open(path) as img:
        img.load()
        grey = to_grey_uint8(img)
    if grey.shape != (size, size):
        grey = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    return grey
