"""`prepared/`, the contract between the prepare stage and every stage after it.

`prepared/` holds
- `images.npy`: uint8 (n, image_size, image_size), the kept images in manifest order (train,
  then val, then test);
- `masks.npy`: uint8 (n, image_size, image_size), 1 on the lungs, 0 elsewhere, row for row
  beside images.npy: the dataset's mask of that image resized with it, or the template
  (cxr.lungs) where it has none;
- `manifest.csv`: one row per image: index (its row in images.npy), label, split, group (its
  near-duplicate group), origin, content_hash, path, source, lung_mask (`file`: the
  dataset's own mask; `template`);
- `dataset.json`: classes (model output order), image_size, n_images, counts per split and
  class, and the fingerprint: a hash of every image's pixels, label and split and the size,
  which names this exact dataset in MLflow and in training checkpoints.

The prepare stage writes it (`write_index`), the others read it (`load_prepared`,
`split_arrays`, `split_masks`) without importing the preparation code.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import CxrError
from cxr.files import read_json, write_json

SPLITS = ("train", "val", "test")


def write_index(folder: Path, rows: list[dict[str, Any]], classes: list[str], size: int) -> dict:
    """Write `manifest.csv` (`rows`, in images.npy order) and `dataset.json` into `folder`;
    return the summary (dataset.json's content)."""
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fingerprint = hashlib.sha256(
        "".join(f"{r['content_hash']}:{r['label']}:{r['split']}\n" for r in rows).encode()
        + f"size={size}".encode()
    ).hexdigest()
    counts = {
        s: {c: sum(1 for r in rows if r["split"] == s and r["label"] == c) for c in classes}
        for s in SPLITS
    }
    summary = {
        "classes": classes,
        "image_size": size,
        "n_images": len(rows),
        "fingerprint": fingerprint,
        "counts": counts,
    }
    write_json(folder / "dataset.json", summary)
    return summary


def load_prepared(prepared: Path) -> tuple[np.ndarray, list[dict[str, str]], dict[str, Any]]:
    """Return (images memmap, manifest rows, summary) of a prepared folder."""
    images = np.load(prepared / "images.npy", mmap_mode="r")
    with open(prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return images, rows, read_json(prepared / "dataset.json")


def split_arrays(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(images (n, H, W, 1) uint8, labels (n,) int32, dataset summary) of one split."""
    images, rows, summary = load_prepared(prepared)
    index = {label: i for i, label in enumerate(summary["classes"])}
    chosen = [r for r in rows if r["split"] == split]
    x = images[[int(r["index"]) for r in chosen]][..., None]
    y = np.array([index[r["label"]] for r in chosen], dtype=np.int32)
    return x, y, summary


def split_masks(prepared: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """(lung masks (n, H, W) bool, where each came from) of one split, in split_arrays' order."""
    if not (prepared / "masks.npy").is_file():
        raise CxrError(
            f"{prepared / 'masks.npy'} is missing: this cache was prepared before lung masks "
            "were kept; rerun `dvc repro prepare` (or `dvc repro -f prepare`)."
        )
    masks = np.load(prepared / "masks.npy", mmap_mode="r")
    _, rows, _ = load_prepared(prepared)
    chosen = [r for r in rows if r["split"] == split]
    return masks[[int(r["index"]) for r in chosen]].astype(bool), [r["lung_mask"] for r in chosen]
