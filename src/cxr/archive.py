"""Datasets in zips and folders: safe unpacking (no absolute paths, '..' or links; CRC and
free space checked), finding the dataset folder in either Kaggle layout, and its facts."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from cxr import layout
from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL
from cxr.console import progress
from cxr.errors import CorruptArchive, DownloadError
from cxr.images import IMAGE_SUFFIXES


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    mode = info.external_attr >> 16
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"Archive entry {name!r} has an absolute path; refusing to unpack.")
    if ".." in path.parts:
        raise DownloadError(f"Archive entry {name!r} points outside the archive ('..').")
    if stat.S_ISLNK(mode):
        raise DownloadError(f"Archive entry {name!r} is a symbolic link; refusing to unpack.")


def extract_zip(archive: Path, dest: Path) -> None:
    """Unpack `archive` into `dest` (a staging folder: a corrupt entry stops it half-way)
    after checking every entry's name (no absolute paths, no '..', no links) and the free
    space; every entry's CRC is checked as it is unpacked. With a progress bar."""
    if not zipfile.is_zipfile(archive):
        raise CorruptArchive(f"{archive} is not a zip file (truncated or not an archive).")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member(info)
            unpacked = sum(info.file_size for info in infos)
            free = shutil.disk_usage(dest).free
            if unpacked > free:
                raise DownloadError(
                    f"{archive} unpacks to {unpacked / 2**30:.1f} GiB but only "
                    f"{free / 2**30:.1f} GiB is free under {dest}."
                )
            with progress(
                total=unpacked, unit="B", unit_scale=True, desc=f"unpack {archive.name}"
            ) as bar:
                for info in infos:
                    try:
                        zf.extract(info, dest)  # checks the entry's CRC as it reads
                    except zipfile.BadZipFile as err:
                        if "CRC" not in str(err):
                            raise
                        raise CorruptArchive(
                            f"{archive} is corrupt: entry {info.filename!r} fails its CRC check."
                        ) from err
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as err:
        # RuntimeError: encrypted entries; NotImplementedError: unsupported compression.
        raise CorruptArchive(f"{archive} cannot be unpacked: {err}.") from err


def _refuse_links(root: Path, what: str) -> None:
    """Symbolic links in a dataset folder are refused, as in zips: copying would follow one to
    any file on the machine (into raw/, the DVC cache and remote), and one to `../..`
    recurses."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in (*dirs, *files):
            path = Path(folder) / entry
            if path.is_symlink():
                raise DownloadError(
                    f"{what} holds a symbolic link, {path} -> {os.readlink(path)}; links are "
                    "not followed (they can point outside the dataset): put the file itself "
                    "there, or remove the link."
                )


def _find_dir(root: Path, name: str) -> Path | None:
    """`root/name`, or the shallowest folder called `name` below root (zips often add one)."""
    if (root / name).is_dir():
        return root / name
    found = sorted(
        (p for p in root.rglob(name) if p.is_dir()), key=lambda p: (len(p.parts), p.as_posix())
    )
    return found[0] if found else None


def _dataset_root(unpacked: Path, what: str) -> Path:
    """The folder holding the class folders, in either Kaggle layout."""
    found = _find_dir(unpacked, DATASET_DIR)
    if found is not None:
        return found
    if layout.has_class_folders(unpacked):
        return unpacked
    for child in sorted(unpacked.iterdir()):  # one wrapping folder, class folders inside
        if layout.has_class_folders(child):
            return child
    raise DownloadError(
        f"{what} is not in the Kaggle layout: expected a folder '{DATASET_DIR}' or class "
        f"folders {sorted(FOLDER_TO_LABEL)} (each with images, directly or in images/)."
    )


def _is_copy(folder: Path) -> bool:
    """Whether an archive's `folder` holds the dataset too (two class folders at least: the
    paediatric set's train/NORMAL alone is not a copy)."""
    return _find_dir(folder, DATASET_DIR) is not None or any(
        layout.has_class_folders(f, 2) for f in (folder, *folder.iterdir()) if f.is_dir()
    )


def count_images(root: Path) -> dict[str, int]:
    """Image files per folder of the top-up set (`train/`, `val/`, `test/`)."""
    return {
        folder.name: sum(
            1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
    }


def _not_unpacked(unpacked: Path, root: Path, what: str) -> list[dict[str, Any]]:
    """What an unpacked archive holds besides the dataset folder `root`: said, and listed."""
    entries = [
        {"path": path.relative_to(unpacked).as_posix(), "files": n, "reason": reason}
        for path, n, reason in layout.outside(unpacked, root, _is_copy)
    ]
    layout.say_not_read(f"download: {what}", entries, "reports/download.json")
    return entries


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_into(source: Path, out: Path, name: str, what: str) -> dict[str, Any]:
    """Put the dataset found in `source` (zip or folder) at `out/name`; return its facts."""
    info: dict[str, Any] = {"path": str(source)}
    if source.is_file():
        info["sha256"] = sha256_file(source)
        staging = out / f".{name}.unpack"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            extract_zip(source, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        unpacked = staging
    elif source.is_dir():
        unpacked = source
    else:
        raise DownloadError(f"{what}: {source} does not exist; set it to a zip file or folder.")
    if name == DATASET_DIR:
        root = _dataset_root(unpacked, f"{what} {source}")
    else:
        root = _find_dir(unpacked, name)
        if root is None:
            raise DownloadError(f"{what} {source} has no folder '{name}'.")
    skipped = _not_unpacked(unpacked, root, what) if source.is_file() else []
    if skipped:  # a folder of yours keeps what lies beside the dataset: nothing is lost
        info["not_read"] = skipped
    if source.is_file():
        os.replace(root, out / name)
        shutil.rmtree(out / f".{name}.unpack", ignore_errors=True)
    else:  # a user's folder: copy, never move, and never follow a link out of it
        _refuse_links(root, f"{what} {source}")
        shutil.copytree(root, out / name, symlinks=False)
    if name == DATASET_DIR:
        info.update(layout.survey(out / name).facts())
    else:
        info["files"] = count_images(out / name)
    return info
