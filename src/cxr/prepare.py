"""The prepare stage: index the raw images, split them, decode once into a cached array.

Outputs (all under one folder, written atomically):
- `images.npy`: uint8 array (N, size, size), rows in manifest order, streamed to disk;
- `manifest.csv`: one row per image: index, label, split, sha256, source path;
- `dataset.json`: classes in label-index order, image size, counts, and the data fingerprint
  that every MLflow run is tagged with.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL, LABEL_TO_FOLDER
from cxr.errors import CxrError
from cxr.images import IMAGE_SUFFIXES, load_grey
from cxr.io import atomic_path, progress, read_json, write_json

SPLITS = ("train", "val", "test")


class DataError(CxrError):
    pass


@dataclass(frozen=True)
class Item:
    path: Path
    label: str


def _class_root(root: Path) -> Path:
    """The folder that holds the class folders: `root/COVID-19_Radiography_Dataset` or `root`."""
    nested = root / DATASET_DIR
    return nested if nested.is_dir() else root


def _images_in(folder: Path) -> list[Path]:
    # Both layouts: <Class>/images/*.png (current) and <Class>/*.png (older versions).
    where = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def index_images(raw: Path, extra: list[Path], classes: list[str]) -> list[Item]:
    """List the images of `classes` in `raw` (required) and the `extra` folders (optional)."""
    items: list[Item] = []
    base = _class_root(raw)
    found = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    present = [FOLDER_TO_LABEL[f] for f in found if f in FOLDER_TO_LABEL]
    for label in classes:
        folder = base / LABEL_TO_FOLDER[label]
        if not folder.is_dir():
            raise DataError(
                f"Class folder '{LABEL_TO_FOLDER[label]}' (label '{label}') not found under "
                f"{base}; found: {', '.join(found) or 'nothing'}. Set data.classes to the "
                f"classes present (here: {present}) to train on a subset."
            )
        items += [Item(p, label) for p in _images_in(folder)]
    for root in extra:
        base = _class_root(root)
        for label in classes:
            folder = base / LABEL_TO_FOLDER[label]
            if folder.is_dir():
                items += [Item(p, label) for p in _images_in(folder)]
    counts = Counter(item.label for item in items)
    empty = [label for label in classes if counts[label] == 0]
    if empty:
        raise DataError(f"No images found for class(es) {empty} under {raw}.")
    return items


def split_items(items: list[Item], val: float, test: float, seed: int) -> list[str]:
    """Stratified train/val/test assignment, one split name per item, reproducible by seed."""
    labels = [item.label for item in items]
    idx = np.arange(len(items))
    too_small = [label for label, n in Counter(labels).items() if n < 3]
    if too_small:
        raise DataError(f"Class(es) {too_small} have fewer than 3 images: cannot split.")
    rest, test_idx = train_test_split(idx, test_size=test, stratify=labels, random_state=seed)
    train_idx, val_idx = train_test_split(
        rest, test_size=val / (1 - test), stratify=[labels[i] for i in rest], random_state=seed
    )
    split = [""] * len(items)
    for name, chosen in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True):
        for i in chosen:
            split[i] = name
    return split


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(
    raw: Path, extra: list[Path], classes: list[str], cfg: dict[str, Any], out_dir: Path
) -> dict[str, Any]:
    """Index, split and cache; return the dataset summary (also written as dataset.json)."""
    items = index_images(raw, extra, classes)
    splits = split_items(items, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"])
    size = cfg["image_size"]
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        cache = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(items), size, size)
        )
        for i, item in enumerate(progress(items, desc="decode", unit="img")):
            cache[i] = load_grey(item.path, size)
            rows.append(
                {
                    "index": i,
                    "label": item.label,
                    "split": splits[i],
                    "sha256": _sha256(item.path),
                    "path": item.path.as_posix(),
                }
            )
        cache.flush()
        del cache
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        fingerprint = hashlib.sha256(
            "".join(f"{r['sha256']}:{r['label']}:{r['split']}\n" for r in rows).encode()
            + f"size={size}".encode()
        ).hexdigest()
        counts = {
            split: {
                label: sum(1 for r in rows if r["split"] == split and r["label"] == label)
                for label in classes
            }
            for split in SPLITS
        }
        summary = {
            "classes": classes,
            "image_size": size,
            "n_images": len(rows),
            "fingerprint": fingerprint,
            "counts": counts,
        }
        write_json(tmp / "dataset.json", summary)
    return summary


def load_prepared(prepared: Path) -> tuple[np.ndarray, list[dict[str, str]], dict[str, Any]]:
    """Return (images memmap, manifest rows, summary) of a prepared folder."""
    images = np.load(prepared / "images.npy", mmap_mode="r")
    with open(prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return images, rows, read_json(prepared / "dataset.json")
