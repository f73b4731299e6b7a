"""The locked Kaggle client at its HTTP boundary (only `requests.Session.send` replaced, or a
fake KaggleApi): credentials where the client reads them, its errors translated into one line,
the retry policy, resumed downloads, `cxr kaggle-version`."""

from __future__ import annotations

import io
import shutil

import pytest
import requests

from cxr.download import DownloadError, download
from tests.conftest import ROOT
from tests.kaggle_fakes import FakeKaggleApi, data_params, http_error, needs_sample, run_kaggle


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
