"""The Kaggle client at its boundary: which credentials it would use (named, never shown),
an authenticated API, and the download and version lookup under one retry policy whose
failures are one line each. The client (`kaggle`) is imported lazily: it authenticates at
import."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.errors import DownloadError


def kaggle_credentials() -> str | None:
    """Where the Kaggle client (kaggle 2.2 / kagglesdk 0.1) looks first and finds
    credentials (never their value), or None; it names them in messages. As the client: an
    access token in KAGGLE_API_TOKEN (the token or a file holding it) or in
    ~/.kaggle/access_token(.txt) (always the home folder); the legacy KAGGLE_USERNAME and
    KAGGLE_KEY or kaggle.json in KAGGLE_CONFIG_DIR (default ~/.kaggle, or
    $XDG_CONFIG_HOME/kaggle when ~/.kaggle does not exist); the OAuth
    credentials `kaggle auth login` writes (~/.kaggle/credentials.json)."""
    home = Path.home() / ".kaggle"
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or (home if home.exists() else xdg))
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        if (home / name).is_file():
            return str(home / name)
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if (config_dir / "kaggle.json").is_file():
        return str(config_dir / "kaggle.json")
    if (home / "credentials.json").is_file():
        return str(home / "credentials.json")
    return None


NO_CREDENTIALS = (
    "No Kaggle credentials found. Create a token at https://www.kaggle.com/settings "
    "(API section) and either export KAGGLE_API_TOKEN=<token>, save it to "
    "~/.kaggle/access_token, or put the legacy kaggle.json in ~/.kaggle/ (chmod 600). "
    "To run offline instead, set data.source: synthetic (or archive with data.archive)."
)


def _require_credentials() -> None:
    """Stop before any network call when the client would find no credentials."""
    if kaggle_credentials() is None:
        raise DownloadError(NO_CREDENTIALS)


def kaggle_api():
    """An authenticated KaggleApi. The client decides which credentials count (kaggle 2.x:
    an access token, then kaggle.json / KAGGLE_USERNAME+KAGGLE_KEY, then `kaggle auth login`
    OAuth credentials); when none does, it prints its help and calls exit(1), which becomes
    this project's one-line message."""
    import contextlib
    import io

    try:
        # `import kaggle` authenticates too (printing the client's help when it fails)
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except SystemExit as err:
        found = kaggle_credentials()
        if found:  # there were credentials, and the client turned them down
            raise DownloadError(
                f"Kaggle did not accept the credentials from {found} (invalid or expired): "
                "create a new token at https://www.kaggle.com/settings (API section)."
            ) from err
        raise DownloadError(NO_CREDENTIALS) from err
    return api


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None) or getattr(err, "status", None)
    return int(code) if isinstance(code, int) else None


def _is_network(err: BaseException) -> bool:
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with kaggle
        return False
    return isinstance(err, requests.ConnectionError | requests.Timeout)


def kaggle_download(
    dataset: str,
    version: int | None,
    dest: Path,
    api_factory: Callable[[], Any] = kaggle_api,
    retries: int = 4,
    backoff_s: float = 2.0,
) -> Path:
    """Download `dataset` (owner/name) as a zip into `dest`; return the zip's path.

    One retry policy per kind of failure, never both: a transfer that breaks off is resumed
    by the client itself (up to 5 times, 2-32 s apart, an HTTP Range request for the rest,
    checked against the file's ETag); a network failure before any byte arrives is retried
    here, `retries` attempts in all with exponential backoff. HTTP errors become messages
    that say what to do. The bytes of a download that failed or was interrupted stay in
    `dest/.<zip name>.part/` with the client's resume marker, so the next run resumes from
    them (the client checks they belong to the same remote file); no zip appears in `dest`
    until it is complete.
    """
    _require_credentials()
    owner_name = _owner_name(dataset)
    ref = f"{owner_name}/{version}" if version else owner_name
    final = dest / f"{owner_name.replace('/', '__')}__v{version or 'latest'}.zip"
    if final.is_file() and zipfile.is_zipfile(final):
        return final
    part = dest / f".{final.name}.part"
    part.mkdir(parents=True, exist_ok=True)

    def attempt() -> Path:
        # force=False: the client resumes a broken transfer itself (see above)
        api_factory().dataset_download_files(
            ref, path=str(part), force=False, quiet=False, unzip=False
        )
        zips = list(part.glob("*.zip"))
        if len(zips) != 1:
            raise DownloadError(f"Kaggle download of {ref} gave no zip file.")
        os.replace(zips[0], final)
        return final

    try:
        return _kaggle_call(attempt, ref, owner_name, retries, backoff_s, part)
    finally:  # done (the zip moved out), or no byte to resume from: the folder goes
        if not _zip_bytes(part):
            shutil.rmtree(part, ignore_errors=True)


