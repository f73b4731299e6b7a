"""download at its boundary: a fake KaggleApi serving zips built from the real sample."""

from __future__ import annotations

import io
import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from cxr.classes import DATASET_DIR
from cxr.download import DownloadError, download
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


@pytest.fixture
def creds(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")


@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory) -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real sample not found at {REAL_SAMPLE}")
    return zip_tree(REAL_SAMPLE, tmp_path_factory.mktemp("zips") / "sample.zip")


def run_kaggle(tmp_path, api, **overrides):
    return download(
        data_params(**overrides),
        tmp_path / "raw",
        tmp_path / "download.json",
        tmp_path / "cache",
        api_factory=lambda: api,
    )


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


def test_missing_credentials_say_how_to_set_them(tmp_path, monkeypatch):
    """params.yaml as shipped (the real run) goes to Kaggle: without a token, one line."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    api = FakeKaggleApi(None)
    with pytest.raises(DownloadError, match="KAGGLE_API_TOKEN.*data.source: synthetic"):
        run_kaggle(tmp_path, api)
    assert api.calls == [] and not (tmp_path / "raw").exists()


@pytest.fixture
def no_creds(tmp_path, monkeypatch):
    """A home folder and environment without any Kaggle credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def test_credentials_are_found_where_the_locked_client_reads_them(no_creds, monkeypatch):
    from cxr.kaggle_client import kaggle_credentials

    home = no_creds
    assert kaggle_credentials() is None
    (home / ".config" / "kaggle").mkdir(parents=True)  # XDG, as ~/.kaggle does not exist
    (home / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials() == str(home / ".config" / "kaggle" / "kaggle.json")
    (home / ".kaggle").mkdir()  # now ~/.kaggle exists: the client reads it, not XDG
    assert kaggle_credentials() is None
    (home / ".kaggle" / "credentials.json").write_text('{"refresh_token": "r"}')  # auth login
    assert kaggle_credentials() == str(home / ".kaggle" / "credentials.json")
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials() == str(home / ".kaggle" / "kaggle.json")
    # an access token is read from the home folder, whatever KAGGLE_CONFIG_DIR says
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / "elsewhere"))
    (home / ".kaggle" / "access_token").write_text("token")
    assert kaggle_credentials() == str(home / ".kaggle" / "access_token")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "t")
    assert kaggle_credentials() == "KAGGLE_API_TOKEN"


def fake_http(monkeypatch, status: int) -> list[str]:
    """Every request of the Kaggle client answered with `status` (its HTTP layer only)."""
    seen = []

    def send(self, request, **kwargs):
        seen.append(request.url)
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        response._content = b"{}"
        return response

    monkeypatch.setattr(requests.Session, "send", send)
    return seen


def test_the_real_client_without_credentials_says_so_in_one_line(no_creds, monkeypatch, capsys):
    from cxr.kaggle_client import NO_CREDENTIALS, kaggle_api

    fake_http(monkeypatch, 500)
    with pytest.raises(DownloadError) as caught:
        kaggle_api()
    assert str(caught.value) == NO_CREDENTIALS
    assert capsys.readouterr().out == ""  # the client's own help (and exit(1)) stay out


def test_the_real_client_turning_a_token_down_gives_the_projects_message(
    no_creds, monkeypatch, capsys
):
    from cxr.kaggle_client import kaggle_api

    monkeypatch.setenv("KAGGLE_API_TOKEN", "expired-token")
    seen = fake_http(monkeypatch, 403)
    with pytest.raises(DownloadError, match="did not accept the credentials from KAGGLE_API_"):
        kaggle_api()
    assert any("ntrospect" in url for url in seen)  # the client really asked Kaggle
    assert "expired-token" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("code", "message"),
    [(401, "invalid or expired.*accept"), (403, "accept them"), (404, "no dataset.*owner/name")],
)
def test_http_errors_are_translated(tmp_path, creds, code, message):
    with pytest.raises(DownloadError, match=message):
        run_kaggle(tmp_path, FakeKaggleApi(None, [http_error(code)]))
    assert not (tmp_path / "raw").exists()
    assert not any((tmp_path / "cache").iterdir())


@needs_sample
def test_network_errors_are_retried(tmp_path, creds, sample_zip, monkeypatch):
    monkeypatch.setattr("cxr.kaggle_client.time.sleep", lambda s: None)
    api = FakeKaggleApi(sample_zip, [requests.ConnectionError("reset"), requests.Timeout("slow")])
    info = run_kaggle(tmp_path, api)
    assert len(api.calls) == 3 and info["files"]["COVID"] == 40


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


