"""download: fetch the raw images (data.source) into raw/, in the Kaggle layout."""

from pathlib import Path

from cxr.download import download
from cxr.errors import run_stage
from cxr.params import stage_params
from cxr.repo import repo_root


def main() -> None:
    info = download(
        stage_params("download")["data"],
        Path("raw"),
        Path("reports/download.json"),
        cache_dir=repo_root() / ".cache" / "downloads",
    )
    print(f"download: {info['source']}: {info['files']}")


if __name__ == "__main__":
    run_stage(main)