def _owner_name(dataset: str) -> str:
    owner_name = dataset.strip("/")
    if owner_name.count("/") != 1:
        raise DownloadError(f"data.kaggle_dataset {dataset!r} must look like 'owner/name'.")
    return owner_name


def _kaggle_call(
    attempt: Callable[[], Any],
    ref: str,
    owner_name: str,
    retries: int,
    backoff_s: float,
    part: Path | None = None,
) -> Any:
    """`attempt()` under the retry policy of kaggle_download, its failures translated into
    one line each; `part`: the folder a download writes into (bytes added there in this
    attempt mean the transfer had started, and the client's own resumes are spent). Retry
    notes go to stderr: `cxr kaggle-version`'s stdout is the version alone."""
    for number in range(1, retries + 1):
        before = _zip_bytes(part)
        try:
            return attempt()
        except DownloadError:
            raise
        except Exception as err:  # translated, retried or re-raised below
            code = _status(err)
            if code in (401, 403):
                raise DownloadError(
                    f"Kaggle refused {ref} (HTTP {code}): the token from "
                    f"{kaggle_credentials()} is invalid or expired, or you have not accepted "
                    f"the dataset's terms: open https://www.kaggle.com/datasets/{owner_name}, "
                    "accept them, and check your token."
                ) from err
            if code == 404:
                raise DownloadError(
                    f"Kaggle has no dataset {ref} (HTTP 404): check data.kaggle_dataset "
                    "(owner/name) and data.kaggle_version."
                ) from err
            got = _zip_bytes(part)
            if _is_network(err) and got > before:
                # bytes had arrived: the client's own resumes of the transfer are spent
                raise DownloadError(
                    f"The download of {ref} broke off and the Kaggle client's own resumes "
                    f"(5, by HTTP Range) failed too ({_said(err)}); the {got / 2**20:.1f} MiB "
                    "received are kept and the next run resumes from them. Check the network "
                    "and rerun, or set data.source: archive with a local copy."
                ) from err
            if not _is_network(err) or number == retries:
                if _is_network(err):
                    raise DownloadError(
                        f"Could not reach Kaggle after {retries} attempts ({_said(err)}). "
                        "Check the network, or set data.source: archive with a local copy."
                    ) from err
                raise
            wait = backoff_s * 2 ** (number - 1)
            print(
                f"kaggle: network error ({_said(err)}); retry {number}/{retries - 1} in {wait:g} s",
                file=sys.stderr,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _zip_bytes(part: Path | None) -> int:
    """Bytes of the zip being downloaded into `part` (not the client's resume marker)."""
    return sum(p.stat().st_size for p in part.glob("*.zip")) if part and part.is_dir() else 0


def _said(err: BaseException) -> str:
    """An error's text for a message, without the query strings of the URLs in it (a
    download URL is signed: its query is a credential)."""
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1?...", str(err))[:300]


def latest_version(
    dataset: str,
    api_factory: Callable[[], Any] = kaggle_api,
    retries: int = 4,
    backoff_s: float = 2.0,
) -> int:
    """The current version number of Kaggle dataset `dataset` (owner/name), under the same
    retry policy and messages as the download."""
    import json

    _require_credentials()
    owner_name = _owner_name(dataset)

    def attempt() -> int:
        answer = api_factory().dataset_status(owner_name, format="json(current_version_number)")
        return int(json.loads(answer)["current_version_number"])

    return _kaggle_call(attempt, owner_name, owner_name, retries, backoff_s)
