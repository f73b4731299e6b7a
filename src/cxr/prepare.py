"""The prepare stage: index, validate, dedupe, balance, split, decode once into a cache.

Order matters: duplicates are found before balancing and splitting, balancing
never copies an image, and near-duplicate groups never straddle train/val/test.

1. index: the class folders of `raw/` (either Kaggle layout, cxr.layout), your images in
   `data/`, and, with `data.topup`, the paediatric pneumonia films in `raw/chest_xray/`;
   every other file is listed as not read, with its reason;
2. scan (all cores): decode and validate every file, hash its pixels (exact duplicates) and
   its look (perceptual hash), and write it at `image_size` into a scratch array;
3. dedupe: one copy of each exact duplicate is kept; the same pixels under two labels is a
   conflict and every copy is dropped; near duplicates (perceptual hashes within
   `near_duplicate_bits` and thumbnails within `near_duplicate_mad` grey levels) form groups;
4. balance: `undersample` (default: every class down to the `balance_target` class's count;
   with `data.topup`, pneumonia filled up to it from the top-up films) or `none` (everything,
   the top-up's new films included); a target that cannot be reached is said in the report,
   with what was done instead;
5. split: stratified by class, whole groups at a time, reproducible by `seed`;
6. cache: the kept images, copied in manifest order into `images.npy`, and their lung masks
   into `masks.npy` (the dataset's mask file resized beside its image, else the template:
   cxr.lungs).

Memory stays flat in the dataset size: images go from the decoder straight to disk.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr import layout
from cxr.balance import balance, split_groups
from cxr.classes import DATASET_DIR, LABEL_TO_FOLDER, TOPUP_LABEL
from cxr.console import progress
from cxr.dedupe import dedupe
from cxr.errors import DataError
from cxr.files import atomic_path
from cxr.images import (
    IMAGE_SUFFIXES,
    ImageRejected,
    content_hash,
    decode_upright,
    perceptual_hash,
    resize,
)
from cxr.lungs import mask_file, read_mask, template_mask
from cxr.prepared import SPLITS, write_index
from cxr.processes import worker_dies_with_parent

THUMB = 32  # thumbnail side for near-duplicate checks


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    origin: str = "database"


# ---------------------------------------------------------------------------- index


def _class_root(root: Path) -> Path:
    """The folder that holds the class folders: `root/COVID-19_Radiography_Dataset` or `root`."""
    nested = root / DATASET_DIR
    return nested if nested.is_dir() else root


def topup_files(raw: Path, mode: str) -> list[Path]:
    """Pneumonia films of the paediatric set: `viral` (all splits, `virus` in the name) or
    `all` (what the study read: train/PNEUMONIA, viral and bacterial)."""
    root = raw / "chest_xray"
    if not root.is_dir():
        raise DataError(
            f"data.topup is {mode!r} but {root} does not exist: run the download stage "
            "(`dvc repro download`), which fetches the top-up set."
        )
    splits = ("train", "val", "test") if mode == "viral" else ("train",)
    files = []
    for split in splits:
        folder = root / split / "PNEUMONIA"
        if folder.is_dir():
            files += [
                p
                for p in sorted(folder.iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES and (mode == "all" or "virus" in p.name)
            ]
    return files


def index_images(
    raw: Path,
    extra: list[Path],
    classes: list[str],
    topup: str | None = None,
    skipped: list[dict[str, Any]] | None = None,
) -> list[Item]:
    """List the files of `classes` in `raw` (required), `extra` (optional) and the top-up
    (cxr.layout); what is not read goes to `skipped` as {path, files, reason}."""
    items: list[Item] = []
    base = _class_root(raw)
    found = layout.survey(base, classes)
    missing = [label for label in classes if label not in found.images]
    if missing:
        names = [p.name for p in sorted(base.iterdir()) if p.is_dir()] if base.is_dir() else []
        present = [label for label in classes if label in found.images] + [
            label for label in found.folders if label not in classes
        ]
        raise DataError(
            f"Class folder(s) {[LABEL_TO_FOLDER[m] for m in missing]} (label(s) {missing}) "
            f"not found under {base}; found: {', '.join(names) or 'nothing'} (names are "
            "matched ignoring case, spaces, '_' and '-'). Set data.classes to the classes "
            f"present (here: {present}) to train on a subset."
        )
    surveys = [(found, "database")]
    for root in extra:
        surveys.append((layout.survey(_class_root(root), classes), "user"))
    for survey, origin in surveys:
        for label in classes:
            items += [Item(p, label, origin) for p in survey.images.get(label, [])]
        if skipped is not None:
            skipped += [
                {"path": _rel(path), "files": n, "reason": reason}
                for path, n, reason in survey.skipped
            ]
    if topup and TOPUP_LABEL in classes:
        items += [Item(p, TOPUP_LABEL, "topup") for p in topup_files(raw, topup)]
    return items


def image_sources(raw: Path) -> dict[str, str]:
    """File name without extension (lower case) -> the source it came from, read from the
    Kaggle metadata sheets beside the class folders (`<Class>.metadata.xlsx`, columns
    FILE NAME and URL) when they are there; {} otherwise. A sheet that cannot be read is
    reported and skipped: sources only feed the per-source metrics."""
    import openpyxl

    sources: dict[str, str] = {}
    for sheet in sorted(_class_root(raw).glob(f"*{layout.METADATA_SUFFIX}")):
        try:
            book = openpyxl.load_workbook(sheet, read_only=True, data_only=True)
            rows = book.active.iter_rows(values_only=True)
            header = [str(c or "").strip().upper() for c in next(rows, ())]
            name, url = header.index("FILE NAME"), header.index("URL")
            for row in rows:
                if len(row) > max(name, url) and row[name]:
                    sources[str(row[name]).strip().lower()] = str(row[url] or "").strip()
            book.close()
        except Exception as err:  # a damaged sheet must not stop the pipeline
            print(f"prepare: skipped {sheet.name} (no per-source metrics from it): {err!r}")
    return sources


def _source(item: Item, sources: dict[str, str]) -> str:
    if item.origin == "user":
        return "data/ (your images)"
    if item.origin == "topup":
        return "chest-xray-pneumonia (top-up)"
    return sources.get(item.path.stem.lower(), "")


# ---------------------------------------------------------------------------- scan


class RowFile:
    """An .npy file of uint8 rows read and written with pread/pwrite, not memory-mapped:
    the pages written stay in the OS page cache, not in any process's resident memory."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None):
        if shape is not None:  # create: header, then a sparse file of the full size
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            self.shape, _, _ = read_header(f)
            self.offset = f.tell()
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.path = path

    def open(self, write: bool) -> int:
        return os.open(self.path, os.O_RDWR if write else os.O_RDONLY)

    def write(self, fd: int, row: int, data: np.ndarray) -> None:
        os.pwrite(
            fd, np.ascontiguousarray(data, np.uint8).tobytes(), self.offset + row * self.row_bytes
        )

    def read(self, fd: int, row: int) -> bytes:
        return os.pread(fd, self.row_bytes, self.offset + row * self.row_bytes)