def test_kaggle_version_command_needs_credentials_and_says_so(no_creds, monkeypatch, capsys):
    from cxr.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["kaggle-version"]) == 2
    assert "No Kaggle credentials found" in capsys.readouterr().err


def test_kaggle_version_offline_with_a_token_ends_in_one_line(no_creds, monkeypatch, capsys):
    """`cxr kaggle-version` with a token and no network, through the locked client itself
    (only its HTTP layer cut): the retries, then one line naming the problem, no traceback."""
    from cxr.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    monkeypatch.setattr("cxr.kaggle_client.time.sleep", lambda s: None)
    seen = []

    def offline(self, request, **kwargs):
        seen.append(request.url)
        raise requests.ConnectionError("Name or service not known")

    monkeypatch.setattr(requests.Session, "send", offline)
    assert main(["kaggle-version"]) == 2
    said = capsys.readouterr()
    lines = [line for line in said.err.splitlines() if "retry" not in line]
    assert said.out == "" and len(lines) == 1, said.err
    assert "Could not reach Kaggle" in lines[0] and "Traceback" not in said.err
    assert seen and "a-token" not in said.err


@pytest.mark.parametrize("target", ["/etc/hostname", "../.."])
def test_a_folder_source_refuses_symbolic_links(tmp_path, target):
    root = tmp_path / "mine" / DATASET_DIR / "COVID" / "images"
    root.mkdir(parents=True)
    (root / "COVID-1.png").symlink_to(target)
    with pytest.raises(DownloadError, match="holds a symbolic link.*COVID-1.png -> "):
        run_archive(tmp_path, tmp_path / "mine")
    assert not (tmp_path / "raw").exists()


class KaggleHttp:
    """Kaggle's HTTP API as the real client (kaggle 2.x, kagglesdk) sees it, with
    `requests.Session.send` replaced: token introspection, the dataset's current version,
    and the dataset download (Content-Length, ETag, Range resumes). `cuts` cut the download
    streams short (bytes sent before a connection reset), one per download request."""

    def __init__(self, monkeypatch, zip_bytes: bytes, version: int = 7, cuts=()):
        self.zip, self.version, self.cuts = zip_bytes, version, list(cuts)
        self.seen: list[tuple[str, str | None]] = []
        monkeypatch.setattr(
            requests.Session, "send", lambda session, request, **kw: self.send(request)
        )
        monkeypatch.setattr("time.sleep", lambda s: None)  # the client's and ours

    def _reply(self, request, status, body=b"", headers=None, cut=None):
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        response.headers.update(headers or {"Content-Type": "application/json"})
        response.raw = _Stream(body, cut)
        return response

    def send(self, request):
        url, byte_range = request.url, request.headers.get("Range")
        self.seen.append((url.rsplit("/", 1)[-1], byte_range))
        if url.endswith("/IntrospectToken"):
            return self._reply(request, 200, b'{"active": true, "username": "tester"}')
        if url.endswith("/GetDataset"):
            return self._reply(request, 200, b'{"currentVersionNumber": %d}' % self.version)
        if url.endswith("/DownloadDataset") or byte_range:
            start = int(byte_range.split("=")[1].rstrip("-")) if byte_range else 0
            headers = {
                "Content-Type": "application/zip",
                "Content-Length": str(len(self.zip) - start),
                "Accept-Ranges": "bytes",
                "ETag": f'"v{self.version}"',
                "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT",
            }
            cut = self.cuts.pop(0) if self.cuts else None
            return self._reply(request, 206 if start else 200, self.zip[start:], headers, cut)
        raise AssertionError(f"unexpected request {url}")

    def downloads(self) -> list[str | None]:
        """The Range of each download request (None: from the start)."""
        return [r for name, r in self.seen if name == "DownloadDataset" or r]


class _Stream(io.BytesIO):
    """A response body that resets the connection after `cut` bytes."""

    def __init__(self, body: bytes, cut: int | None):
        super().__init__(body)
        self.cut = cut

    def read(self, size=-1):
        if self.cut is not None and self.tell() >= self.cut:
            raise requests.ConnectionError("Connection reset by peer")
        if self.cut is not None and size > 0:
            size = min(size, self.cut - self.tell())
        return super().read(size)


def run_real_client(tmp_path, **overrides):
    return download(
        data_params(**overrides), tmp_path / "raw", tmp_path / "download.json", tmp_path / "cache"
    )


