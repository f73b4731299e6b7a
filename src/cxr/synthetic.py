"""Phantom chest radiographs: an offline stand-in for the Kaggle database.

Every image shares one anatomy (body, lungs, ribs, mediastinum, vessel markings) drawn with
random pose, size and exposure. Classes differ only in *local* findings inside the lungs, as
in real films:

- normal: clear lungs;
- covid: several faint, soft ground-glass patches, both lungs, towards the periphery;
- lung_opacity: one or two dense, sharp-edged consolidations in one lung;
- pneumonia: a fine reticular (net-like) pattern spread around both hila.

Each image is then standardised to the same mean and spread, so global brightness says
nothing about the class: a linear model on raw pixels stays far from perfect while a small
CNN, which sees texture and shape, learns the classes (see tests/test_synthetic.py).

`findings` scales the findings' contrast: 1 (the default) is the phantoms above; the demo
triples it so that VGG and ResNet50V2, trained from scratch, learn within its CPU budget.

Each phantom ships its exact lung mask (where findings can be) in the Kaggle layout,
`<Class>/masks/<same name>.png` at 256x256 like the database's. `shortcut="marker"` plants
a shortcut outside the lungs, as real sources do with their markers: a bright square in a
corner, a different corner for each class.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr.classes import DATASET_DIR, LABEL_TO_FOLDER, LABELS
from cxr.console import progress
from cxr.processes import worker_dies_with_parent

TARGET_MEAN, TARGET_STD = 0.45, 0.2


def _rng(seed: int, label: str, index: int) -> np.random.Generator:
    # One stream per image: an image does not change when the count of others does.
    digest = hashlib.sha256(f"{seed}/{label}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, unit spread; filtered in the Fourier domain, so a wide
    filter costs no more than a narrow one."""
    freq_y = np.fft.fftfreq(size)[:, None]
    freq_x = np.fft.rfftfreq(size)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (freq_y**2 + freq_x**2))
    field = np.fft.irfft2(
        np.fft.rfft2(rng.standard_normal((size, size))) * transfer, s=(size, size)
    )
    return field / (field.std() + 1e-8)


def _ellipse(x, y, cx, cy, rx, ry, softness=0.06):
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 - r) / softness, 0, 1)


def _anatomy(rng: np.random.Generator, size: int):
    """Return (image, lung mask, coordinate grids) of one normal chest."""
    angle = np.deg2rad(rng.uniform(-6, 6))
    scale = rng.uniform(0.9, 1.08)
    dx, dy = rng.uniform(-0.06, 0.06, 2)
    u = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(u, u, indexing="ij")
    x = (np.cos(angle) * xx - np.sin(angle) * yy - dx) / scale
    y = (np.sin(angle) * xx + np.cos(angle) * yy - dy) / scale

    body = _ellipse(x, y, 0, 0.15, 0.98, 1.2, 0.15)
    img = 0.05 + (0.45 + 0.1 * y) * body
    lung_w, lung_h = rng.uniform(0.27, 0.33), rng.uniform(0.58, 0.68)
    lungs = np.maximum(
        _ellipse(x, y, -0.4, 0.0, lung_w, lung_h, 0.3),
        _ellipse(x, y, 0.4, 0.0, lung_w, lung_h, 0.3),
    )
    img -= rng.uniform(0.2, 0.4) * lungs  # inspiration depth and habitus vary a lot
    img += 0.2 * np.exp(-((x / 0.12) ** 2)) * body  # spine and mediastinum
    heart = _ellipse(x, y, 0.15 + rng.uniform(-0.04, 0.04), 0.35, 0.3, 0.25, 0.5)
    img += rng.uniform(0.08, 0.22) * heart

    spacing, phase = rng.uniform(0.16, 0.2), rng.uniform(0, 1)
    rib_wave = np.cos(2 * np.pi * ((y - 0.35 * x**2) / spacing + phase))
    img += 0.06 * np.clip(rib_wave * 3 - 2, 0, 1) * lungs

    # Vessel markings: thin branching-like streaks radiating from the hila, faint everywhere.
    theta = np.arctan2(y - 0.05, np.abs(x) - 0.15)
    radial = np.sqrt((np.abs(x) - 0.15) ** 2 + (y - 0.05) ** 2)
    streaks = np.cos(theta * rng.uniform(20, 28) + 3 * _smooth_noise(rng, size, size / 40))
    img += 0.03 * np.clip(streaks, 0, 1) * np.exp(-radial / 0.35) * lungs
    return img, lungs, x, y