_scratch: list[tuple[RowFile, int]] = []


def _open_scratch(*paths: str) -> None:
    worker_dies_with_parent()
    for path in paths:
        rows = RowFile(Path(path))
        _scratch.append((rows, rows.open(write=True)))


def _scan_one(job: tuple[int, str, int, int]) -> tuple[int, str | None, str, int, bytes, str]:
    """Decode file `job` and its lung mask, write both to their scratch rows; return (row,
    reject reason, hashes, thumbnail, where the mask came from or why the template stood in)."""
    row, path, size, min_size = job
    try:
        grey, turn = decode_upright(path, min_size=min_size)
    except ImageRejected as err:
        return row, str(err), "", 0, b"", ""
    (images, fd), (masks, mask_fd) = _scratch
    images.write(fd, row, resize(grey, size))
    found, mask_from = mask_file(Path(path)), "file"
    try:
        mask = read_mask(found, size, turn) if found else None
    except ValueError as err:
        mask, mask_from = None, f"template ({err})"
    if mask is None:
        mask, mask_from = template_mask(size), mask_from if found else "template"
    masks.write(mask_fd, row, mask)
    thumb = resize(grey, THUMB)
    return row, None, content_hash(grey), perceptual_hash(grey), thumb.tobytes(), mask_from


def scan(items: list[Item], scratch: Path, mask_scratch: Path, size: int, min_size: int) -> dict:
    """Decode every item and its lung mask on all cores into `scratch` and `mask_scratch`
    (N, size, size each); return their facts."""
    n = len(items)
    RowFile(scratch, (n, size, size))
    RowFile(mask_scratch, (n, size, size))
    facts = {
        "reject": [None] * n,
        "hash": [""] * n,
        "phash": np.zeros(n, dtype=np.uint64),
        "thumb": np.zeros((n, THUMB, THUMB), dtype=np.uint8),
        "mask": [""] * n,
    }
    jobs = [(i, str(item.path), size, min_size) for i, item in enumerate(items)]
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(
        workers, initializer=_open_scratch, initargs=(str(scratch), str(mask_scratch))
    ) as pool:
        results = pool.map(_scan_one, jobs, chunksize=64)
        for row, reason, digest, phash, thumb, mask_from in progress(
            results, total=n, desc="decode", unit="img"
        ):
            facts["reject"][row] = reason
            facts["hash"][row] = digest
            facts["mask"][row] = mask_from
            if reason is None:
                facts["phash"][row] = phash
                facts["thumb"][row] = np.frombuffer(thumb, np.uint8).reshape(THUMB, THUMB)
    return facts


