"""The download stage: put the raw images, in the Kaggle layout, under one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxr import synthetic
from cxr.errors import CxrError
from cxr.io import atomic_path, write_json


def download(data: dict[str, Any], out_dir: Path, info_path: Path) -> dict[str, Any]:
    """Fetch `data.source` into `out_dir`; write what was fetched to `info_path`."""
    source = data["source"]
    if source != "synthetic":
        raise CxrError(
            f"data.source {source!r} is not available yet in this version; "
            "use data.source: synthetic (the offline demo does)."
        )
    cfg = data["synthetic"]
    with atomic_path(out_dir) as tmp:
        counts = synthetic.write_dataset(tmp, cfg["per_class"], cfg["image_size"], cfg["seed"])
    info = {"source": source, "synthetic": cfg, "files": counts}
    write_json(info_path, info)
    return info
