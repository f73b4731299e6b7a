"""The dataset folder's layout: which files are a class's images, and why any other file is
not read. Download counts with it and prepare reads with it, so their counts agree.

A dataset folder holds one folder per class, named as in the Kaggle database (matched
ignoring case and treating spaces, `_` and `-` alike: `viral_pneumonia` is `Viral Pneumonia`).
A class folder holds its images in one of the two Kaggle layouts:
- `<Class>/images/*` (current versions), with the lung masks in `<Class>/masks/` under the
  same file names;
- `<Class>/*` (older versions), no masks.
Every file is either an image of a class (decoded, and rejected with a reason if unusable),
a lung mask of one, the metadata sheets beside the class folders (`*.metadata.xlsx`), or
listed as skipped with its reason: a loose file beside `images/`, an unknown folder, a class
left out by data.classes. Two folders that name one class (`COVID` and `covid`) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cxr.classes import FOLDER_TO_LABEL, LABEL_TO_FOLDER
from cxr.errors import CxrError

METADATA_SUFFIX = ".metadata.xlsx"  # Kaggle's per-class source sheets, read by prepare


class LayoutError(CxrError):
    pass


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().casefold()


_KEY_TO_LABEL = {_key(folder): label for folder, label in FOLDER_TO_LABEL.items()}


@dataclass
class Survey:
    """What a dataset folder holds: image files per label (all classes found) and what is
    not read, as (path, number of files, reason); a whole folder is one entry."""

    images: dict[str, list[Path]] = field(default_factory=dict)
    masks: dict[str, int] = field(default_factory=dict)  # lung masks (of an image) per folder
    folders: dict[str, Path] = field(default_factory=dict)
    skipped: list[tuple[Path, int, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class folder (its name on disk), as download.json reports them."""
        return {self.folders[label].name: len(files) for label, files in self.images.items()}

    def facts(self) -> dict[str, dict[str, int]]:
        """download.json's counts: images per class folder, and its lung masks apart."""
        return {"files": self.counts(), "masks": self.masks}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _count(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 1


def _skip(survey: Survey, path: Path, reason: str) -> None:
    n = _count(path)
    if n:
        survey.skipped.append((path, n, reason))


def _class_folder(folder: Path, survey: Survey) -> list[Path]:
    """The image files of one class folder; the rest goes to `survey.skipped`."""
    images_dir = folder / "images"
    nested = images_dir.is_dir()
    where = images_dir if nested else folder
    found: list[Path] = []
    for path in sorted(where.iterdir()):
        if path.name.startswith("."):
            _skip(survey, path, "hidden")
        elif path.is_dir():
            _skip(survey, path, f"a folder inside {where.name}/: only its own files are read")
        else:
            found.append(path)
    if not nested:
        return found
    names = {p.name for p in found}
    for path in sorted(folder.iterdir()):
        if path == images_dir:
            continue
        if path.name == "masks" and path.is_dir():
            for mask in _files(path):
                if mask.parent != path or mask.name not in names:
                    _skip(survey, mask, "a lung mask with no image of that name in images/")
                else:
                    survey.masks[folder.name] = survey.masks.get(folder.name, 0) + 1
        elif path.is_dir():
            _skip(survey, path, "an unknown folder in a class folder (read: images/, masks/)")
        else:
            _skip(
                survey,
                path,
                "beside images/: a class folder holds its images in images/ or loose, not "
                "both; move it into images/",
            )
    return found


def survey(base: Path, classes: list[str] | None = None) -> Survey:
    """Survey dataset folder `base` (the folder holding the class folders); `classes`
    (labels) limits what is read, the other class folders are skipped with that reason."""
    result = Survey()
    if not base.is_dir():
        return result
    for path in sorted(base.iterdir()):
        label = _KEY_TO_LABEL.get(_key(path.name)) if path.is_dir() else None
        if label is None:
            if path.is_file() and path.name.endswith(METADATA_SUFFIX):
                continue
            if path.name.startswith("."):
                _skip(result, path, "hidden")
                continue
            what = "an unknown class folder" if path.is_dir() else "a file outside class folders"
            _skip(result, path, f"{what} (classes: {', '.join(FOLDER_TO_LABEL)})")
            continue
        if label in result.folders:
            raise LayoutError(
                f"Two folders under {base} name the class '{LABEL_TO_FOLDER[label]}': "
                f"'{result.folders[label].name}' and '{path.name}' (case and spaces are "
                "ignored); merge them into one folder."
            )
        result.folders[label] = path
        if classes is not None and label not in classes:
            _skip(result, path, f"class '{label}' is not in data.classes")
            continue
        result.images[label] = _class_folder(path, result)
    return result


SHOWN = 10  # not-read entries printed; the whole list goes to a report


def say_not_read(prefix: str, entries: list[dict], where: str) -> None:
    """Print the first SHOWN not-read entries ({path, files, reason}), one line each, and
    where the whole list is."""
    for e in entries[:SHOWN]:
        print(f"{prefix}: not read: {e['path']!r} ({e['files']} files): {e['reason']}")
    if len(entries) > SHOWN:
        print(f"{prefix}: {len(entries) - SHOWN} more not read: {where}")


def has_class_folders(path: Path, at_least: int = 1) -> bool:
    """Whether `path` holds `at_least` class folders (names matched as in `survey`)."""
    return path.is_dir() and at_least <= sum(
        child.is_dir() and _key(child.name) in _KEY_TO_LABEL for child in path.iterdir()
    )


def outside(unpacked: Path, root: Path, is_copy) -> list[tuple[Path, int, str]]:
    """What an archive (or a folder) `unpacked` holds besides the dataset folder `root`
    inside it: (path, number of files, reason) per entry; `is_copy(folder)` says whether a
    folder is another copy of the dataset."""
    found: list[tuple[Path, int, str]] = []
    relative = root.relative_to(unpacked)
    where = unpacked
    for part in relative.parts:
        for child in sorted(where.iterdir()):
            if child.name == part:
                continue
            n = _count(child)
            if child.name == "__MACOSX":
                reason = "macOS archive metadata"
            elif child.is_dir() and is_copy(child):
                reason = f"a second copy of the dataset (the one read: {relative.as_posix()})"
            else:
                reason = f"outside the dataset folder {relative.as_posix()}"
            if n:
                found.append((child, n, reason))
        where = where / part
    return found