def copy_rows(scratch: Path, order: list[int], out: Path, shape: tuple[int, int]) -> None:
    """Write scratch rows `order`, in that order, as the .npy file `out`."""
    src = RowFile(scratch)
    dst = RowFile(out, (len(order), *shape))
    fd_in, fd_out = src.open(write=False), dst.open(write=True)
    try:
        os.lseek(fd_out, dst.offset, os.SEEK_SET)
        for start in range(0, len(order), 256):
            chunk = b"".join(src.read(fd_in, i) for i in order[start : start + 256])
            os.write(fd_out, chunk)
    finally:
        os.close(fd_in)
        os.close(fd_out)


# ---------------------------------------------------------------------------- stage


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def prepare(
    raw: Path,
    extra: list[Path],
    classes: list[str],
    cfg: dict[str, Any],
    out_dir: Path,
    topup: str | None = None,
) -> dict[str, Any]:
    """Run the whole stage; write `out_dir` atomically; return the report (as report.json)."""
    skipped: list[dict[str, Any]] = []
    items = index_images(raw, extra, classes, topup, skipped)
    size = cfg["image_size"]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        facts = scan(items, tmp / "scratch.npy", tmp / "mask_scratch.npy", size, cfg["min_size"])
        found = dedupe(items, facts, cfg)
        chosen, balanced = balance(items, found["kept"], found["group"], classes, cfg)
        empty = [c for c in classes if not any(items[i].label == c for i in chosen)]
        if empty:
            raise DataError(f"No usable images for class(es) {empty} under {raw}; see rejects.")
        split = split_groups(
            items, chosen, found["group"], cfg["val_fraction"], cfg["test_fraction"], cfg["seed"]
        )
        order = sorted(chosen, key=lambda i: (SPLITS.index(split[i]), i))

        copy_rows(tmp / "scratch.npy", order, tmp / "images.npy", (size, size))
        copy_rows(tmp / "mask_scratch.npy", order, tmp / "masks.npy", (size, size))
        (tmp / "scratch.npy").unlink()
        (tmp / "mask_scratch.npy").unlink()

        sources = image_sources(raw)
        rows = [
            {
                "index": k,
                "label": items[i].label,
                "split": split[i],
                "group": found["group"][i],
                "origin": items[i].origin,
                "content_hash": facts["hash"][i],
                "path": _rel(items[i].path),
                "source": _source(items[i], sources),
                "lung_mask": "file" if facts["mask"][i] == "file" else "template",
            }
            for k, i in enumerate(order)
        ]
        summary = write_index(tmp, rows, classes, size)
    return _report(summary, items, facts, found, order, balanced, skipped, classes)


def _report(summary, items, facts, found, order, balanced, skipped, classes) -> dict[str, Any]:
    """report.json: the prepared data's summary, what was found, kept and balanced per class,
    where the lung masks came from, and every file rejected, not read, duplicated, in
    conflict or near-duplicated (by path)."""
    counts = summary["counts"]

    def paths(indices):
        return [_rel(items[i].path) for i in indices]

    found_counts = Counter(item.label for item in items if item.origin != "topup")
    valid_counts = Counter(items[i].label for i in found["kept"] if items[i].origin != "topup")
    masks = [facts["mask"][i] for i in order]
    return {
        **summary,
        "per_class": {
            c: {
                "found": found_counts[c],
                "valid_unique": valid_counts[c],
                "after_balancing": sum(counts[s][c] for s in SPLITS),
            }
            for c in classes
        },
        "topup_found": sum(1 for item in items if item.origin == "topup"),
        "lung_masks": dict(Counter("file" if m == "file" else "template" for m in masks)),
        "lung_mask_notes": [
            {"path": _rel(items[i].path), "mask": facts["mask"][i]}
            for i in order
            if facts["mask"][i].startswith("template (")
        ],
        "balance": balanced,
        "rejects": [
            {"path": _rel(items[i].path), "reason": r}
            for i, r in enumerate(facts["reject"])
            if r is not None
        ],
        "not_read": skipped,
        "not_read_files": sum(e["files"] for e in skipped),
        "duplicates": [paths(c) for c in found["duplicates"]],
        "conflicts": [
            {"paths": paths(c), "labels": sorted({items[i].label for i in c})}
            for c in found["conflicts"]
        ],
        "near_duplicate_groups": [paths(g) for g in found["near_groups"]],
    }
