"""download at its boundary: archives, folders and the cache (the Kaggle client itself:
test_kaggle_client.py), with a fake KaggleApi serving zips built from the real sample."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import requests

from cxr.classes import DATASET_DIR
from cxr.download import DownloadError, download
from tests.conftest import REAL_SAMPLE
from tests.kaggle_fakes import FakeKaggleApi, data_params, needs_sample, run_kaggle, zip_tree


def run_archive(tmp_path, archive):
    return download(
        data_params(source="archive", archive=str(archive)),
        tmp_path / "raw",
        tmp_path / "d.json",
        tmp_path / "cache",
    )


@needs_sample
def test_kaggle_download_unpacks_records_and_caches(tmp_path, creds, sample_zip):
    api = FakeKaggleApi(sample_zip)
    info = run_kaggle(tmp_path, api, kaggle_version=5)
    assert api.calls == ["tawsifurrahman/covid19-radiography-database/5"]
    assert info["files"] == {"COVID": 40, "Normal": 40, "Viral Pneumonia": 40}
    saved = json.loads((tmp_path / "download.json").read_text())
    assert saved["kaggle_version"] == 5 and len(saved["sha256"]) == 64
    assert "test-token" not in (tmp_path / "download.json").read_text()
    assert len(list((tmp_path / "raw" / DATASET_DIR / "COVID" / "images").glob("*.png"))) == 40
    # A rerun (code change, or a dvc exp --temp copy) unpacks the cached zip: no new download.
    run_kaggle(tmp_path, api, kaggle_version=5)
    assert len(api.calls) == 1


@needs_sample
def test_the_topup_set_is_fetched_by_its_current_version_and_recorded(tmp_path, creds, sample_zip):
    """Like the database: the top-up's version is looked up, recorded, and keys its cached
    zip, so a new version is downloaded instead of a `latest` zip reused forever."""
    from cxr.download import TOPUP_DIR
    from cxr.synthetic import write_topup

    write_topup(tmp_path / "topup" / TOPUP_DIR, per_class=8, size=64)
    topup_zip = zip_tree(tmp_path / "topup", tmp_path / "topup.zip")

    class TwoDatasets(FakeKaggleApi):
        def dataset_download_files(self, dataset, path=None, **kwargs):
            self.zip_path = topup_zip if "pneumonia" in dataset else sample_zip
            super().dataset_download_files(dataset, path=path, **kwargs)

    api = TwoDatasets(None)
    info = run_kaggle(tmp_path, api, kaggle_version=5, topup="viral")
    topup = "paultimothymooney/chest-xray-pneumonia"
    assert api.calls[-1] == f"{topup}/7" and info["topup"]["kaggle_version"] == 7
    assert (tmp_path / "cache" / f"{topup.replace('/', '__')}__v7.zip").is_file()
    run_kaggle(tmp_path, api, kaggle_version=5, topup="viral")
    assert len(api.calls) == 2  # both zips cached
    api.version = 8  # a new version of both on Kaggle: the top-up's is downloaded
    run_kaggle(tmp_path, api, kaggle_version=5, topup="viral")
    assert api.calls[2:] == [f"{topup}/8"]
    run_kaggle(tmp_path, api, kaggle_version=5, topup="viral", topup_version=7)
    assert len(api.calls) == 3  # a pinned version: the cached zip, whatever is current


@needs_sample
def test_older_flat_layout_without_wrapper_folder(tmp_path, creds):
    flat = zip_tree(REAL_SAMPLE / DATASET_DIR, tmp_path / "flat.zip", prefix="v1/", flat=True)
    info = run_kaggle(tmp_path, FakeKaggleApi(flat))
    assert info["files"] == {"COVID": 40, "Normal": 40, "Viral Pneumonia": 40}
    assert (tmp_path / "raw" / DATASET_DIR / "Normal" / "Normal-10007.png").is_file()


@pytest.mark.parametrize("failure", [requests.ConnectionError("down"), KeyboardInterrupt()])
def test_interrupted_download_leaves_nothing(tmp_path, creds, monkeypatch, failure):
    monkeypatch.setattr("cxr.kaggle_client.time.sleep", lambda s: None)
    api = FakeKaggleApi(None, [failure] * 4)
    with pytest.raises((DownloadError, KeyboardInterrupt)) as err:
        run_kaggle(tmp_path, api)
    if isinstance(failure, requests.ConnectionError):
        assert "after 4 attempts" in str(err.value)
    assert not (tmp_path / "raw").exists()
    assert list((tmp_path / "cache").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _evil_zip(path: Path, name: str, link: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{DATASET_DIR}/COVID/images/COVID-1.png", b"x")
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if link else b"x")
    return path


@pytest.mark.parametrize(
    ("entry", "link", "message"),
    [
        ("../../evil.png", False, "outside the archive"),
        ("/tmp/evil.png", False, "absolute path"),
        (f"{DATASET_DIR}/COVID/images/link.png", True, "symbolic link"),
    ],
)
def test_hostile_entries_are_refused(tmp_path, entry, link, message):
    archive = _evil_zip(tmp_path / "evil.zip", entry, link)
    with pytest.raises(DownloadError, match=message):
        run_archive(tmp_path, archive)
    assert not (tmp_path / "raw").exists()
    assert not (tmp_path.parent / "evil.png").exists()


def test_truncated_and_foreign_archives(tmp_path):
    truncated = tmp_path / "t.zip"
    truncated.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DownloadError, match="not a zip file"):
        run_archive(tmp_path, truncated)
    other = tmp_path / "other"
    (other / "cats").mkdir(parents=True)
    with pytest.raises(DownloadError, match="not in the Kaggle layout"):
        run_archive(tmp_path, other)
    assert not (tmp_path / "raw").exists()


@needs_sample
def test_archive_folder_is_copied_never_moved(tmp_path):
    info = run_archive(tmp_path, REAL_SAMPLE)
    assert info["files"]["Viral Pneumonia"] == 40
    assert (REAL_SAMPLE / DATASET_DIR / "COVID").is_dir()


def test_synthetic_topup_has_the_paediatric_layout(tmp_path):
    data = data_params(
        source="synthetic",
        topup="viral",
        synthetic={
            "per_class": 8,
            "image_size": 64,
            "seed": 0,
            "findings": 1.0,
            "shortcut": "none",
        },
    )
    info = download(data, tmp_path / "raw", tmp_path / "d.json", tmp_path / "cache")
    pneumonia = tmp_path / "raw" / "chest_xray" / "train" / "PNEUMONIA"
    assert len(list(pneumonia.glob("*_virus_*.jpeg"))) == 6
    assert len(list(pneumonia.glob("*_bacteria_*.jpeg"))) == 6
    assert info["topup"]["pneumonia"] == "viral"


def test_lung_masks_are_counted_apart_from_the_images(tmp_path):
    """A database with its lung masks (the current Kaggle layout): download.json's `files`
    counts the images alone, `masks` the masks, from a zip as from the built-in phantoms."""
    from cxr.synthetic import write_dataset

    write_dataset(tmp_path / "db", per_class=5, size=32, labels=("covid", "normal"))
    archive = zip_tree(tmp_path / "db", tmp_path / "db.zip")
    info = run_archive(tmp_path, archive)
    assert info["files"] == info["masks"] == {"COVID": 5, "Normal": 5}
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["files"] == saved["masks"] == info["files"]
    synthetic = {"per_class": 4, "image_size": 32, "seed": 0, "findings": 1.0, "shortcut": "none"}
    data = data_params(source="synthetic", synthetic=synthetic)
    info = download(data, tmp_path / "raw2", tmp_path / "d2.json", tmp_path / "cache")
    assert set(info["files"].values()) == set(info["masks"].values()) == {4}


def test_encrypted_or_damaged_zip_gets_a_message(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{DATASET_DIR}/COVID/images/COVID-1.png", b"x" * 5000)
    damaged = tmp_path / "damaged.zip"
    data = bytearray(good.read_bytes())
    data[60:80] = b"\0" * 20  # inside the compressed entry
    damaged.write_bytes(bytes(data))
    encrypted = tmp_path / "encrypted.zip"
    data = bytearray(good.read_bytes())
    data[6] |= 0x1  # the "encrypted" flag of the local header ...
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 0x1  # ... and of the central directory
    encrypted.write_bytes(bytes(data))
    for archive in (damaged, encrypted):
        with pytest.raises(DownloadError, match="cannot be unpacked|corrupt|CRC"):
            run_archive(tmp_path, archive)
        assert not (tmp_path / "raw").exists()


def test_a_crc_mismatch_names_the_entry_and_leaves_nothing(tmp_path):
    archive = tmp_path / "flipped.zip"
    entry = f"{DATASET_DIR}/COVID/images/COVID-1.png"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{DATASET_DIR}/COVID/images/COVID-0.png", b"fine" * 100)
        zf.writestr(entry, b"y" * 5000)
    data = bytearray(archive.read_bytes())
    data[data.find(b"y" * 100) + 50] ^= 0xFF  # one stored byte of the second entry
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=f"entry '{entry}' fails its CRC check"):
        run_archive(tmp_path, archive)
    assert not (tmp_path / "raw").exists()
    assert not list(tmp_path.glob("**/*.unpack"))


@needs_sample
def test_macos_junk_and_extra_files_are_ignored(tmp_path, creds):
    archive = zip_tree(REAL_SAMPLE, tmp_path / "mac.zip", prefix="covid19/")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(f"__MACOSX/covid19/{DATASET_DIR}/COVID/images/._COVID-1.png", b"\0\5")
        zf.writestr(f"covid19/{DATASET_DIR}/COVID.metadata.xlsx", b"xlsx")
        zf.writestr(f"covid19/{DATASET_DIR}/README.md.txt", b"readme")
    info = run_kaggle(tmp_path, FakeKaggleApi(archive))
    assert info["files"] == {"COVID": 40, "Normal": 40, "Viral Pneumonia": 40}


@needs_sample
def test_a_damaged_cached_zip_is_downloaded_again_once(tmp_path, creds, sample_zip, capsys):
    api = FakeKaggleApi(sample_zip)
    run_kaggle(tmp_path, api)
    (cached,) = (tmp_path / "cache").glob("*.zip")
    data = bytearray(cached.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some PNG entry
    cached.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "raw")
    info = run_kaggle(tmp_path, api)
    assert len(api.calls) == 2 and info["files"]["COVID"] == 40
    assert "Deleting the cached copy and downloading it again" in capsys.readouterr().out
    assert cached.read_bytes() == sample_zip.read_bytes()
    # Kaggle's own file damaged: downloaded twice, then deleted, and the error says so
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    cached.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "raw")
    with pytest.raises(DownloadError, match="downloaded twice and deleted"):
        run_kaggle(tmp_path, FakeKaggleApi(damaged))
    assert not list((tmp_path / "cache").glob("*.zip")) and not (tmp_path / "raw").exists()


@needs_sample
def test_the_latest_version_is_resolved_recorded_and_keys_the_cache(tmp_path, creds, sample_zip):
    api = FakeKaggleApi(sample_zip)
    info = run_kaggle(tmp_path, api, kaggle_version=None)
    assert info["kaggle_version"] == 7 and info["kaggle_version_param"] is None
    assert api.calls == ["tawsifurrahman/covid19-radiography-database/7"]
    assert [p.name for p in (tmp_path / "cache").glob("*.zip")] == [
        "tawsifurrahman__covid19-radiography-database__v7.zip"
    ]
    shutil.rmtree(tmp_path / "raw")
    api.version = 8  # Kaggle published a new version: it is downloaded, not the cached 7
    assert run_kaggle(tmp_path, api, kaggle_version=None)["kaggle_version"] == 8
    assert api.calls[-1].endswith("/8")


@pytest.mark.parametrize("target", ["/etc/hostname", "../.."])
def test_a_folder_source_refuses_symbolic_links(tmp_path, target):
    root = tmp_path / "mine" / DATASET_DIR / "COVID" / "images"
    root.mkdir(parents=True)
    (root / "COVID-1.png").symlink_to(target)
    with pytest.raises(DownloadError, match="holds a symbolic link.*COVID-1.png -> "):
        run_archive(tmp_path, tmp_path / "mine")
    assert not (tmp_path / "raw").exists()
