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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr import layout, synthetic
from cxr.archive import count_images, unpack_into
from cxr.classes import DATASET_DIR
from cxr.errors import CorruptArchive, DownloadError
from cxr.files import atomic_path, write_json
from cxr.kaggle_client import kaggle_api, kaggle_download, latest_version

TOPUP_DIR = "chest_xray"


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


def download(
    data: dict[str, Any],
    out_dir: Path,
    info_path: Path,
    cache_dir: Path,
    api_factory: Callable[[], Any] = kaggle_api,
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
            info.update(layout.survey(tmp / DATASET_DIR).facts())  # what prepare reads
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