def _blob(rng, x, y, cx, cy, radius, sigma_px, size):
    """A soft-edged irregular blob centred at (cx, cy)."""
    wobble = 0.35 * _smooth_noise(rng, size, sigma_px)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
    return np.clip(1 - r + wobble * 0.5, 0, 1)


def _lesions(label: str, rng, x, y, lungs, size):
    if label == "normal":
        return np.zeros_like(x)
    if label == "covid":
        out = np.zeros_like(x)
        for side in (-1, 1):
            for _ in range(rng.integers(2, 4)):
                cx = side * rng.uniform(0.45, 0.62)
                cy = rng.uniform(-0.1, 0.45)
                radius = rng.uniform(0.14, 0.24)
                out += 0.22 * _blob(rng, x, y, cx, cy, radius, size / 25, size) ** 2
        return ndimage.gaussian_filter(out, size / 60) * lungs
    if label == "lung_opacity":
        out = np.zeros_like(x)
        side = rng.choice([-1, 1])
        for _ in range(rng.integers(1, 3)):
            cx, cy = side * rng.uniform(0.3, 0.55), rng.uniform(-0.4, 0.4)
            mask = _blob(rng, x, y, cx, cy, rng.uniform(0.12, 0.22), size / 30, size) > 0.35
            out += 0.28 * ndimage.gaussian_filter(mask.astype(float), size / 150)
        return np.minimum(out, 0.35) * lungs
    if label == "pneumonia":
        fine = _smooth_noise(rng, size, size / 100)
        reticular = (np.abs(fine) < 0.3).astype(float)
        hila = np.exp(-(((np.abs(x) - 0.25) / 0.4) ** 2 + ((y - 0.05) / 0.55) ** 2))
        return 0.2 * ndimage.gaussian_filter(reticular, size / 250) * hila * lungs
    raise ValueError(f"no phantom finding for label {label!r}")


MASK_SIZE = 256  # the Kaggle database's mask files are 256x256 for 299x299 images
SHORTCUT_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (bottom?, right?) per class index


def phantom(
    label: str,
    index: int,
    size: int = 299,
    seed: int = 0,
    shortcut: str = "none",
    findings: float = 1.0,
) -> np.ndarray:
    """One deterministic phantom radiograph of class `label`, as uint8 (size, size)."""
    return _phantom(label, index, size, seed, shortcut, findings)[0]


