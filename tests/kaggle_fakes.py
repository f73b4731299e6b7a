"""Fakes for the download tests: a KaggleApi stand-in serving zips built from the real
sample, and the params and zips they download."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from cxr.download import download
from tests.conftest import REAL_SAMPLE, ROOT

needs_sample = pytest.mark.skipif(
    not REAL_SAMPLE.is_dir(), reason=f"real sample not found at {REAL_SAMPLE}"
)


def data_params(**overrides):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    return {**data, **overrides}


def zip_tree(root: Path, zip_path: Path, prefix: str = "", flat: bool = False) -> Path:
    """Zip `root` (a Kaggle-layout folder); `flat` drops the images/ level (older layout)."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                if flat:
                    rel = rel.replace("/images/", "/")
                zf.write(path, prefix + rel)
    return zip_path


class FakeKaggleApi:
    """Stands in for kaggle's KaggleApi: serves a zip, or fails the way the real one does."""

    def __init__(self, zip_path: Path | None, failures: list[BaseException] = ()):
        self.zip_path, self.failures, self.calls = zip_path, list(failures), []
        self.version = 7  # what Kaggle calls the current version

    def dataset_status(self, dataset, format=None):
        assert format == "json(current_version_number)"
        return json.dumps({"current_version_number": self.version})

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append(dataset)
        out = Path(path) / f"{dataset.split('/')[1]}.zip"
        if self.failures:  # before any byte arrives (reaching Kaggle, the request)
            raise self.failures.pop(0)
        out.write_bytes(self.zip_path.read_bytes())


def http_error(code: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = code
    return requests.HTTPError(f"{code} Client Error", response=response)


def run_kaggle(tmp_path, api, **overrides):
    return download(
        data_params(**overrides),
        tmp_path / "raw",
        tmp_path / "download.json",
        tmp_path / "cache",
        api_factory=lambda: api,
    )