@needs_sample
def test_the_real_client_resumes_a_cut_download_where_it_stopped(
    tmp_path, creds, sample_zip, monkeypatch
):
    """One retry policy: the client's own resume (an HTTP Range from the bytes it has)."""
    kaggle = KaggleHttp(monkeypatch, sample_zip.read_bytes(), cuts=[300_000])
    info = run_real_client(tmp_path, kaggle_version=None)
    assert kaggle.downloads() == [None, "bytes=300000-"]
    assert info["kaggle_version"] == 7 and info["files"]["COVID"] == 40
    (cached,) = (tmp_path / "cache").glob("*.zip")
    assert cached.name.endswith("__v7.zip") and cached.read_bytes() == sample_zip.read_bytes()
    assert ("IntrospectToken", None) in kaggle.seen  # the client really authenticated


@needs_sample
def test_the_real_client_replaces_a_damaged_cached_zip_once(
    tmp_path, creds, sample_zip, monkeypatch, capsys
):
    kaggle = KaggleHttp(monkeypatch, sample_zip.read_bytes())
    run_real_client(tmp_path)
    (cached,) = (tmp_path / "cache").glob("*.zip")
    data = bytearray(cached.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some PNG entry: a CRC failure on unpacking
    cached.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "raw")
    assert run_real_client(tmp_path)["files"]["COVID"] == 40
    assert kaggle.downloads() == [None, None]  # downloaded again, whole, once
    assert "Deleting the cached copy and downloading it again" in capsys.readouterr().out
    assert cached.read_bytes() == sample_zip.read_bytes()


@needs_sample
def test_the_real_client_giving_up_keeps_its_bytes_and_the_next_run_resumes(
    tmp_path, creds, sample_zip, monkeypatch
):
    """Every stream cut: the client's own 5 resumes, not retried again by the stage; one
    line; no zip and no raw/, but the bytes received stay in the cache's `.part` folder, and
    the next run resumes from them (a Range request) instead of starting over."""
    kaggle = KaggleHttp(monkeypatch, sample_zip.read_bytes(), cuts=[1000] * 6)
    with pytest.raises(DownloadError, match="broke off.*received are kept and the next run"):
        run_real_client(tmp_path, kaggle_version=7)
    assert kaggle.downloads() == [None] + [f"bytes={1000 * k}-" for k in range(1, 6)]
    assert not (tmp_path / "raw").exists() and not list((tmp_path / "cache").glob("*.zip"))
    (part,) = (tmp_path / "cache").glob(".*.part")
    assert sum(p.stat().st_size for p in part.rglob("*.zip")) == 6000

    info = run_real_client(tmp_path, kaggle_version=7)  # the network is back
    # The client opens the download, finds its marker matches (same ETag), asks for the rest.
    assert kaggle.downloads()[6:] == [None, "bytes=6000-"]
    assert info["files"]["COVID"] == 40 and not part.exists()
    (cached,) = (tmp_path / "cache").glob("*.zip")
    assert cached.read_bytes() == sample_zip.read_bytes()


def test_the_version_lookup_offline_is_one_line_after_the_retries(
    tmp_path, creds, monkeypatch, capsys
):
    """`kaggle_version: null` looks the version up first: offline, the same retry policy
    and one line as the download, not a traceback."""
    from cxr.kaggle_client import latest_version

    monkeypatch.setattr("cxr.kaggle_client.time.sleep", lambda s: None)
    api = FakeKaggleApi(None)

    def offline(*args, **kwargs):
        raise requests.ConnectionError("Name or service not known")

    api.dataset_status = offline
    with pytest.raises(DownloadError, match="Could not reach Kaggle after 4 attempts"):
        latest_version("owner/name", lambda: api)
    said = capsys.readouterr()  # `cxr kaggle-version`'s stdout is the number alone
    assert said.out == "" and "retry 1/3" in said.err
    with pytest.raises(DownloadError, match="Could not reach Kaggle after 4 attempts"):
        run_kaggle(tmp_path, api, kaggle_version=None)


def test_bytes_kept_from_an_earlier_run_do_not_cut_the_retries_short(tmp_path, creds, monkeypatch):
    """A partial from an earlier run in the cache, and the network down before any new byte:
    4 attempts as always (not "broke off"), and the partial stays for the next run."""
    monkeypatch.setattr("cxr.kaggle_client.time.sleep", lambda s: None)
    part = tmp_path / "cache" / ".tawsifurrahman__covid19-radiography-database__v7.zip.part"
    part.mkdir(parents=True)
    (part / "covid19-radiography-database.zip").write_bytes(b"PK" + bytes(5000))
    api = FakeKaggleApi(None, [requests.ConnectionError("down")] * 4)
    with pytest.raises(DownloadError, match="Could not reach Kaggle after 4 attempts"):
        run_kaggle(tmp_path, api, kaggle_version=7)
    assert len(api.calls) == 4
    assert (part / "covid19-radiography-database.zip").stat().st_size == 5002