def _phantom(label: str, index: int, size: int, seed: int, shortcut: str, findings: float = 1.0):
    """(image uint8, lung mask bool) of one phantom."""
    rng = _rng(seed, label, index)
    img, lungs, x, y = _anatomy(rng, size)
    img += findings * _lesions(label, rng, x, y, lungs, size)
    # Heel effect and scatter: smooth exposure changes across the film, different on every
    # film, as in real radiographs (and what keeps perceptual hashes of different films apart).
    direction = rng.uniform(0, 2 * np.pi)
    img += rng.uniform(0.05, 0.15) * (np.cos(direction) * x + np.sin(direction) * y)
    img += 0.04 * _smooth_noise(rng, size, size / 8)
    img += 0.025 * rng.standard_normal(img.shape)  # quantum noise
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)  # exposure / film response
    img = (img - img.mean()) / (img.std() + 1e-8) * TARGET_STD + TARGET_MEAN
    img = np.clip(img * 255, 0, 255).astype(np.uint8)
    if shortcut == "marker":
        side, gap = max(2, size // 12), max(1, size // 60)
        bottom, right = SHORTCUT_CORNERS[LABELS.index(label) % len(SHORTCUT_CORNERS)]
        top = size - gap - side if bottom else gap
        left = size - gap - side if right else gap
        img[top : top + side, left : left + side] = 255
    elif shortcut != "none":
        raise ValueError(f"no phantom shortcut {shortcut!r}")
    return img, lungs > 0


def _write_one(job: tuple[Path, str, int, int, int, str, float]) -> None:
    path, label, index, size, seed, shortcut, findings = job
    img, mask = _phantom(label, index, size, seed, shortcut, findings)
    Image.fromarray(img).save(path)
    mask_path = path.parent.parent / "masks" / path.name
    lungs = Image.fromarray(mask.astype(np.uint8) * 255).resize((MASK_SIZE, MASK_SIZE))
    lungs.point(lambda v: 255 if v > 127 else 0).save(mask_path)


def write_dataset(
    root: Path,
    per_class: int,
    size: int = 299,
    seed: int = 0,
    labels=LABELS,
    shortcut: str = "none",
    findings: float = 1.0,
) -> dict[str, int]:
    """Write phantoms and their lung masks in the Kaggle layout under `root`, on all cores;
    return image files per folder."""
    jobs = []
    for label in labels:
        folder = LABEL_TO_FOLDER[label]
        images = root / DATASET_DIR / folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        (images.parent / "masks").mkdir(exist_ok=True)
        jobs += [
            (images / f"{folder}-{i + 1}.png", label, i, size, seed, shortcut, findings)
            for i in range(per_class)
        ]
    with ProcessPoolExecutor(os.cpu_count(), initializer=worker_dies_with_parent) as pool:
        for _ in progress(
            pool.map(_write_one, jobs, chunksize=16), total=len(jobs), desc="phantoms", unit="img"
        ):
            pass
    return {LABEL_TO_FOLDER[label]: per_class for label in labels}


def _write_jpeg(job: tuple[Path, str, int, int, int]) -> None:
    path, label, index, size, seed = job
    Image.fromarray(phantom(label, index, size, seed)).save(path, quality=90)


def write_topup(root: Path, per_class: int, size: int = 299, seed: int = 0) -> None:
    """Phantoms in the paediatric pneumonia set's layout (`train/PNEUMONIA/*_virus_*.jpeg`,
    `*_bacteria_*`, `NORMAL/`). Like the real set, it holds re-encoded copies of the
    database's pneumonia images (the first quarter), which prepare must find as duplicates."""
    jobs = []
    for split, share in (("train", 0.8), ("val", 0.05), ("test", 0.15)):
        folder = root / split / "PNEUMONIA"
        folder.mkdir(parents=True, exist_ok=True)
        (root / split / "NORMAL").mkdir(parents=True, exist_ok=True)
        n = max(1, int(per_class * share))
        offset = {"train": 0, "val": 10_000, "test": 20_000}[split]
        for i in range(n):
            # Viral films: a quarter are the database's own images (same seed and index).
            viral_seed, viral_index = (
                (seed, i) if split == "train" and i < per_class // 4 else (seed + 1, offset + i)
            )
            jobs.append(
                (
                    folder / f"person{offset + i}_virus_{i}.jpeg",
                    "pneumonia",
                    viral_index,
                    size,
                    viral_seed,
                )
            )
            jobs.append(
                (
                    folder / f"person{offset + i}_bacteria_{i}.jpeg",
                    "lung_opacity",
                    offset + i,
                    size,
                    seed + 2,
                )
            )
        jobs += [
            (
                root / split / "NORMAL" / f"IM-{offset + i}.jpeg",
                "normal",
                offset + i,
                size,
                seed + 3,
            )
            for i in range(max(1, n // 4))
        ]
    with ProcessPoolExecutor(os.cpu_count(), initializer=worker_dies_with_parent) as pool:
        for _ in progress(
            pool.map(_write_jpeg, jobs, chunksize=16),
            total=len(jobs),
            desc="top-up phantoms",
            unit="img",
        ):
            pass
