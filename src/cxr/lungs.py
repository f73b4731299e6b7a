"""The lung region: where a chest radiograph's findings are, and what a shortcut audit hides.

Three sources of a lung mask, best first:
- the dataset's own masks: the Kaggle database ships one per image
  (`<Class>/masks/<image's file name>`, 256x256, the same field of view as the image), and
  the phantoms ship their exact lungs in the same layout; prepare resizes each to
  `image_size` beside its image (`read_mask`);
- the template (`template_mask`), for images without one (the top-up set, your own folder,
  archives without masks): two ellipses at fixed positions, as fractions of the image's
  width and height, placed on the mean image of 1,200 real radiographs of the database (three
  classes; docs/lungs.md shows them over real films). It ignores each film's pose, so it is
  the weaker audit: a model read with it is judged with a region that may miss part of the
  lungs or include some of the chest wall.

`audit_inputs` makes the audit's three views of each image: intact, the lungs hidden and
only the lungs visible, the hidden part filled with the image's own mean grey (a flat fill
carries no texture, and the image's own mean keeps its overall brightness).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Two ellipses (centre x, centre y, semi-axis x, semi-axis y), fractions of the image's width
# and height measured from its top left corner: the patient's right lung on the image's left.
TEMPLATE = ((0.30, 0.46, 0.155, 0.32), (0.70, 0.46, 0.155, 0.32))
# How a mask file is read: grey level above this is lung.
MASK_THRESHOLD = 127
# The lung focus (train.lung_focus: template, inside every model's graph: cxr.models) keeps
# the template's lungs grown by train.lung_focus_margin (a fraction of the image side; below
# zero, shrunk); the rest is this grey.
FOCUS_FILL = 127.5


def template_mask(size: int, margin: float = 0.0, box: tuple | None = None) -> np.ndarray:
    """(size, size) bool: the template's two ellipses, each semi-axis grown by `margin` (a
    fraction of the image side). `box` = (x0, y0, x1, y1) in fractions draws them inside that
    part of the image stretched to the full size (the view after a crop to `box`)."""
    x0, y0, x1, y1 = box or (0.0, 0.0, 1.0, 1.0)
    centres = (np.arange(size) + 0.5) / size
    ys = (y0 + centres * (y1 - y0))[:, None]
    xs = (x0 + centres * (x1 - x0))[None, :]
    mask = np.zeros((size, size), bool)
    for cx, cy, rx, ry in TEMPLATE:
        mask |= ((xs - cx) / (rx + margin)) ** 2 + ((ys - cy) / (ry + margin)) ** 2 <= 1
    return mask


def template_box(margin: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the template's bounding box grown by `margin`, inside the image."""
    x0 = min(cx - rx for cx, _, rx, _ in TEMPLATE) - margin
    x1 = max(cx + rx for cx, _, rx, _ in TEMPLATE) + margin
    y0 = min(cy - ry for _, cy, _, ry in TEMPLATE) - margin
    y1 = max(cy + ry for _, cy, _, ry in TEMPLATE) + margin
    return max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)


def focus_crop(height: int, width: int, margin: float) -> tuple[tuple[int, int, int, int], tuple]:
    """The lung focus's crop of an image of this size: ((top, bottom, left, right) pixels cut
    off each side, the box kept as fractions of the image), whole pixels both, so that the
    template drawn in the box (`template_mask(..., box)`) lines up with the cropped pixels."""
    x0, y0, x1, y1 = template_box(margin)
    top, left = round(y0 * height), round(x0 * width)
    bottom, right = round(y1 * height), round(x1 * width)
    box = (left / width, top / height, right / width, bottom / height)
    return (top, height - bottom, left, width - right), box


def mask_file(image: Path) -> Path | None:
    """The dataset's mask of `image` (`<Class>/images/x.png` -> `<Class>/masks/x.png`), or None."""
    if image.parent.name != "images":
        return None
    found = image.parent.parent / "masks" / image.name
    return found if found.is_file() else None


def read_mask(path: Path, size: int, turn: Image.Transpose | None = None) -> np.ndarray:
    """A mask file (any size, grey or RGB; lung bright) -> (size, size) bool, turned as its
    image was (`turn`: images.upright of the image; a mask is drawn on the stored pixels).
    Raises ValueError with the reason when it is unusable."""
    try:
        with Image.open(path) as img:
            grey = img.convert("L")
            grey = (grey.transpose(turn) if turn is not None else grey).resize(
                (size, size), Image.BILINEAR
            )
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"unreadable lung mask {path.name}: {err}") from err
    mask = np.asarray(grey) > MASK_THRESHOLD
    if not mask.any():
        raise ValueError(f"lung mask {path.name} is empty")
    return mask


def audit_inputs(images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """The audit's three views of (n, H, W[, 1]) uint8 images with (n, H, W) bool masks:
    intact, lungs hidden, lungs only; the hidden part is each image's mean grey."""
    shape = images.shape
    grey = images.reshape(shape[:3])
    fill = np.rint(grey.reshape(len(grey), -1).mean(axis=1)).astype(np.uint8)[:, None, None]
    hidden = np.where(masks, fill, grey)
    only = np.where(masks, grey, fill)
    return {
        "intact": images,
        "lungs_hidden": hidden.reshape(shape),
        "lungs_only": only.reshape(shape),
    }


def heat_inside(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(n,) share of each heatmap's total inside its mask (nan for an all-zero heatmap)."""
    total = cams.reshape(len(cams), -1).sum(axis=1)
    inside = (cams * masks).reshape(len(cams), -1).sum(axis=1)
    return np.divide(inside, total, out=np.full(len(cams), np.nan), where=total > 0)


def focus_array(images: np.ndarray, margin: float) -> np.ndarray:
    """The lung focus on (n, H, W[, 1]) uint8 images outside a model, for the pixel baselines:
    crop to the template's box grown by `margin`, resize back (PIL's bilinear; the model's
    graph uses Keras' Resizing, so pixels may differ by a grey level or two), mid grey
    outside the lungs."""
    shape = images.shape
    grey = images.reshape(shape[:3])
    height, width = shape[1:3]
    (top, bottom, left, right), box = focus_crop(height, width, margin)
    crop = (left, top, width - right, height - bottom)
    lungs = template_mask(height, margin, box)
    out = np.empty_like(grey)
    for i, g in enumerate(grey):
        view = np.asarray(Image.fromarray(g).crop(crop).resize((width, height), Image.BILINEAR))
        out[i] = np.where(lungs, view, np.uint8(round(FOCUS_FILL)))
    return out.reshape(shape)
