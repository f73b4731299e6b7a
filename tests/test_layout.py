"""Archives in unusual shapes: every file is read or listed with its reason, and download's
counts are prepare's."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL, LABELS
from cxr.download import download
from cxr.layout import LayoutError
from cxr.prepare import prepare
from cxr.synthetic import write_dataset
from tests.conftest import prepare_settings
from tests.test_download import data_params

CFG = prepare_settings(image_size=32, min_size=32, val_fraction=0.25, test_fraction=0.25)
PER_CLASS = 8


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, per_class=PER_CLASS, size=48)
    return root / DATASET_DIR


def zip_folders(zip_path: Path, entries: dict[str, Path]) -> Path:
    """A zip holding each folder `entries[prefix]` under `prefix/`."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for prefix, folder in entries.items():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return zip_path


def download_then_prepare(tmp_path: Path, archive: Path, classes=LABELS):
    info = download(
        data_params(source="archive", archive=str(archive)),
        tmp_path / "raw",
        tmp_path / "download.json",
        tmp_path / "cache",
    )
    report = prepare(tmp_path / "raw", [], list(classes), CFG, tmp_path / "prepared")
    found = {
        folder: report["per_class"][FOLDER_TO_LABEL[folder]]["found"]
        for folder in FOLDER_TO_LABEL
        if FOLDER_TO_LABEL[folder] in classes
    }
    return info, report, found


def test_loose_files_beside_images_are_listed_and_counts_agree(phantoms, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(phantoms, tree)
    for folder in FOLDER_TO_LABEL:  # the older layout's copies, loose beside images/
        for image in sorted((tree / folder / "images").iterdir())[:3]:
            shutil.copy(image, tree / folder / f"loose-{image.name}")
    info, report, found = download_then_prepare(
        tmp_path, zip_folders(tmp_path / "both.zip", {DATASET_DIR: tree})
    )
    assert info["files"] == found == {folder: PER_CLASS for folder in FOLDER_TO_LABEL}
    loose = [e for e in report["not_read"] if "loose-" in e["path"]]
    assert len(loose) == 3 * len(FOLDER_TO_LABEL)
    assert all("beside images/" in e["reason"] for e in loose)


def test_a_second_copy_of_the_dataset_is_named_not_dropped_silently(phantoms, tmp_path, capsys):
    archive = zip_folders(
        tmp_path / "twice.zip", {DATASET_DIR: phantoms, f"backup/{DATASET_DIR}": phantoms}
    )
    info, _, found = download_then_prepare(tmp_path, archive)
    assert info["files"] == found
    (entry,) = info["not_read"]
    assert entry["path"] == "backup" and entry["files"] == 2 * PER_CLASS * len(LABELS)
    assert "second copy of the dataset" in entry["reason"]
    assert "not read: 'backup'" in capsys.readouterr().out


def test_class_folders_in_lower_case_are_read(phantoms, tmp_path):
    tree = tmp_path / "tree"
    for folder in FOLDER_TO_LABEL:
        shutil.copytree(phantoms / folder, tree / folder.lower().replace(" ", "_"))
    info, report, found = download_then_prepare(
        tmp_path, zip_folders(tmp_path / "lower.zip", {"covid19": tree})
    )
    assert sorted(info["files"]) == ["covid", "lung_opacity", "normal", "viral_pneumonia"]
    assert sorted(info["files"].values()) == sorted(found.values()) == [PER_CLASS] * 4
    assert report["n_images"] > 0 and report["not_read"] == []


def test_two_folders_for_one_class_are_refused(phantoms, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(phantoms, tree)
    shutil.copytree(phantoms / "COVID", tree / "covid")
    with pytest.raises(LayoutError, match="'COVID' and 'covid'.*merge them"):
        download_then_prepare(tmp_path, zip_folders(tmp_path / "two.zip", {DATASET_DIR: tree}))
    assert not (tmp_path / "raw").exists()


def test_unknown_folders_left_out_classes_and_stray_files_are_listed(phantoms, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(phantoms, tree)
    shutil.copytree(phantoms / "Normal", tree / "Tuberculosis")
    (tree / "COVID" / "images" / "extra").mkdir()
    images = tree / "COVID" / "images"
    shutil.copy(next(images.glob("*.png")), images / "extra")
    (tree / "COVID" / "masks" / "orphan.png").write_bytes(b"x")
    (tree / "README.md.txt").write_text("readme")
    (tree / "COVID.metadata.xlsx").write_bytes(b"")  # read for per-source metrics
    classes = ("covid", "normal", "pneumonia")
    _, report, found = download_then_prepare(
        tmp_path, zip_folders(tmp_path / "odd.zip", {DATASET_DIR: tree}), classes
    )
    assert found == {"COVID": PER_CLASS, "Normal": PER_CLASS, "Viral Pneumonia": PER_CLASS}
    reasons = {Path(e["path"]).name: (e["files"], e["reason"]) for e in report["not_read"]}
    assert set(reasons) == {"Tuberculosis", "Lung_Opacity", "extra", "orphan.png", "README.md.txt"}
    assert reasons["Tuberculosis"] == (2 * PER_CLASS, reasons["Tuberculosis"][1])
    assert "unknown class folder" in reasons["Tuberculosis"][1]
    assert "not in data.classes" in reasons["Lung_Opacity"][1]
    assert "no image of that name" in reasons["orphan.png"][1]
    assert "outside class folders" in reasons["README.md.txt"][1]
