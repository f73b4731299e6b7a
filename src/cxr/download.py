"""The download stage: put the raw images, in the Kaggle layout, under one folder.

`data.source`:
- `kaggle`: the real Kaggle API (imported lazily: `import kaggle` authenticates at import);
- `archive`: a local zip or folder in the Kaggle layout;
- `synthetic`: built-in phantom radiographs (offline).

`data.topup` (`viral` | `all` | null) also fetches the paediatric pneumonia set
(`data.topup_dataset`, layout `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`) that
prepare can top the small pneumonia class up from.

Output: `raw/COVID-19_Radiography_Dataset/<Class>/...` (and `raw/chest_xray/...`), moved into
place only when complete. Kaggle zips are kept in `<repo>/.cache/downloads/`, keyed by slug
and version, so a rerun of this stage (after a code change, or in a `dvc exp run --temp`
copy) unpacks again without downloading again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from cxr import layout, synthetic
from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL
from cxr.console import progress
from cxr.errors import CxrError
from cxr.files import atomic_path, write_json
from cxr.images import IMAGE_SUFFIXES

TOPUP_DIR = "chest_xray"


class DownloadError(CxrError):
    pass


class CorruptArchive(DownloadError):
    """The zip itself is damaged (not its layout): a cached download is fetched again."""


# ---------------------------------------------------------------------------- Kaggle


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


def _kaggle_api():
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
    api_factory: Callable[[], Any] = _kaggle_api,
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
    api_factory: Callable[[], Any] = _kaggle_api,
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


def kaggle_unpack(
    dataset: str,
    version: int | None,
    cache_dir: Path,
    api_factory: Callable[[], Any],
    out: Path,
    name: str,
    what: str,
) -> dict[str, Any]:
    """Download `dataset` into the cache (or take it from there) and unpack it into `out`. A
    cached zip that turns out damaged is deleted and downloaded again, once, saying so; a
    fresh download that is damaged too is deleted, and the error says so."""
    for again in (False, True):
        zip_path = kaggle_download(dataset, version, cache_dir, api_factory)
        try:
            return unpack_into(zip_path, out, name, what)
        except CorruptArchive as err:
            zip_path.unlink(missing_ok=True)
            if again:
                raise CorruptArchive(
                    f"{err} It was downloaded twice and deleted; try again later."
                ) from err
            print(f"download: {err} Deleting the cached copy and downloading it again.")
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- archives


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
    info["files"] = (
        layout.survey(out / name).counts() if name == DATASET_DIR else count_images(out / name)
    )
    return info


# ---------------------------------------------------------------------------- stage


def download(
    data: dict[str, Any],
    out_dir: Path,
    info_path: Path,
    cache_dir: Path,
    api_factory: Callable[[], Any] = _kaggle_api,
) -> dict[str, Any]:
    """Fetch `data.source` (and the top-up set) into `out_dir`; write the facts to `info_path`."""
    source = data["source"]
    info: dict[str, Any] = {"source": source}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if source == "synthetic":
            cfg = data["synthetic"]
            synthetic.write_dataset(
                tmp,
                cfg["per_class"],
                cfg["image_size"],
                cfg["seed"],
                shortcut=cfg["shortcut"],
                findings=cfg["findings"],
            )
            if data["topup"]:
                synthetic.write_topup(
                    tmp / TOPUP_DIR, cfg["per_class"], cfg["image_size"], cfg["seed"]
                )
            info["synthetic"] = cfg
            info["files"] = layout.survey(tmp / DATASET_DIR).counts()  # what prepare reads
        elif source == "archive":
            info.update(unpack_into(Path(data["archive"]), tmp, DATASET_DIR, "data.archive"))
        else:
            # `kaggle_version: null` is resolved to the current version number: it is
            # recorded, and the cached zip is keyed by it (a new version is downloaded)
            version = data["kaggle_version"] or latest_version(data["kaggle_dataset"], api_factory)
            info["kaggle_dataset"] = data["kaggle_dataset"]
            info["kaggle_version"] = version
            info["kaggle_version_param"] = data["kaggle_version"]
            info.update(
                kaggle_unpack(
                    data["kaggle_dataset"],
                    version,
                    cache_dir,
                    api_factory,
                    tmp,
                    DATASET_DIR,
                    "Kaggle archive",
                )
            )
        if data["topup"] and source != "synthetic":
            what = "top-up archive"
            if source == "kaggle":  # like the database's: recorded, and the cache's key
                dataset = data["topup_dataset"]
                version = data["topup_version"] or latest_version(dataset, api_factory)
                unpacked = kaggle_unpack(
                    dataset, version, cache_dir, api_factory, tmp, TOPUP_DIR, what
                )
                unpacked["kaggle_version"] = version
            elif data["topup_archive"]:
                unpacked = unpack_into(Path(data["topup_archive"]), tmp, TOPUP_DIR, what)
            else:
                raise DownloadError(
                    "data.topup is set with data.source: archive, but data.topup_archive is "
                    f"empty: point it at a zip or folder holding '{TOPUP_DIR}/'."
                )
            info["topup"] = {
                "dataset": data["topup_dataset"],
                "pneumonia": data["topup"],
                **unpacked,
            }
        elif data["topup"]:
            info["topup"] = {"pneumonia": data["topup"], "files": count_images(tmp / TOPUP_DIR)}
    write_json(info_path, info)
    return info
